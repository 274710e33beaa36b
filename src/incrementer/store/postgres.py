"""PostgreSQL backend on asyncpg.

The SQL stays within what PostgreSQL-compatible distributed databases (Citus, CockroachDB,
YugabyteDB) accept: unnest, string_to_array, ON CONFLICT, UPDATE ... RETURNING, no server-side
functions, no advisory locks (docs/operations.md says which parts are untested there).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg

from incrementer.store import pg_listen
from incrementer.store import postgres_reads as reads
from incrementer.store.base import (
    INT64_MAX,
    INT64_MIN,
    NEW_KEY_COLUMNS,
    ApiKey,
    ApplyResult,
    BackendError,
    DuplicateKeyName,
    IdempotentBatch,
    KeyList,
    KeyRead,
    ManyRead,
    SeriesRead,
    Window,
    lone_out_of_range,
    losers,
    new_key_values,
    prefix_upper_bound,
    scopes_of,
    sum_deltas,
    taken_back,
    unscoped,
    utc_text,
)
from incrementer.store.buckets import Buckets, without
from incrementer.store.buckets import taken_back as bucket_taken_back
from incrementer.store.pglink import (
    connect_timeout,
    connection_class,
    server_settings,
    statement_timeout,
)
from incrementer.store.postgres_buckets import BucketedWrite
from incrementer.urls import redact_url, scrub

# Anything that means "the database failed or is unreachable": the flusher keeps the batch and
# retries. Other exceptions are bugs and propagate as they are.
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# Only concurrent writers moving the same counters between the failed upsert and the overflow
# query can need another round; give up well before that turns into a livelock.
MAX_UPSERT_ROUNDS = 8

ENSURE_NODE = (
    "INSERT INTO incrementer_nodes (node_id, applied_seq, updated_at) VALUES ($1, 0, now())"
    " ON CONFLICT (node_id) DO NOTHING"
)
# Claims the batch: one round trip that both checks and advances applied_seq. Its row lock
# serializes concurrent flushes of one node (two processes sharing a node_id): the second waits,
# re-reads the row, finds its seq no longer above applied_seq, and gets no row back (skip).
CLAIM_SEQ = (
    "UPDATE incrementer_nodes SET applied_seq = $2, updated_at = now()"
    " WHERE node_id = $1 AND applied_seq < $2 RETURNING 1"
)
# ORDER BY k: every writer locks counter rows in key order, so concurrent flushes of different
# nodes cannot deadlock; sorting in SQL is cheaper than in Python on the event loop. COLLATE "C",
# the key column's own collation (migration 0003): bytes compared, not the locale's rules (~3 ms
# less for 20,000 keys, measured).
UPSERT_COUNTERS = (
    "INSERT INTO counters (key, value, created_at, updated_at)"
    " SELECT k, v, now(), now() FROM unnest($1::text[], $2::bigint[]) AS t(k, v)"
    ' ORDER BY k COLLATE "C"'
    " ON CONFLICT (key) DO UPDATE"
    " SET value = counters.value + excluded.value, updated_at = excluded.updated_at"
)
# The same upsert with keys and values sent as two joined texts, split by PostgreSQL: asyncpg
# encodes a text[] element by element on the event loop (~0.8 us a key, measured), a joined
# string in one piece (~0.3 us). Keys never hold the separator (validation refuses control
# characters); a batch that does anyway takes the array form.
SEPARATOR = "\x1f"
UPSERT_COUNTERS_JOINED = (
    "INSERT INTO counters (key, value, created_at, updated_at)"
    " SELECT k, v, now(), now()"
    " FROM unnest(string_to_array($1, E'\\x1f'), string_to_array($2, ',')::bigint[]) AS t(k, v)"
    ' ORDER BY k COLLATE "C"'
    " ON CONFLICT (key) DO UPDATE"
    " SET value = counters.value + excluded.value, updated_at = excluded.updated_at"
)
# A large flush joins its keys and values this many at a time and lets the event loop serve
# requests in between: 100,000 keys in one go would hold the loop for ~10 ms.
ENCODE_PIECE = 4096
FIND_OVERFLOWS = (
    "SELECT t.k FROM unnest($1::text[], $2::bigint[]) AS t(k, v)"
    " JOIN counters AS c ON c.key = t.k"
    f" WHERE c.value::numeric + t.v NOT BETWEEN {INT64_MIN} AND {INT64_MAX}"
)
INSERT_OVERFLOWS = (
    "INSERT INTO counter_overflows (node_id, seq, key, delta, created_at)"
    " SELECT $1, $2, k, d, now() FROM unnest($3::text[], $4::text[]) AS t(k, d)"
)
SELECT_APPLIED = "SELECT applied_seq FROM incrementer_nodes WHERE node_id = $1"
# Idempotency keys (migration 0006; scoped by principal since 0009), inserted by the flush that
# applies their batches, in its transaction: the keys that come back won, the others were applied
# before. In key order, like the counters and before them, so two flushes never wait on each
# other in a cycle. A second flush inserting a key the first has inserted and not committed waits
# for that commit (then loses) or its rollback (then wins): PostgreSQL settles the race.
INSERT_IDEMPOTENCY_KEYS = (
    "INSERT INTO idempotency_keys (principal, key, digest, created_at)"
    " SELECT p, k, d, now() FROM unnest($1::text[], $2::text[], $3::text[]) AS t(p, k, d)"
    ' ORDER BY p COLLATE "C", k COLLATE "C"'
    " ON CONFLICT (principal, key) DO NOTHING RETURNING principal, key"
)
# The principal's own row first; a row stored before keys were scoped only with the same digest.
# Two lookups by the primary key, not one OR that would scan the principal's rows.
SELECT_IDEMPOTENCY_DIGEST = (
    "SELECT digest, 0 FROM idempotency_keys WHERE principal = $1 AND key = $2"
    " UNION ALL SELECT digest, 1 FROM idempotency_keys"
    " WHERE principal = '' AND key = $2 AND digest = $3"
    " ORDER BY 2 LIMIT 1"
)
SELECT_IDEMPOTENCY_DIGESTS = (
    "SELECT i.principal, i.key, i.digest FROM idempotency_keys i"
    " JOIN unnest($1::text[], $2::text[]) AS t(p, k) ON i.principal = t.p AND i.key = t.k"
)
SWEEP_IDEMPOTENCY_KEYS = (
    "DELETE FROM idempotency_keys WHERE created_at < now() - $1::bigint * INTERVAL '1 millisecond'"
)
# One statement, so the value, the overflowed deltas and applied_seq come from one snapshot.
# The deltas are decimal text of any size: summed exactly in Python.
SELECT_READ = (
    "SELECT (SELECT value FROM counters WHERE key = $1),"
    " (SELECT applied_seq FROM incrementer_nodes WHERE node_id = $2),"
    " (SELECT string_agg(delta, ',') FROM counter_overflows WHERE key = $1)"
)
# Listing (postgres_reads.py) takes a key range rather than LIKE: the range needs no wildcard
# escaping and uses the primary key index. It is exact because `key` is declared COLLATE "C"
# (migration 0003): code point order, whatever the database's default collation.


# Active: not revoked, or revoked at a time still to come (a rotation's grace period).
ACTIVE = "(revoked_at IS NULL OR revoked_at > now())"
KEY_COLUMNS = (
    f"name, key_id, key_hash, rate, burst, created_at, revoked_at, {ACTIVE}, scopes, prefix"
)
SELECT_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name, created_at"
SELECT_KEYS_ACTIVE = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE {ACTIVE} ORDER BY name, created_at"
SELECT_KEY = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1 AND {ACTIVE}"
INSERT_KEY = (
    f"INSERT INTO api_keys ({NEW_KEY_COLUMNS}, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, now())"
)
REVOKE_KEY = f"UPDATE api_keys SET revoked_at = now() WHERE name = $1 AND {ACTIVE}"
SCHEDULE_REVOKE = (
    "UPDATE api_keys SET revoked_at = now() + $2 * INTERVAL '1 second'"
    " WHERE name = $1 AND revoked_at IS NULL"
)
MIGRATE_HINT = "the schema is missing or older than this version: run `incrementer migrate`"
# --database-timeout's default: how long the database may stay silent before a connection is
# given up and the database reported unresponsive (store/pglink.py).
DATABASE_TIMEOUT = 3.0


class PostgresStore:
    """The Store for one PostgreSQL database, over a small asyncpg pool."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        timeout: float = DATABASE_TIMEOUT,
        close_timeout: float = 10.0,
        read_only: bool = False,
    ) -> None:
        self.dsn = dsn
        self.read_only = read_only
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        """Silence allowed on a link (store/pglink.py); half of it bounds one connect."""
        self.command_timeout = statement_timeout(timeout)
        self.close_timeout = close_timeout
        self._where = redact_url(dsn)
        self._pool: Any = None

    async def open(self) -> None:
        """Create the pool and its first connection, so a wrong host or password fails here."""
        connecting = connect_timeout(self.timeout)
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=connecting,
                command_timeout=self.command_timeout,
                server_settings=self._server_settings(),
                connection_class=connection_class(self.timeout),
            )
        except (*DB_ERRORS, ValueError) as exc:
            # ValueError: asyncpg's complaint about a malformed DSN.
            why = (
                f"no answer within the connect timeout ({connecting:g} s)"
                if isinstance(exc, TimeoutError)
                else self._describe(exc)
            )
            raise BackendError(f"cannot connect to PostgreSQL at {self._where}: {why}") from exc

    def _server_settings(self) -> dict[str, str]:
        settings = {"application_name": "incrementer", **server_settings(self.timeout)}
        if self.read_only:
            # The CLI's read-only commands: PostgreSQL itself refuses any write they might make.
            settings["default_transaction_read_only"] = "on"
        return settings

    async def close(self, timeout: float | None = None) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        limit = self.close_timeout if timeout is None else min(timeout, self.close_timeout)
        if limit <= 0:
            pool.terminate()
            return
        try:
            await asyncio.wait_for(pool.close(), limit)
        except TimeoutError:
            pool.terminate()

    async def ping(self) -> None:
        with self._errors():
            async with self._connection() as conn:
                await conn.fetchval("SELECT 1")  # pragma: no mutate

    async def applied_seq(self, node_id: str) -> int:
        with self._errors():
            applied = await self._require_pool().fetchval(SELECT_APPLIED, node_id)
        return int(applied or 0)

    async def apply_batch(
        self,
        node_id: str,
        seq: int,
        deltas: Mapping[str, int],
        keyed: Sequence[IdempotentBatch] = (),
        buckets: Buckets | None = None,
    ) -> ApplyResult:
        """See Store.apply_batch. If the caller is cancelled while COMMIT is in flight the batch
        may be applied: retry it with the same seq, which makes the retry a no-op.

        Round trips per flush: BEGIN, claim the seq, upsert, COMMIT (plus the idempotency keys'
        insert when the batch has keyed batches, the overflow insert when there is one, and,
        with time buckets, an insert of older buckets' deltas when a key has deltas for more
        than one bucket: postgres_buckets.py). Overflow is rare, so it costs nothing until
        PostgreSQL refuses a sum; then the transaction is retried without the offending keys.
        """
        if not 1 <= seq <= INT64_MAX:
            raise ValueError(f"seq must be in 1..{INT64_MAX}, got {seq}")
        if buckets is not None and not buckets.granularities:
            buckets = None
        base = dict(deltas)
        # Keys set aside for overflow: a bucket delta that alone leaves 64 bits, then those an
        # earlier round found overflowing.
        isolated = lone_out_of_range(buckets.deltas) if buckets is not None else set()
        with self._errors():
            async with self._connection() as conn:
                for _ in range(MAX_UPSERT_ROUNDS):
                    upserts, overflowed = _split(base, isolated)
                    # Before BEGIN: locks held less.
                    write = await _prepare(upserts, overflowed, buckets)
                    try:
                        async with _transaction(conn):
                            if not await self._claim(conn, node_id, seq):
                                return ApplyResult(applied=False)
                            duplicates: dict[str, str] = {}
                            if keyed:
                                lost = await self._record_keys(conn, keyed, duplicates)
                                if lost:  # rare: recount without the batches applied before
                                    upserts, overflowed = _split(taken_back(base, lost), isolated)
                                    kept = buckets and _kept(buckets, lost)
                                    write = await _prepare(upserts, overflowed, kept or None)
                            await write.write(conn)
                            if overflowed:
                                await conn.execute(
                                    INSERT_OVERFLOWS,
                                    node_id,
                                    seq,
                                    list(overflowed),
                                    [str(d) for d in overflowed.values()],
                                )
                        return ApplyResult(
                            applied=True, overflowed=overflowed, duplicates=duplicates
                        )
                    except asyncpg.NumericValueOutOfRangeError:
                        isolated |= await write.find_overflows(conn)
        raise BackendError(
            f"PostgreSQL at {self._where}: counters kept overflowing under concurrent writers "
            f"after {MAX_UPSERT_ROUNDS} rounds; the batch will be retried"
        )

    async def _record_keys(
        self, conn: Any, keyed: Sequence[IdempotentBatch], duplicates: dict[str, str]
    ) -> list[IdempotentBatch]:
        """Insert the keyed batches' idempotency keys; the batches applied before (their key
        was there already), whose stored digests go into duplicates."""
        principals, keys = _unscoped_columns(keyed)
        rows = await conn.fetch(
            INSERT_IDEMPOTENCY_KEYS, principals, keys, [b.digest for b in keyed]
        )
        won = {(row[0], row[1]) for row in rows}
        lost = losers(keyed, {b.key for b in keyed if unscoped(b.key) in won})
        if lost:
            found = await conn.fetch(SELECT_IDEMPOTENCY_DIGESTS, *_unscoped_columns(lost))
            stored = {(row[0], row[1]): row[2] for row in found}
            duplicates.update((b.key, stored[unscoped(b.key)]) for b in lost)
        return lost

    async def idempotency_digest(self, key: str, digest: str) -> str | None:
        principal, unscoped_key = unscoped(key)
        with self._errors():
            async with self._connection() as conn:
                found = await conn.fetchval(
                    SELECT_IDEMPOTENCY_DIGEST, principal, unscoped_key, digest
                )
        return None if found is None else str(found)

    async def sweep_idempotency_keys(self, older_than: float) -> int:
        with self._errors():
            status = await self._require_pool().execute(
                SWEEP_IDEMPOTENCY_KEYS, round(older_than * 1000)
            )
        return reads.rows_affected(status)

    async def read(self, key: str, node_id: str) -> KeyRead:
        with self._errors():
            async with self._connection() as conn:
                row = await conn.fetchrow(SELECT_READ, key, node_id)
        value, applied = row[0], row[1]
        return KeyRead(
            value=None if value is None else int(value),
            applied_seq=int(applied or 0),
            overflow=sum_deltas(row[2]),
        )

    async def read_many(
        self, keys: Sequence[str], node_id: str, window: Window | None = None
    ) -> ManyRead:
        with self._errors():
            async with self._connection() as conn:
                return await reads.read_many(conn, keys, node_id, window)

    async def read_series(self, key: str, window: Window, node_id: str) -> SeriesRead:
        with self._errors():
            async with self._connection() as conn:
                return await reads.read_series(conn, key, window, node_id)

    async def list_keys(self, prefix: str, limit: int, after: str | None, node_id: str) -> KeyList:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._errors():
            async with self._connection() as conn:
                return await reads.list_keys(
                    conn, prefix, prefix_upper_bound(prefix), limit, after, node_id
                )

    async def top_keys(
        self, prefix: str, limit: int, scan: int
    ) -> tuple[list[tuple[str, int]], int]:
        with self._errors():
            async with self._connection() as conn:
                return await reads.top_keys(conn, prefix, prefix_upper_bound(prefix), limit, scan)

    async def sweep_buckets(self, length: int, before: int, limit: int) -> int:
        with self._errors():
            async with self._connection() as conn:
                return await reads.sweep(conn, length, before, limit)

    async def api_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        with self._errors():
            rows = await self._require_pool().fetch(
                SELECT_KEYS if include_revoked else SELECT_KEYS_ACTIVE
            )
        return [_api_key(r) for r in rows]

    async def api_key(self, key_id: str) -> ApiKey | None:
        with self._errors():
            row = await self._require_pool().fetchrow(SELECT_KEY, key_id)
        return None if row is None else _api_key(row)

    async def create_api_key(self, key: ApiKey) -> None:
        with self._duplicate_name(key.name), self._errors():
            await _insert_key(self._require_pool(), key)
        await pg_listen.notify(self._require_pool())

    async def revoke_api_key(self, name: str) -> bool:
        with self._errors():
            status = await self._require_pool().execute(REVOKE_KEY, name)
        await pg_listen.notify(self._require_pool())
        return bool(status != "UPDATE 0")

    async def rotate_api_key(self, name: str, new: ApiKey, grace: float) -> bool:
        with self._duplicate_name(name), self._errors():
            async with self._connection() as conn, conn.transaction():
                if await conn.execute(SCHEDULE_REVOKE, name, grace) == "UPDATE 0":
                    return False
                await _insert_key(conn, new)
        await pg_listen.notify(self._require_pool())
        return True

    async def watch_api_keys(self, changed: Callable[[], None]) -> None:
        await pg_listen.listen(self.dsn, self._where, changed, self.timeout)

    @contextmanager
    def _duplicate_name(self, name: str) -> Iterator[None]:
        try:
            yield
        except BackendError as exc:
            if isinstance(exc.__cause__, asyncpg.UniqueViolationError):
                raise DuplicateKeyName(name) from None
            raise

    async def _claim(self, conn: Any, node_id: str, seq: int) -> bool:
        """Advance applied_seq to seq; False if the batch is already applied. One round trip
        once the node's row exists; the first flush of a node (or one whose row was deleted by
        hand) creates it."""
        if await conn.fetchval(CLAIM_SEQ, node_id, seq) is not None:
            return True
        if await conn.fetchval(SELECT_APPLIED, node_id) is not None:
            return False
        await conn.execute(ENSURE_NODE, node_id)
        return await conn.fetchval(CLAIM_SEQ, node_id, seq) is not None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection that is closed instead of handed back when an operation on it
        times out or is cancelled. asyncpg would first send a cancel request over a new
        connection and wait for it, then roll back: against a database that accepts
        connections and never answers, each of those waits the whole command timeout."""
        async with self._require_pool().acquire() as conn:
            try:
                yield conn
            except (TimeoutError, asyncio.CancelledError):
                conn.terminate()
                raise

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open")
        return self._pool

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except DB_ERRORS as exc:
            hint = ""
            if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError):
                hint = f" ({MIGRATE_HINT})"
            raise BackendError(f"PostgreSQL at {self._where}: {self._describe(exc)}{hint}") from exc

    def _describe(self, exc: BaseException) -> str:
        """What failed, never empty: asyncpg's timeouts carry no message of their own."""
        if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
            return f"timed out waiting for an answer (command timeout {self.command_timeout:g} s)"
        return scrub(str(exc), self.dsn) or type(exc).__name__


