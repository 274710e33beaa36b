"""Time buckets in the database, whichever engine: the layout, and how a flush folds a batch's
bucket deltas into it.

The layout (migration 0007). For each kept granularity, the bucket a key counted in last lives
in the key's own `counters` row, the *inline* bucket (`minute_start`, `minute_value`, ...), and
is written by the same upsert that adds to the total. Every other bucket is a row of
`counter_buckets (key, granularity, bucket_start, value)`. When a key's next delta falls in a
later bucket, the inline one *rolls*: its value moves to counter_buckets and the inline bucket
starts again from the new delta. A delta for an earlier bucket than the inline one (an
increment sent with its own "at", or one counted by a node whose clock is behind another's) is
added to counter_buckets directly. So a bucket holds its counter_buckets row plus the inline
value when the inline bucket is that one: `Stored.value_of`.

Why this layout, measured (bench/buckets.py, docs/performance.md): a flush that wrote one row
per granularity beside each total (four rows for minute, hour and day) managed 0.13x the keys
per second of totals alone on PostgreSQL, and writing only the minute bucket (for roll-ups
later, not counted) 0.36x; inline, 0.62x. A flush writes one row per key, wider, plus a row
when a bucket rolls: about once a minute per key, where a busy key is flushed many times a
minute.
counter_buckets is then written about once per key and bucket, so its primary key can carry
`value` (INCLUDE) at little cost: a series is read from the index alone.

Every write happens inside the flush transaction, under the row lock of the key's counters row
(the upsert takes it before any counter_buckets row of that key is written): exactly once, as
the totals are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from incrementer.periods import NAMES

Slot = tuple[int | None, int]
"""An inline bucket as stored: (its start, or None when the key has none yet; its value)."""
EMPTY: Final[Slot] = (None, 0)
"""No inline bucket of that granularity. The start and value columns are written together, so
a row's value is set exactly when its start is."""
Cell = tuple[str, int, int]
"""A counter_buckets row's key: (counter key, granularity in seconds, bucket start)."""


def columns(length: int) -> tuple[str, str]:
    """The counters columns holding a granularity's inline bucket: (start, value)."""
    name = NAMES[length]
    return f"{name}_start", f"{name}_value"


@dataclass(frozen=True, slots=True)
class Buckets:
    """A batch's bucket deltas, as a flush hands them to the store."""

    granularities: tuple[int, ...]
    """The kept bucket lengths in seconds, ascending."""
    deltas: Mapping[int, Mapping[str, int]]
    """Start of the finest kept bucket (s) -> key -> delta. Every delta here is part of the
    batch's total delta for its key; a total may hold more (increments counted with buckets
    off, replayed from an older WAL)."""


@dataclass(slots=True)
class Folded:
    """What a batch's bucket deltas do to the stored buckets (`fold`)."""

    inline: dict[str, list[Slot]]
    """The new inline buckets of each key with bucket deltas, one slot per granularity."""
    cells: dict[Cell, int]
    """Deltas to add to counter_buckets rows (never 0)."""
    late: set[Cell]
    """The cells that took a delta for a bucket before the inline one: only those can have a
    row already. A rolled cell is a new row (the inline bucket only moves forward, so no row
    of its start was written before it rolled), holding just the value it rolled with."""


def fold(
    lengths: Sequence[int],
    current: Mapping[str, Sequence[Slot]],
    deltas: Mapping[int, Mapping[str, int]],
) -> Folded:
    """Apply bucket deltas (finest start -> key -> delta) to the inline buckets `current` holds
    (a key missing from it has none yet), finest start by finest start, oldest first: the rule
    both engines follow (the PostgreSQL upsert in SQL, SQLite here)."""
    inline: dict[str, list[Slot]] = {}
    cells: dict[Cell, int] = {}
    late: set[Cell] = set()
    empty: list[Slot] = [EMPTY] * len(lengths)
    for finest in sorted(deltas):
        starts = [finest - finest % length for length in lengths]
        for key, delta in deltas[finest].items():
            slots = inline.get(key)
            if slots is None:
                slots = inline[key] = list(current.get(key) or empty)
            for i, start in enumerate(starts):
                kept, value = slots[i]
                if kept is None:
                    slots[i] = (start, delta)
                elif start == kept:
                    slots[i] = (start, value + delta)
                elif start > kept:
                    _add(cells, (key, lengths[i], kept), value)
                    slots[i] = (start, delta)
                else:
                    cell = (key, lengths[i], start)
                    late.add(cell)
                    _add(cells, cell, delta)
    return Folded(inline, cells, late)


def _add(cells: dict[Cell, int], cell: Cell, delta: int) -> None:
    total = cells.get(cell, 0) + delta
    if total:
        cells[cell] = total
    else:
        cells.pop(cell, None)


def uniform(deltas: Mapping[str, int], buckets: Buckets) -> int | None:
    """The one finest start of a batch whose every delta was counted in that bucket (its
    bucket deltas are its deltas): the common case, one upsert with the totals' own texts.
    None otherwise (a batch across a bucket boundary, increments with an "at" of their own,
    or totals with deltas counted with buckets off)."""
    if len(buckets.deltas) != 1:
        return None
    start, only = next(iter(buckets.deltas.items()))
    return start if only == deltas else None


def without(deltas: Mapping[int, Mapping[str, int]], keys: set[str]) -> dict[int, dict[str, int]]:
    """The bucket deltas less those of `keys` (keys isolated for overflow: their deltas go to
    counter_overflows and count in no bucket, so buckets still sum to the in-range value)."""
    kept = {}
    for start, per_key in deltas.items():
        left = {k: d for k, d in per_key.items() if k not in keys}
        if left:
            kept[start] = left
    return kept


def taken_back(
    deltas: Mapping[int, Mapping[str, int]], lost: Sequence[Mapping[int, Mapping[str, int]]]
) -> dict[int, dict[str, int]]:
    """The bucket deltas less those of the idempotent batches applied before (store/base.py's
    taken_back, bucket by bucket)."""
    remaining = {start: dict(per_key) for start, per_key in deltas.items()}
    for batch in lost:
        for start, per_key in batch.items():
            into = remaining.get(start)
            if into is None:
                continue
            for key, delta in per_key.items():
                left = into.get(key, 0) - delta
                if left:
                    into[key] = left
                else:
                    into.pop(key, None)
    return {start: per_key for start, per_key in remaining.items() if per_key}


@dataclass(frozen=True, slots=True)
class Stored:
    """One key's stored buckets of one granularity over a range: what a series read sees."""

    cells: dict[int, int]
    """counter_buckets rows in the range: start -> value."""
    inline: Slot
    """The key's inline bucket of that granularity (start None: none)."""

    def points(self) -> dict[int, int]:
        """start -> value of every stored bucket in the range that holds anything, the inline
        bucket added to its counter_buckets row (the caller keeps only starts in the range)."""
        points = dict(self.cells)
        start, value = self.inline
        if start is not None and value:
            points[start] = points.get(start, 0) + value
        return points
