"""The coalescing buffer: key -> summed delta since the last cut, plus when it became dirty; with
time buckets on, also (bucket start -> key -> summed delta), the second coalescing key."""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic

from incrementer.store.base import IdempotentBatch


@dataclass(slots=True)
class Batch:
    """Deltas cut from the buffer at WAL sequence number `seq`, applied exactly once."""

    seq: int
    deltas: dict[str, int]
    oldest: float
    """monotonic() time of the oldest increment in the batch: the lag clock starts there."""
    keyed: list[IdempotentBatch]
    """The idempotent batches whose deltas are in `deltas`: each counts only if its key's insert
    wins in the flush transaction."""
    held: int
    """Deltas held in `keyed` (memory the intake's budget counts)."""
    buckets: dict[int, dict[str, int]]
    """With time buckets on: start of the finest bucket (s) -> key -> delta, every increment
    of `deltas` that was counted in a bucket."""


class CoalescingBuffer:
    """Sums increments per key. The event loop is single-threaded, so swap() is a clean cut.

    An idempotent batch's deltas are summed in like any others (whether they count is settled
    only in the flush transaction, which takes them back out if its key was applied before) and
    the batch is kept in `keyed` until then.
    """

    __slots__ = ("buckets", "current", "deltas", "held", "keyed", "oldest", "owners")

    def __init__(self) -> None:
        self.deltas: dict[str, int] = {}
        self.oldest = 0.0
        self.keyed: list[IdempotentBatch] = []
        self.held = 0
        self.owners: dict[str, int] = {}
        """Client (API key name or IP) -> the keys of `deltas` it made pending: what the
        intake holds against each client's share (Intake.client_share)."""
        self.buckets: dict[int, dict[str, int]] = {}
        self.current: dict[str, int] = {}
        """The bucket the open WAL frame's increments are counted in (arrival time): the
        intake sets it when it stamps a frame (Intake.stamp)."""

    def bucket(self, start: int) -> dict[str, int]:
        """The deltas of the finest bucket starting at `start` (s), made when first needed."""
        found = self.buckets.get(start)
        if found is None:
            found = self.buckets[start] = {}
        return found

    def add(self, key: str, value: int) -> None:
        deltas = self.deltas
        if not deltas:
            self.oldest = monotonic()
        deltas[key] = deltas.get(key, 0) + value

    def add_many(self, items: list[tuple[bytes, str, int]]) -> None:
        """add(key, value) of every (key bytes, key, value), in one call."""
        deltas = self.deltas
        if not deltas and items:
            self.oldest = monotonic()
        get = deltas.get
        for _, key, value in items:
            deltas[key] = get(key, 0) + value

    def add_keyed(
        self,
        key: str,
        digest: str,
        items: list[tuple[bytes, str, int]],
        starts: list[int] | None = None,
    ) -> IdempotentBatch:
        """add_many() of an idempotent batch's increments, summed per key into the batch kept
        until its flush as well, in the same pass. `starts`: with time buckets on, the bucket
        each item is counted in (its deltas are kept per bucket in the batch too, so a flush
        that finds the batch applied before takes them back out of every bucket)."""
        deltas = self.deltas
        if not deltas and items:
            self.oldest = monotonic()
        own: dict[str, int] = {}
        get = deltas.get
        own_get = own.get
        for _, name, value in items:
            deltas[name] = get(name, 0) + value
            own[name] = own_get(name, 0) + value
        batch = IdempotentBatch(key, digest, own)
        if starts is not None:
            for (_, name, value), start in zip(items, starts, strict=True):
                into = self.bucket(start)
                into[name] = into.get(name, 0) + value
                mine = batch.buckets.get(start)
                if mine is None:
                    mine = batch.buckets[start] = {}
                mine[name] = mine.get(name, 0) + value
        self.keep(batch)
        return batch

    def keep(self, batch: IdempotentBatch) -> None:
        """Keep an idempotent batch whose deltas are summed in already (WAL replay)."""
        self.keyed.append(batch)
        self.held += len(batch.deltas)

    def __len__(self) -> int:
        return len(self.deltas)

    def swap(self, seq: int) -> Batch:
        """Cut the batch at seq, right after the WAL sealed its frame (the next frame is
        stamped afresh, which points `current` into the new buckets)."""
        batch = Batch(seq, self.deltas, self.oldest, self.keyed, self.held, self.buckets)
        self.deltas = {}
        self.keyed = []
        self.held = 0
        self.owners = {}
        self.buckets = {}
        self.current = {}
        return batch
