"""The one interface every database backend implements.

A batch is a mapping of key -> delta cut from the coalescing buffer at a WAL sequence number.
`apply_batch` applies it exactly once per (node_id, seq): the same transaction that adds the deltas
records the node's `applied_seq`, and a batch at or below that number is skipped.

Idempotent batches (sent with an Idempotency-Key) ride along: their deltas are in the batch's
deltas already, and the same transaction inserts each one's key into `idempotency_keys`. A key
whose insert does not win (the batch was applied before, from this instance or another) has its
batch's deltas taken back out before the counters are written, so each is applied exactly once
per key, wherever and however often it arrived.

With time buckets on, a batch also carries its deltas per time bucket (store/buckets.py: the
layout, and the rule both engines apply), written in the same transaction as the totals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, overload

from incrementer.store.buckets import Buckets, Stored

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


SCOPE_SEPARATOR = "\n"
LEGACY_PRINCIPAL = ""
"""The principal of the idempotency keys stored before keys were scoped (migration 0009), and of
the batches of WAL frames written then: no request has it."""


def scoped(principal: str, key: str) -> str:
    """One principal's Idempotency-Key as this process holds it (ledger, WAL, flush): the
    principal, a newline, the key. A key is visible ASCII only (no newline), so the last newline
    splits the two again, and no two principals' keys can be equal."""
    return principal + SCOPE_SEPARATOR + key


def unscoped(scope: str) -> tuple[str, str]:
    """(principal, key) of a scoped key."""
    principal, _, key = scope.rpartition(SCOPE_SEPARATOR)
    return principal, key


@dataclass(slots=True)
class IdempotentBatch:
    """A batch sent with an Idempotency-Key, held until the flush that settles it."""

    key: str
    """The key scoped by its sender (`scoped`): the database stores the two apart."""
    digest: str
    """Hex SHA-256 of the batch's increments (ingest/idempotency.py)."""
    deltas: dict[str, int]
    """Its increments summed per key (a dict of str and int: never traversed by the cyclic
    garbage collector, however long a database outage keeps it held)."""
    buckets: dict[int, dict[str, int]] = field(default_factory=dict)
    """With time buckets on: its increments per finest bucket start, then per key."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one `apply_batch` call did."""

    applied: bool
    """False when the batch was already applied (seq <= stored applied_seq) and was skipped."""
    overflowed: dict[str, int] = field(default_factory=dict)
    """Keys whose total would leave signed 64-bit; their deltas went to `counter_overflows`."""
    duplicates: dict[str, str] = field(default_factory=dict)
    """Idempotency keys already in the database, with the digest stored there: their batches'
    deltas were taken back, not applied."""


def losers(keyed: Sequence[IdempotentBatch], inserted: set[str]) -> list[IdempotentBatch]:
    """The batches whose key this transaction did not insert: applied before. Of two batches
    with one key in the same flush, only the first can win."""
    lost = []
    claimed: set[str] = set()
    for batch in keyed:
        if batch.key in inserted and batch.key not in claimed:
            claimed.add(batch.key)
        else:
            lost.append(batch)
    return lost


def taken_back(deltas: Mapping[str, int], lost: Sequence[IdempotentBatch]) -> dict[str, int]:
    """deltas without the deltas of the lost batches (a key left at 0 is dropped: only whether
    an empty row gets created differs)."""
    remaining = dict(deltas)
    for batch in lost:
        for key, delta in batch.deltas.items():
            left = remaining.get(key, 0) - delta
            if left:
                remaining[key] = left
            else:
                remaining.pop(key, None)
    return remaining


@dataclass(frozen=True, slots=True)
class KeyRead:
    """A key's persisted value read in the same snapshot as this node's applied_seq."""

    value: int | None
    applied_seq: int
    overflow: int = 0
    """The sum of the key's deltas kept in counter_overflows (0 if none): exact, any size."""


SCOPES = ("write", "read", "admin")
"""What an API key may do (migration 0008): write = the POST routes, read = the GET routes on
counters, admin = /metrics and the details of /readyz. A key made before scopes has them all."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One row of api_keys. key_hash is the hex SHA-256 of the whole key; the key itself is
    never stored. Times are ISO 8601 in UTC (`2026-01-31T12:00:00Z`)."""

    name: str
    key_id: str
    key_hash: str
    rate: float | None = None
    burst: int | None = None
    created_at: str = ""
    revoked_at: str | None = None
    """When the key stops (stopped) working: set by `keys revoke`, or in the future by `keys
    rotate --grace`."""
    active: bool = True
    """Not revoked, or revoked at a time still to come (a rotation's grace period)."""
    scopes: tuple[str, ...] = SCOPES
    """Of SCOPES, in SCOPES' order."""
    prefix: str | None = None
    """Set: the key may only use counters whose names start with it."""