def _api_key(row: Any) -> ApiKey:
    created, revoked = utc_text(row[5]), utc_text(row[6])  # created_at: NOT NULL
    scopes = scopes_of(row[8])
    return ApiKey(
        row[0], row[1], row[2], row[3], row[4], created, revoked, bool(row[7]), scopes, row[9]
    )


async def _insert_key(conn: Any, key: ApiKey) -> None:
    """On a pool or a connection: both have execute()."""
    await conn.execute(INSERT_KEY, *new_key_values(key))


@asynccontextmanager
async def _transaction(conn: Any) -> AsyncIterator[None]:
    """conn.transaction(), except that after a timeout or a cancellation it does not try to roll
    back on a connection that is not answering: _connection closes it, which rolls back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    except (TimeoutError, asyncio.CancelledError):
        raise
    except BaseException:
        await transaction.rollback()
        raise
    await transaction.commit()


def _split(deltas: dict[str, int], isolated: set[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(the deltas to upsert, the ones to keep in counter_overflows): those of the keys an
    earlier round found overflowing and those that alone leave signed 64-bit. Without either,
    the deltas themselves, uncopied."""
    values = deltas.values()
    if not isolated and (not values or (min(values) >= INT64_MIN and max(values) <= INT64_MAX)):
        return deltas, {}
    upserts: dict[str, int] = {}
    overflowed: dict[str, int] = {}
    for key, delta in deltas.items():
        if key in isolated or not INT64_MIN <= delta <= INT64_MAX:
            overflowed[key] = delta
        else:
            upserts[key] = delta
    return upserts, overflowed


