"""Accepting validated increments: memory budget, then WAL append, then the coalescing buffer."""

from __future__ import annotations

from time import monotonic

from incrementer.ingest.buffer import CoalescingBuffer
from incrementer.ingest.validate import Validated
from incrementer.ingest.wal import SequencedLog
from incrementer.metrics import Metrics


class Overloaded(Exception):
    """Too many distinct unflushed keys: shed load (503 + Retry-After) instead of growing."""


class Intake:
    __slots__ = ("buffer", "key_budget", "max_pending_keys", "metrics", "wal")

    def __init__(
        self, buffer: CoalescingBuffer, wal: SequencedLog, max_pending_keys: int, metrics: Metrics
    ) -> None:
        self.buffer = buffer
        self.wal = wal
        self.max_pending_keys = max_pending_keys
        self.key_budget = max_pending_keys
        """Distinct keys the buffer may hold; the flusher lowers it by the batch in flight."""
        self.metrics = metrics

    def accept(self, item: Validated) -> None:
        key_bytes, key, value = item
        buffer = self.buffer
        deltas = buffer.deltas
        # A key already pending costs no memory, so only new keys are shed.
        if len(deltas) >= self.key_budget and key not in deltas:
            raise Overloaded
        self.wal.append(key_bytes, value)
        # CoalescingBuffer.add, inlined: this runs once per request.
        if not deltas:
            buffer.oldest = monotonic()
        deltas[key] = deltas.get(key, 0) + value
        self.metrics.accepted_increments += 1

    def accept_many(self, items: list[Validated]) -> None:
        """All or nothing: the budget is checked for the whole batch before anything is added."""
        buffer = self.buffer
        deltas = buffer.deltas
        if len(deltas) + len(items) > self.key_budget:  # only then count the keys that are new
            new_keys = {key for _, key, _ in items if key not in deltas}
            if len(deltas) + len(new_keys) > self.key_budget:
                raise Overloaded
        if not deltas:
            buffer.oldest = monotonic()
        append = self.wal.append
        get = deltas.get
        for key_bytes, key, value in items:
            append(key_bytes, value)
            deltas[key] = get(key, 0) + value
        self.metrics.accepted_increments += len(items)
