"""SQLite backend: stdlib sqlite3 kept off the event loop.

One writer thread owns the only connection that writes, so flushes from this process queue up
instead of contending for SQLite's single write lock; reads go through a second thread and
connection, which WAL mode lets run alongside a write. Other processes on the same file serialize
on `BEGIN IMMEDIATE` and wait up to busy_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from incrementer.store import sqlite_buckets
from incrementer.store import sqlite_reads as reads
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
    losers,
    new_key_values,
    prefix_upper_bound,
    scopes_of,
    sum_deltas,
    taken_back,
    unscoped,
    utc_text,
)
from incrementer.store.buckets import Buckets
from incrementer.store.buckets import taken_back as bucket_taken_back
from incrementer.store.sqlite_file import DatabaseFile, create_private, watch_data_version

T = TypeVar("T")
R = TypeVar("R")

# Well under SQLite's bound-parameter limit (999 before 3.32), so any build accepts the IN list.
READ_CHUNK = 500

# Timestamps are ISO 8601 text in UTC with a Z (migration 0005); one batch's rows share the
# time of its flush, bound as a parameter, as PostgreSQL's now() is one per transaction.
UPSERT_COUNTER = (
    "INSERT INTO counters (key, value, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)"
    " ON CONFLICT (key) DO UPDATE"
    " SET value = counters.value + excluded.value, updated_at = excluded.updated_at"
)
INSERT_OVERFLOW = (
    "INSERT INTO counter_overflows (node_id, seq, key, delta, created_at) VALUES (?, ?, ?, ?, ?)"
)
UPSERT_NODE = (
    "INSERT INTO incrementer_nodes (node_id, applied_seq, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (node_id) DO UPDATE"
    " SET applied_seq = excluded.applied_seq, updated_at = excluded.updated_at"
)
SELECT_APPLIED = "SELECT applied_seq FROM incrementer_nodes WHERE node_id = ?"
# One statement, so the value, the overflowed deltas and applied_seq come from one snapshot.
# The deltas are decimal text of any size: summed exactly in Python.
SELECT_READ = (
    "SELECT (SELECT value FROM counters WHERE key = ?1),"
    " (SELECT applied_seq FROM incrementer_nodes WHERE node_id = ?2),"
    " (SELECT group_concat(delta, ',') FROM counter_overflows WHERE key = ?1)"
)

# Idempotency keys (migration 0006; scoped by principal since 0009): written by the flush that
# applies their batch, in its transaction, so the insert decides whether the batch's deltas count.
INSERT_IDEMPOTENCY_KEY = (
    "INSERT INTO idempotency_keys (principal, key, digest, created_at)"
    " VALUES (?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
    " ON CONFLICT (principal, key) DO NOTHING"
)
SELECT_IDEMPOTENCY_DIGEST = "SELECT digest FROM idempotency_keys WHERE principal = ? AND key = ?"
# The principal's own row first; a row stored before keys were scoped only with the same digest.
# Two lookups by the primary key, not one OR that would scan the principal's rows.
SELECT_IDEMPOTENCY_LOOKUP = (
    "SELECT digest, 0 FROM idempotency_keys WHERE principal = ?1 AND key = ?2"
    " UNION ALL SELECT digest, 1 FROM idempotency_keys"
    " WHERE principal = '' AND key = ?2 AND digest = ?3"
    " ORDER BY 2 LIMIT 1"
)
# Timestamps are ISO 8601 UTC text of one form (migration 0005): they compare as text.
SWEEP_IDEMPOTENCY_KEYS = (
    "DELETE FROM idempotency_keys WHERE created_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)"
)


NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
ACTIVE = f"(revoked_at IS NULL OR revoked_at > {NOW})"
KEY_COLUMNS = (
    f"name, key_id, key_hash, rate, burst, created_at, revoked_at, {ACTIVE}, scopes, prefix"
)
SELECT_KEYS = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name, created_at"
SELECT_KEYS_ACTIVE = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE {ACTIVE} ORDER BY name, created_at"
SELECT_KEY = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = ? AND {ACTIVE}"
INSERT_KEY = (
    f"INSERT INTO api_keys ({NEW_KEY_COLUMNS}, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, {NOW})"
)
REVOKE_KEY = f"UPDATE api_keys SET revoked_at = {NOW} WHERE name = ? AND {ACTIVE}"
SCHEDULE_REVOKE = (
    "UPDATE api_keys SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)"
    " WHERE name = ? AND revoked_at IS NULL"
)
MIGRATE_HINT = "the schema is missing or older than this version: run `incrementer migrate`"


class SQLiteStore:
    """The Store for one SQLite file."""

    def __init__(self, path: str, busy_timeout: float = 5.0, read_only: bool = False) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.read_only = read_only
        """Only the reading connection, opened read-only: a missing file is an error, not a new
        database (the CLI's `keys list` and `wal inspect`)."""
        self.trace: Callable[[str], None] | None = None
        """Called with every SQL statement the connections run, from their threads; set before
        open() (tests count queries with it)."""
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        # Each connection is only ever touched from its own executor's single thread.
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._file = DatabaseFile(path)

    async def open(self) -> None:
        if self.read_only and not Path(self.path).is_file():
            raise BackendError(
                f"no SQLite database at {self.path} (`incrementer migrate` or the service "
                "creates it)"
            )
        if not self.read_only:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        try:
            if self._writer is not None:
                await self._on(self._writer, self._open_writer)
            await self._on(self._reader, self._open_reader)
        except BaseException:
            await self.close()
            raise

    async def close(self, timeout: float | None = None) -> None:
        # Closing is queued behind any in-flight work, so a running flush finishes first; past
        # timeout (a hung disk) the threads are left to finish on their own.
        loop = asyncio.get_running_loop()
        for executor, attr in ((self._writer, "_write_conn"), (self._reader, "_read_conn")):
            if executor is None:
                continue
            try:
                closing = loop.run_in_executor(executor, self._close_conn, attr)
                await asyncio.wait_for(closing, timeout)
            except TimeoutError:
                pass
            finally:
                executor.shutdown(wait=False)
        self._writer = self._reader = None

    async def ping(self) -> None:
        def ping(conn: sqlite3.Connection) -> None:
            self._file.check()
            conn.execute("SELECT 1").fetchall()

        await self._read(ping)

    async def applied_seq(self, node_id: str) -> int:
        rows = await self._read(lambda conn: conn.execute(SELECT_APPLIED, (node_id,)).fetchall())
        return int(rows[0][0]) if rows else 0

    async def apply_batch(
        self,
        node_id: str,
        seq: int,
        deltas: Mapping[str, int],
        keyed: Sequence[IdempotentBatch] = (),
        buckets: Buckets | None = None,
    ) -> ApplyResult:
        """See Store.apply_batch. If the caller is cancelled the transaction still runs to its end,
        so the batch may be applied: retry it with the same seq, which makes the retry a no-op."""
        if not 1 <= seq <= INT64_MAX:
            raise ValueError(f"seq must be in 1..{INT64_MAX}, got {seq}")
        if buckets is not None and not (buckets.granularities and buckets.deltas):
            buckets = None
        # A copy: the writer thread works on it while the event loop goes on.
        writer = self._require(self._writer)
        work = partial(self._apply, node_id, seq, dict(deltas), list(keyed), buckets)
        return await self._on(writer, work)

    async def idempotency_digest(self, key: str, digest: str) -> str | None:
        principal, unscoped_key = unscoped(key)
        rows = await self._read(
            lambda conn: conn.execute(
                SELECT_IDEMPOTENCY_LOOKUP, (principal, unscoped_key, digest)
            ).fetchall()
        )
        return str(rows[0][0]) if rows else None

    async def sweep_idempotency_keys(self, older_than: float) -> int:
        def sweep() -> int:
            cursor = self._writer_conn().execute(
                SWEEP_IDEMPOTENCY_KEYS, (f"-{older_than} seconds",)
            )
            return int(cursor.rowcount)

        return await self._on(self._require(self._writer), sweep)

    async def read(self, key: str, node_id: str) -> KeyRead:
        rows = await self._read(lambda conn: conn.execute(SELECT_READ, (key, node_id)).fetchall())
        value, applied, overflowed = rows[0]
        return KeyRead(value=value, applied_seq=applied or 0, overflow=sum_deltas(overflowed))

    async def read_many(
        self, keys: Sequence[str], node_id: str, window: Window | None = None
    ) -> ManyRead:
        return await self._read(
            partial(reads.read_many, keys=list(keys), node_id=node_id, window=window)
        )

    async def read_series(self, key: str, window: Window, node_id: str) -> SeriesRead:
        return await self._read(partial(reads.read_series, key=key, window=window, node_id=node_id))

    async def list_keys(self, prefix: str, limit: int, after: str | None, node_id: str) -> KeyList:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return await self._read(
            partial(
                reads.list_keys,
                prefix=prefix,
                upper=prefix_upper_bound(prefix),
                limit=limit,
                after=after,
                node_id=node_id,
            )
        )

    async def top_keys(
        self, prefix: str, limit: int, scan: int
    ) -> tuple[list[tuple[str, int]], int]:
        return await self._read(
            partial(
                reads.top_keys,
                prefix=prefix,
                upper=prefix_upper_bound(prefix),
                limit=limit,
                scan=scan,
            )
        )

    async def sweep_buckets(self, length: int, before: int, limit: int) -> int:
        def sweep() -> int:
            return reads.sweep(self._writer_conn(), length, before, limit)

        return await self._on(self._require(self._writer), sweep)

    async def api_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        sql = SELECT_KEYS if include_revoked else SELECT_KEYS_ACTIVE
        rows = await self._read(lambda conn: conn.execute(sql).fetchall())
        return [_api_key(row) for row in rows]

    async def api_key(self, key_id: str) -> ApiKey | None:
        rows = await self._read(lambda conn: conn.execute(SELECT_KEY, (key_id,)).fetchall())
        return _api_key(rows[0]) if rows else None

    async def create_api_key(self, key: ApiKey) -> None:
        def insert() -> None:
            _insert_key(self._writer_conn(), key)

        await self._on(self._require(self._writer), insert)

    async def revoke_api_key(self, name: str) -> bool:
        def revoke() -> bool:
            return self._writer_conn().execute(REVOKE_KEY, (name,)).rowcount > 0

        return await self._on(self._require(self._writer), revoke)

    async def rotate_api_key(self, name: str, new: ApiKey, grace: float) -> bool:
        def rotate() -> bool:
            conn = self._writer_conn()
            conn.execute("BEGIN IMMEDIATE")  # pragma: no mutate
            try:
                scheduled = conn.execute(SCHEDULE_REVOKE, (f"+{grace} seconds", name)).rowcount
                if scheduled:
                    _insert_key(conn, new)
            except BaseException:
                # Keyword case and the error suppressed change nothing a test can see: the
                # rollback of a transaction that failed, whose own error is the one raised.
                with contextlib.suppress(sqlite3.Error):  # pragma: no mutate
                    conn.execute("ROLLBACK")  # pragma: no mutate
                raise
            conn.execute("COMMIT" if scheduled else "ROLLBACK")  # pragma: no mutate
            return scheduled > 0

        return await self._on(self._require(self._writer), rotate)

    async def watch_api_keys(self, changed: Callable[[], None]) -> None:
        await watch_data_version(self._read, changed)

    def _writer_conn(self) -> sqlite3.Connection:
        return self._require(self._write_conn)

    @staticmethod
    def _require(part: R | None) -> R:
        """An executor or connection that exists only while the store is open."""
        if part is None:
            raise RuntimeError("SQLiteStore is not open")
        return part

    # --- running on the executor threads -------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the stdlib must not open transactions behind our back; apply
        # issues BEGIN IMMEDIATE itself so the write lock is taken before anything is read.
        # timeout= is SQLite's busy_timeout: wait that long for another process's write lock.
        if self.read_only:
            # mode=ro: never create the file (a plain connect would, empty, at a mistyped path).
            uri = f"file:{quote(self.path)}?mode=ro"
            conn = sqlite3.connect(uri, timeout=self.busy_timeout, isolation_level=None, uri=True)
        else:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        conn.set_trace_callback(self.trace)
        return conn

    def _open_writer(self) -> None:
        check_directory(self.path)
        create_private(self.path)
        conn = self._connect()
        self._write_conn = conn
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]  # pragma: no mutate
        if str(mode).lower() != "wal":
            raise BackendError(f"SQLite {self.path}: cannot enable WAL mode (got {mode!r})")
        # FULL fsyncs the WAL at every commit. NORMAL would survive a process crash but could lose
        # the last flushes on power loss, while the flusher has already released their batch
        # (and the WAL may be recycled): a committed flush must stay committed.
        conn.execute("PRAGMA synchronous = FULL")  # pragma: no mutate
        self._file.remember()

    def _open_reader(self) -> None:
        conn = self._connect()
        self._read_conn = conn
        conn.execute("PRAGMA query_only = 1")
        conn.execute("SELECT 1").fetchall()  # pragma: no mutate

    def _close_conn(self, attr: str) -> None:
        conn: sqlite3.Connection | None = getattr(self, attr)
        setattr(self, attr, None)
        if conn is not None:
            conn.close()

    def _apply(
        self,
        node_id: str,
        seq: int,
        deltas: dict[str, int],
        keyed: list[IdempotentBatch],
        buckets: Buckets | None,
    ) -> ApplyResult:
        conn = self._writer_conn()
        self._file.check()
        now = _utc_now()
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute(SELECT_APPLIED, (node_id,)).fetchall()
            if rows and seq <= rows[0][0]:
                conn.execute("ROLLBACK")
                return ApplyResult(applied=False)
            duplicates: dict[str, str] = {}
            if keyed:
                inserted = {
                    batch.key
                    for batch in keyed
                    if conn.execute(
                        INSERT_IDEMPOTENCY_KEY, (*unscoped(batch.key), batch.digest)
                    ).rowcount
                }
                lost = losers(keyed, inserted)
                if lost:
                    deltas = taken_back(deltas, lost)
                    if buckets is not None:
                        kept = bucket_taken_back(buckets.deltas, [b.buckets for b in lost])
                        buckets = Buckets(buckets.granularities, kept)
                    for batch in lost:
                        found = conn.execute(
                            SELECT_IDEMPOTENCY_DIGEST, unscoped(batch.key)
                        ).fetchall()
                        duplicates[batch.key] = str(found[0][0])
            current = _current_values(conn, list(deltas))
            upserts: list[tuple[str, int, str]] = []
            overflowed: dict[str, int] = {}
            for key, delta in deltas.items():
                # The write lock is held, so `current` is exact until COMMIT. Deciding here is what
                # keeps values integers: SQLite turns an overflowing integer sum into a REAL.
                total = current.get(key, 0) + delta
                if INT64_MIN <= delta <= INT64_MAX and INT64_MIN <= total <= INT64_MAX:
                    upserts.append((key, delta, now))
                else:
                    overflowed[key] = delta
            if buckets is not None:
                written = sqlite_buckets.write(conn, buckets, deltas, overflowed, now)
                upserts = [u for u in upserts if u[0] not in written and u[0] not in overflowed]
            conn.executemany(UPSERT_COUNTER, upserts)
            conn.executemany(
                INSERT_OVERFLOW, [(node_id, seq, k, str(d), now) for k, d in overflowed.items()]
            )
            conn.execute(UPSERT_NODE, (node_id, seq, now))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                # The original error is the one worth reporting; a failed rollback adds nothing.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return ApplyResult(applied=True, overflowed=overflowed, duplicates=duplicates)

    # --- plumbing -----------------------------------------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        # fetchall() in every query: a half-read cursor would pin its snapshot and starve the
        # WAL checkpoint.
        def run() -> T:
            return query(self._require(self._read_conn))

        return await self._on(self._require(self._reader), run)

    async def _on(self, executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn)
        except (sqlite3.Error, OSError) as exc:
            hint = f" ({MIGRATE_HINT})" if "no such table" in str(exc) else ""
            raise BackendError(f"SQLite {self.path}: {exc}{hint}") from exc