async def _joined(keys: list[str], values: list[int]) -> tuple[str, str] | None:
    """The two texts of UPSERT_COUNTERS_JOINED, built ENCODE_PIECE keys at a time with the event
    loop served in between; None when the arrays must be sent instead: fewer than two keys (one
    gains nothing, and string_to_array('') is an empty array, not {''}), or a key holding the
    separator."""
    if len(keys) < 2:
        return None
    key_texts, value_texts = [], []
    for start in range(0, len(keys), ENCODE_PIECE):
        if start:
            await asyncio.sleep(0)
        piece = keys[start : start + ENCODE_PIECE]
        text = SEPARATOR.join(piece)
        if text.count(SEPARATOR) != len(piece) - 1:
            return None
        key_texts.append(text)
        value_texts.append(",".join(map(str, values[start : start + ENCODE_PIECE])))
    return SEPARATOR.join(key_texts), ",".join(value_texts)


class _TotalsWrite:
    """A flush's upsert of the totals alone (time buckets off)."""

    def __init__(self, upserts: dict[str, int], joined: tuple[str, str] | None) -> None:
        self.keys, self.values = list(upserts), list(upserts.values())
        self.joined = joined

    async def write(self, conn: Any) -> None:
        if self.joined is not None:
            await conn.execute(UPSERT_COUNTERS_JOINED, *self.joined)
        elif self.keys:
            await conn.execute(UPSERT_COUNTERS, self.keys, self.values)

    async def find_overflows(self, conn: Any) -> set[str]:
        return {row[0] for row in await conn.fetch(FIND_OVERFLOWS, self.keys, self.values)}


async def _prepare(
    upserts: dict[str, int], overflowed: dict[str, int], buckets: Buckets | None
) -> _TotalsWrite | BucketedWrite:
    """What the flush transaction will write: the texts are joined here, before BEGIN."""
    if buckets is None:
        return _TotalsWrite(upserts, await _joined(list(upserts), list(upserts.values())))
    kept = Buckets(buckets.granularities, without(buckets.deltas, set(overflowed)))
    bucketed = BucketedWrite(upserts, kept)
    await bucketed.prepare(lambda: _joined(list(upserts), list(upserts.values())))
    return bucketed


def _kept(buckets: Buckets, lost: Sequence[IdempotentBatch]) -> Buckets:
    """The bucket deltas less those of the idempotent batches applied before."""
    return Buckets(
        buckets.granularities, bucket_taken_back(buckets.deltas, [b.buckets for b in lost])
    )


def _unscoped_columns(keyed: Sequence[IdempotentBatch]) -> tuple[list[str], list[str]]:
    """The principals and the keys of scoped idempotency keys, as two columns."""
    pairs = [unscoped(batch.key) for batch in keyed]
    return [p for p, _ in pairs], [k for _, k in pairs]