def lone_out_of_range(deltas: Mapping[int, Mapping[str, int]]) -> set[str]:
    """The keys one of whose bucket deltas (bucket start -> key -> delta) alone leaves signed
    64 bits (with negative increments the key's total may not): such a delta cannot be written,
    nor sent to PostgreSQL as a bigint, so both stores set its key aside for counter_overflows
    before writing."""
    return {
        k
        for per_key in deltas.values()
        for k, d in per_key.items()
        if not INT64_MIN <= d <= INT64_MAX
    }


def scopes_text(scopes: tuple[str, ...]) -> str:
    """The scopes as stored: comma-separated, in SCOPES' order."""
    return ",".join(s for s in SCOPES if s in scopes)


# The columns a new API key is inserted with, created_at aside (each engine's own now).
NEW_KEY_COLUMNS = "name, key_id, key_hash, rate, burst, scopes, prefix"


def new_key_values(
    key: ApiKey,
) -> tuple[str, str, str, float | None, int | None, str, str | None]:
    """The values of NEW_KEY_COLUMNS for key, in their order."""
    scopes = scopes_text(key.scopes)
    return (key.name, key.key_id, key.key_hash, key.rate, key.burst, scopes, key.prefix)


def scopes_of(text: str) -> tuple[str, ...]:
    """The stored text's scopes, in SCOPES' order (a name this version does not know is
    dropped: a key never gains a right from an unknown word)."""
    named = set(text.split(","))
    return tuple(s for s in SCOPES if s in named)


@overload
def utc_text(value: datetime | str) -> str: ...
@overload
def utc_text(value: None) -> None: ...
def utc_text(value: datetime | str | None) -> str | None:
    """A database timestamp as ISO 8601 UTC to the second; a value without a zone is UTC. None
    (a column that may be NULL) stays None."""
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sum_deltas(joined: str | None) -> int:
    """The exact sum of comma-joined decimal deltas (counter_overflows.delta), 0 for None."""
    return sum(int(delta) for delta in joined.split(",")) if joined else 0


@dataclass(frozen=True, slots=True)
class SeriesRead:
    """A key's buckets of one granularity over a range, read in one snapshot with its total and
    this node's applied_seq."""

    value: int | None
    """The key's total (None: unknown key)."""
    applied_seq: int
    stored: Stored


@dataclass(frozen=True, slots=True)
class ManyRead:
    """Several keys read in one snapshot with this node's applied_seq."""

    applied_seq: int
    values: dict[str, tuple[int | None, int]]
    """key -> (its total, None if unknown; the sum of its overflowed deltas)."""
    windows: dict[str, Stored] = field(default_factory=dict)
    """With a window (a granularity and a range): key -> its stored buckets in it."""


@dataclass(frozen=True, slots=True)
class KeyList:
    """A page of keys in key order, read in one snapshot with this node's applied_seq."""

    rows: list[tuple[str, int, int]]
    """(key, value, sum of its overflowed deltas)."""
    applied_seq: int


@dataclass(frozen=True, slots=True)
class Window:
    """Buckets of one granularity with starts in [start, end)."""

    length: int
    start: int
    end: int


class DuplicateKeyName(Exception):
    """An API key with that name already exists."""


class BackendError(Exception):
    """The database failed or is unreachable: retry later, the batch is kept."""


