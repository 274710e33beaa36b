"""The bucketed flush on SQLite: store/buckets.py's fold, run in Python under the write lock.

The flush holds SQLite's one write lock (BEGIN IMMEDIATE) from its first read to its commit, so
the inline buckets read here are the ones its writes replace: the rows get their new inline
buckets as values, the totals still as deltas. Overflow is decided here too, since SQLite would
turn an integer sum past 64 bits into a REAL: a key whose total or one of whose buckets would
leave signed 64-bit is isolated, its delta kept in counter_overflows and counted in no bucket.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from incrementer.store.base import INT64_MAX, INT64_MIN, lone_out_of_range
from incrementer.store.buckets import EMPTY, Buckets, Folded, Slot, columns, fold, without

# Well under SQLite's bound-parameter limit (999 before 3.32), so any build accepts the IN list.
READ_CHUNK = 500
SELECT_CELL = (
    "SELECT value FROM counter_buckets WHERE key = ? AND granularity = ? AND bucket_start = ?"
)
UPSERT_CELL = (
    "INSERT INTO counter_buckets (key, granularity, bucket_start, value) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (key, granularity, bucket_start) DO UPDATE"
    " SET value = counter_buckets.value + excluded.value"
)


def write(
    conn: sqlite3.Connection,
    buckets: Buckets,
    deltas: Mapping[str, int],
    overflowed: dict[str, int],
    now: str,
) -> set[str]:
    """Fold the batch's bucket deltas into the stored buckets and write them with the totals
    of their keys; keys isolated here are added to `overflowed`. Returns the keys whose total
    was written here (the caller writes the others)."""
    lengths = buckets.granularities
    kept = without(buckets.deltas, set(overflowed))
    # Spares a fold: the loop below would find these keys too (SQLite takes any Python int here).
    alone = lone_out_of_range(kept)  # pragma: no mutate
    if alone:
        _isolate(alone, deltas, overflowed)
        kept = without(kept, alone)
    keys = list(set().union(*(per_key.keys() for per_key in kept.values())))
    current = _inline(conn, lengths, keys)
    while True:
        folded = fold(lengths, current, kept)
        bad = {k for k, slots in folded.inline.items() if not all(_fits(v) for _, v in slots)}
        # A counter_buckets row can leave 64 bits while its key's total fits, whatever the signs
        # in this batch: a negative delta of an earlier flush may have left the total below it.
        # (A rolled bucket is a new row; only late deltas' rows are read.)
        bad |= _overflowing_cells(conn, folded)
        if not bad:
            break
        _isolate(bad, deltas, overflowed)
        kept = without(kept, bad)
    names = [columns(length) for length in lengths]
    assigned = ", ".join(f"{s} = excluded.{s}, {v} = excluded.{v}" for s, v in names)
    inline_columns = ", ".join(f"{s}, {v}" for s, v in names)
    marks = ", ".join("?" * (4 + 2 * len(lengths)))
    conn.executemany(
        f"INSERT INTO counters (key, value, created_at, updated_at, {inline_columns})"
        f" VALUES ({marks}) ON CONFLICT (key) DO UPDATE"
        f" SET value = counters.value + excluded.value, updated_at = excluded.updated_at,"
        f" {assigned}",
        [
            (key, deltas.get(key, 0), now, now, *(x for slot in slots for x in slot))
            for key, slots in folded.inline.items()
        ],
    )
    conn.executemany(UPSERT_CELL, [(*cell, delta) for cell, delta in folded.cells.items()])
    return set(folded.inline)


def _isolate(keys: set[str], deltas: Mapping[str, int], overflowed: dict[str, int]) -> None:
    for key in keys:
        if key in deltas:
            overflowed[key] = deltas[key]


def _inline(
    conn: sqlite3.Connection, lengths: tuple[int, ...], keys: list[str]
) -> dict[str, list[Slot]]:
    """The stored inline buckets of keys (those without any: absent)."""
    selected = ", ".join("{}, {}".format(*columns(length)) for length in lengths)
    found: dict[str, list[Slot]] = {}
    for start in range(0, len(keys), READ_CHUNK):
        chunk = keys[start : start + READ_CHUNK]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT key, {selected} FROM counters WHERE key IN ({marks})", chunk
        ).fetchall()
        for row in rows:
            found[row[0]] = [
                EMPTY if row[1 + 2 * i] is None else (row[1 + 2 * i], row[2 + 2 * i])
                for i in range(len(lengths))
            ]
    return found


def _overflowing_cells(conn: sqlite3.Connection, folded: Folded) -> set[str]:
    """The keys one of whose counter_buckets rows would leave 64 bits with this batch's deltas:
    a late cell's row looked up by its primary key, a rolled cell new."""
    bad = set()
    for cell, delta in folded.cells.items():
        row = conn.execute(SELECT_CELL, cell).fetchone() if cell in folded.late else None
        if not _fits((row[0] if row else 0) + delta):
            bad.add(cell[0])
    return bad


def _fits(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX
