"""The coalescing buffer: key -> summed delta since the last cut, plus when it became dirty."""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic


@dataclass(slots=True)
class Batch:
    """Deltas cut from the buffer at WAL sequence number `seq`, applied exactly once."""

    seq: int
    deltas: dict[str, int]
    oldest: float
    """monotonic() time of the oldest increment in the batch: the lag clock starts there."""


class CoalescingBuffer:
    """Sums increments per key. The event loop is single-threaded, so swap() is a clean cut."""

    __slots__ = ("deltas", "oldest")

    def __init__(self) -> None:
        self.deltas: dict[str, int] = {}
        self.oldest = 0.0

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

    def __len__(self) -> int:
        return len(self.deltas)

    def swap(self, seq: int) -> Batch:
        batch = Batch(seq, self.deltas, self.oldest)
        self.deltas = {}
        return batch