class Store(Protocol):
    """A database backend. Implementations: SQLiteStore, PostgresStore."""

    async def open(self) -> None:
        """Connect eagerly so configuration problems show at start, not at the first flush."""

    async def close(self, timeout: float | None = None) -> None:
        """Release connections; past timeout seconds, drop them without waiting (shutdown)."""

    async def ping(self) -> None:
        """Raise BackendError unless the database answers."""

    async def applied_seq(self, node_id: str) -> int:
        """The highest batch seq applied for node_id, 0 if none."""

    async def apply_batch(
        self,
        node_id: str,
        seq: int,
        deltas: Mapping[str, int],
        keyed: Sequence[IdempotentBatch] = (),
        buckets: Buckets | None = None,
    ) -> ApplyResult:
        """Add every delta and record applied_seq=seq in one transaction, unless seq <= applied_seq.

        `keyed` are the idempotent batches whose deltas are among `deltas`: each one's key is
        inserted into `idempotency_keys` in the same transaction, and the deltas of a batch whose
        key is already there are left out (`ApplyResult.duplicates`), from every bucket too.
        `buckets`: the batch's deltas per time bucket, folded into the stored buckets in the
        same transaction (store/buckets.py).
        A key whose new total would leave signed 64-bit (or whose delta alone does) is not added to
        `counters`; its delta is added to `counter_overflows` in the same transaction instead,
        and counts in none of its buckets (so does a key one of whose buckets would leave it).
        Raises BackendError on any database failure; nothing is applied then.
        """

    async def idempotency_digest(self, key: str, digest: str) -> str | None:
        """The digest stored for a scoped idempotency key, or None if the database does not
        have it. A row stored before keys were scoped (LEGACY_PRINCIPAL) under the same key
        counts too, but only when its digest is `digest`: it may be the same batch, sent before
        an upgrade and retried after it; with another digest it is someone else's."""

    async def sweep_idempotency_keys(self, older_than: float) -> int:
        """Delete idempotency keys recorded more than older_than seconds ago; how many."""

    async def read(self, key: str, node_id: str) -> KeyRead:
        """The persisted value of key (None if unknown), its overflowed deltas and node_id's
        applied_seq, one snapshot."""

    async def read_many(
        self, keys: Sequence[str], node_id: str, window: Window | None = None
    ) -> ManyRead:
        """The totals (and overflowed deltas) of keys, with a window also their stored buckets
        in it, and node_id's applied_seq, one snapshot (GET /counters?key=...)."""

    async def read_series(self, key: str, window: Window, node_id: str) -> SeriesRead:
        """A key's stored buckets in the window, its total and node_id's applied_seq, one
        snapshot (GET /counters/{key}/series)."""

    async def list_keys(self, prefix: str, limit: int, after: str | None, node_id: str) -> KeyList:
        """Up to limit keys that start with prefix (and sort after `after`, when given), in key
        order, with their values and overflowed deltas and node_id's applied_seq, one snapshot
        (GET /counters?prefix=...)."""

    async def top_keys(
        self, prefix: str, limit: int, scan: int
    ) -> tuple[list[tuple[str, int]], int]:
        """The limit keys under prefix with the highest values (ties by key), from at most
        `scan` + 1 keys under it; and how many keys were looked at (more than `scan`: the
        answer would be a guess, the caller refuses the prefix). No index on value: it would
        make every flush's update a non-HOT one on PostgreSQL (docs/design.md)."""

    async def sweep_buckets(self, length: int, before: int, limit: int) -> int:
        """Delete at most limit counter_buckets rows of that granularity starting before
        `before` (epoch s); how many went."""

    async def api_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        """API keys ordered by name; revoked ones only when asked."""

    async def api_key(self, key_id: str) -> ApiKey | None:
        """The active key with this key_id, None if there is none (the first request of a key
        created since the last reload of `api_keys`)."""

    async def create_api_key(self, key: ApiKey) -> None:
        """Insert a key; DuplicateKeyName if an unrevoked key has that name (a name whose keys
        are all revoked can be used again)."""

    async def revoke_api_key(self, name: str) -> bool:
        """Revoke every active key of that name now; False if there is none."""

    async def rotate_api_key(self, name: str, new: ApiKey, grace: float) -> bool:
        """In one transaction: schedule the name's unrevoked key to be revoked `grace` seconds
        from now and insert `new` under the same name; False (nothing changed) if the name has
        no unrevoked key."""

    async def watch_api_keys(self, changed: Callable[[], None]) -> None:
        """Until cancelled, call changed() soon after another process may have changed the API
        keys (PostgreSQL: a NOTIFY from the change; SQLite: the file's data_version moved). A
        change it misses is the periodic reload's to find."""


def prefix_upper_bound(prefix: str) -> str | None:
    """The bound such that `prefix <= key < bound` holds exactly for keys starting with prefix.

    Code point order, which is how SQLite and the `counters.key` column on PostgreSQL (COLLATE
    "C", migration 0003) sort text. None when no bound is needed (empty prefix, or nothing but U+10FFFF).
    """
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    nxt = ord(stripped[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:  # pragma: no mutate
        nxt = 0xE000  # surrogates cannot be stored as UTF-8 text
    return stripped[:-1] + chr(nxt)
