"""A WAL frame put back into a coalescing buffer as the intake had put it: what a start-up
replays and what a drain (node/retire.py) applies.

Totals always. Buckets when the frame has times (it was written with --buckets on) and buckets
are kept now: each increment back in the bucket it was counted in. A frame written with buckets
off, or one read while they are off, goes to the totals only: an increment counts in a bucket
only if it was counted in one when it was accepted, and only while buckets are kept.
"""

from __future__ import annotations

from incrementer.ingest.buffer import CoalescingBuffer
from incrementer.ingest.wal_reader import Frame
from incrementer.store.base import IdempotentBatch


def replay_frame(buffer: CoalescingBuffer, frame: Frame, finest: int) -> list[IdempotentBatch]:
    """Add the frame's increments to the buffer and keep its idempotent batches (returned: the
    caller holds their keys). `finest`: the finest kept bucket length, 0 with buckets off."""
    timed = bool(finest and frame.times)
    if timed:
        for (key, value), at_ms in zip(frame.entries, frame.times, strict=True):
            buffer.add(key, value)
            seconds = at_ms // 1000
            into = buffer.bucket(seconds - seconds % finest)
            into[key] = into.get(key, 0) + value
    else:
        for key, value in frame.entries:
            buffer.add(key, value)
    kept = []
    for keyed in frame.batches:
        deltas: dict[str, int] = {}
        for key, value in keyed.entries:
            deltas[key] = deltas.get(key, 0) + value
        batch = IdempotentBatch(keyed.key, keyed.digest, deltas)
        if timed:
            for (key, value), at_ms in zip(keyed.entries, keyed.times, strict=True):
                seconds = at_ms // 1000
                per_key = batch.buckets.setdefault(seconds - seconds % finest, {})
                per_key[key] = per_key.get(key, 0) + value
        buffer.keep(batch)
        kept.append(batch)
    return kept
