"""The one interface every database backend implements.

A batch is a mapping of key -> delta cut from the coalescing buffer at a WAL sequence number.
`apply_batch` applies it exactly once per (node_id, seq): the same transaction that adds the deltas
records the node's `applied_seq`, and a batch at or below that number is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one `apply_batch` call did."""

    applied: bool
    """False when the batch was already applied (seq <= stored applied_seq) and was skipped."""
    overflowed: dict[str, int] = field(default_factory=dict)
    """Keys whose total would leave signed 64-bit; their deltas went to `counter_overflows`."""


@dataclass(frozen=True, slots=True)
class KeyRead:
    """A key's persisted value read in the same snapshot as this node's applied_seq."""

    value: int | None
    applied_seq: int
    overflow: int = 0
    """The sum of the key's deltas kept in counter_overflows (0 if none): exact, any size."""


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


def utc_text(value: datetime | str | None) -> str | None:
    """A database timestamp as ISO 8601 UTC to the second; a value without a zone is UTC."""
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sum_deltas(joined: str | None) -> int:
    """The exact sum of comma-joined decimal deltas (counter_overflows.delta), 0 for None."""
    return sum(int(delta) for delta in joined.split(",")) if joined else 0


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

    async def apply_batch(self, node_id: str, seq: int, deltas: Mapping[str, int]) -> ApplyResult:
        """Add every delta and record applied_seq=seq in one transaction, unless seq <= applied_seq.

        A key whose new total would leave signed 64-bit (or whose delta alone does) is not added to
        `counters`; its delta is added to `counter_overflows` in the same transaction instead.
        Raises BackendError on any database failure; nothing is applied then.
        """

    async def read(self, key: str, node_id: str) -> KeyRead:
        """The persisted value of key (None if unknown), its overflowed deltas and node_id's
        applied_seq, one snapshot."""

    async def list_keys(self, prefix: str, limit: int) -> list[tuple[str, int]]:
        """Up to limit (key, value) pairs whose key starts with prefix, ordered by key."""

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