def _utc_now() -> str:
    """Now in the form of migration 0005's SQLite timestamps: ISO 8601, milliseconds, Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _api_key(row: tuple[Any, ...]) -> ApiKey:
    name, key_id, key_hash, rate, burst, created_at, revoked_at, active, scopes, prefix = row
    created, revoked = utc_text(created_at), utc_text(revoked_at)  # created_at: NOT NULL
    return ApiKey(
        name,
        key_id,
        key_hash,
        rate,
        burst,
        created,
        revoked,
        bool(active),
        scopes_of(scopes),
        prefix,
    )


def _insert_key(conn: sqlite3.Connection, key: ApiKey) -> None:
    try:
        conn.execute(INSERT_KEY, new_key_values(key))
    except sqlite3.IntegrityError:
        raise DuplicateKeyName(key.name) from None


def _current_values(conn: sqlite3.Connection, keys: list[str]) -> dict[str, int]:
    current: dict[str, int] = {}
    for start in range(0, len(keys), READ_CHUNK):
        chunk = keys[start : start + READ_CHUNK]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT key, value FROM counters WHERE key IN ({marks})"
        current.update(conn.execute(sql, chunk).fetchall())
    return current


def check_directory(path: str) -> None:
    """The directory an SQLite database is to be created in must exist: only the file is
    created, so a mistyped directory is refused rather than quietly made, with an empty
    database of counters in it."""
    directory = Path(path).parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise BackendError(
            f"SQLite database {path}: its directory {directory} {what} (incrementer creates "
            "the database file, never directories: create it, or correct the path)"
        )
