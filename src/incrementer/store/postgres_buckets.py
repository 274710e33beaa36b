"""The bucketed flush on PostgreSQL: totals and time buckets in one upsert.

What is stored and why is store/buckets.py's. Here, one statement per flush locks each key's
counters row (in key order, as the totals-only upsert does), adds the key's delta to its total
and to its inline bucket of each granularity, or rolls the inline bucket, and moves what left
the row (`<g>_out_start`, `<g>_out_value`, read back through RETURNING) into counter_buckets;
then, if the batch holds deltas for more than one bucket of a key, the older ones are added to
counter_buckets. Two shapes of the statement:

- uniform: every delta of the batch was counted in one bucket (a batch within one minute, the
  common case). The keys and values travel as the same two joined texts as the totals, the
  bucket starts as parameters: no more work on the event loop than a flush without buckets.
- general: any other batch. Per key its total and, per granularity, the newest bucket it has a
  delta for; store/buckets.py's `fold` computes them (on a thread when the batch is large).

Both apply store/buckets.py's rule: for a key with deltas for buckets b1 < b2, adding b1 to
counter_buckets directly and then b2 through the upsert ends exactly where folding b1 then b2
into the inline bucket does, whatever bucket the row held. SQL within the distributed engines'
means (docs/operations.md): a data-modifying CTE feeding an INSERT ... SELECT, CASE, unnest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import cache
from typing import Any

from incrementer.periods import NAMES
from incrementer.store.base import INT64_MAX, INT64_MIN
from incrementer.store.buckets import EMPTY, Buckets, Slot, columns, fold, uniform

# Separator of the joined texts (postgres.py's SEPARATOR); a key holding it goes as arrays.
SEPARATOR = "\x1f"
# A general batch of more keys than this is folded on a thread, off the event loop.
FOLD_ON_THREAD = 4096

INSERT_CELLS = (
    "INSERT INTO counter_buckets (key, granularity, bucket_start, value)"
    " SELECT k, g, s, v FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::bigint[])"
    " AS t(k, g, s, v) ORDER BY 1, 2, 3"
    " ON CONFLICT (key, granularity, bucket_start)"
    " DO UPDATE SET value = counter_buckets.value + excluded.value"
)


# The bucketed upsert, filled in by _statement for the granularities kept.
UPSERT = (
    "WITH up AS ("
    "INSERT INTO counters AS c (key, value, created_at, updated_at, {insert_columns})"
    " SELECT k, v, now(), now(), {bucket_values} FROM {source}"
    ' ORDER BY k COLLATE "C"'
    " ON CONFLICT (key) DO UPDATE SET value = c.value + excluded.value,"
    " updated_at = excluded.updated_at, {sets}"
    " RETURNING key, {outs})"
    " INSERT INTO counter_buckets (key, granularity, bucket_start, value)"
    " SELECT up.key, x.g, x.s, x.v FROM up CROSS JOIN LATERAL (VALUES {moved}) AS x(g, s, v)"
    " WHERE ({any_moved}) AND x.s IS NOT NULL AND x.v <> 0 ORDER BY 1, 2, 3"
    " ON CONFLICT (key, granularity, bucket_start)"
    " DO UPDATE SET value = counter_buckets.value + excluded.value"
)
# One granularity's bucket moved out of a row: (granularity, start, value) of the row `up`.
MOVED = "({}, up.{}, up.{})"
# The stored values of the older buckets a flush adds to (overflow check).
SELECT_CELLS = (
    "SELECT t.k, t.g, t.s, b.value FROM unnest($1::text[], $2::integer[], $3::bigint[])"
    " AS t(k, g, s) JOIN counter_buckets AS b"
    " ON b.key = t.k AND b.granularity = t.g AND b.bucket_start = t.s"
)


def _out(length: int) -> tuple[str, str]:
    """The columns through which a row's bucketed upsert hands over what left its inline
    bucket (migration 0007)."""
    return f"{NAMES[length]}_out_start", f"{NAMES[length]}_out_value"


def _sets(lengths: Sequence[int]) -> str:
    parts = []
    for length in lengths:
        start, value = columns(length)
        out_start, out_value = _out(length)
        new, old = f"excluded.{start}", f"c.{start}"
        later = f"({old} IS NULL OR {new} > {old})"
        parts += [
            f"{start} = CASE WHEN {later} THEN {new} ELSE {old} END",
            f"{value} = CASE WHEN {new} = {old} THEN c.{value} + excluded.{value}"
            f" WHEN {later} THEN excluded.{value} ELSE c.{value} END",
            f"{out_start} = CASE WHEN {new} > {old} THEN {old} WHEN {new} < {old} THEN {new} END",
            f"{out_value} = CASE WHEN {new} > {old} THEN c.{value}"
            f" WHEN {new} < {old} THEN excluded.{value} END",
        ]
    return ", ".join(parts)


def _statement(lengths: Sequence[int], source: str, bucket_values: Sequence[str]) -> str:
    """UPSERT for these granularities: `source` yields (k, v, <per granularity start and
    value>...). The separators joining the names are not mutated: `OR` reads the same in any
    case, and a moved bucket's start and value are NULL together."""
    return UPSERT.format(
        insert_columns=", ".join("{}, {}".format(*columns(length)) for length in lengths),
        bucket_values=", ".join(bucket_values),
        source=source,
        sets=_sets(lengths),
        outs=", ".join("{}, {}".format(*_out(length)) for length in lengths),
        moved=", ".join(MOVED.format(length, *_out(length)) for length in lengths),
        any_moved=" OR ".join(  # pragma: no mutate
            f"up.{_out(length)[0]} IS NOT NULL"  # pragma: no mutate
            for length in lengths
        ),
    )


@cache
def uniform_statement(lengths: tuple[int, ...], joined: bool) -> str:
    """$1 keys, $2 values (joined texts, or arrays), $3.. each granularity's bucket start."""
    source = (
        "unnest(string_to_array($1, E'\\x1f'), string_to_array($2, ',')::bigint[]) AS t(k, v)"
        if joined
        else "unnest($1::text[], $2::bigint[]) AS t(k, v)"
    )
    values = [f"${3 + i}::bigint, v" for i in range(len(lengths))]
    return _statement(lengths, source, values)


@cache
def general_statement(lengths: tuple[int, ...], joined: bool) -> str:
    """$1 keys, $2 totals, then per granularity its bucket starts and values per key (NULL: the
    key has no delta for that granularity), as joined texts (an empty element is NULL) or
    arrays."""
    names = ["k", "v"]
    arrays = []
    for i in range(2 * len(lengths) + 2):
        if i == 0:
            arrays.append("string_to_array($1, E'\\x1f')" if joined else "$1::text[]")
        elif joined:
            arrays.append(f"string_to_array(${i + 1}, ',', '')::bigint[]")
        else:
            arrays.append(f"${i + 1}::bigint[]")
    values = []
    for length in lengths:
        name = NAMES[length]
        names += [f"{name}_s", f"{name}_v"]
        values.append(f"{name}_s, {name}_v")
    source = f"unnest({', '.join(arrays)}) AS t({', '.join(names)})"
    return _statement(lengths, source, values)


class BucketedWrite:
    """One flush's bucketed writes, prepared before the transaction and run inside it."""

    def __init__(self, upserts: dict[str, int], buckets: Buckets) -> None:
        self.upserts = upserts
        self.buckets = buckets
        self.lengths = buckets.granularities
        # Set by prepare() before any use.
        self._statement = ""  # pragma: no mutate
        self._args: list[Any] = []  # pragma: no mutate
        self._cells: list[Any] = []  # pragma: no mutate

    async def prepare(self, joined_totals: Callable[[], Awaitable[tuple[str, str] | None]]) -> None:
        """Build the statement's arguments (`joined_totals`: the totals' joined texts,
        postgres.py's _joined, which a uniform batch sends as they are)."""
        # Which statement and form carry the batch changes nothing but speed (the same rows):
        # the choices below are not mutated.
        start = uniform(self.upserts, self.buckets)  # pragma: no mutate
        if start is not None:
            joined = await joined_totals()  # pragma: no mutate
            starts = [start - start % length for length in self.lengths]
            if joined is not None:
                self._statement = uniform_statement(self.lengths, True)
                self._args = [*joined, *starts]
            else:
                self._statement = uniform_statement(self.lengths, False)  # pragma: no mutate
                self._args = [list(self.upserts), list(self.upserts.values()), *starts]
            return
        work = (self.lengths, self.upserts, self.buckets.deltas)
        if len(self.upserts) > FOLD_ON_THREAD:  # pragma: no mutate
            self._statement, self._args, self._cells = await asyncio.to_thread(_general, *work)
        else:
            self._statement, self._args, self._cells = _general(*work)

    async def write(self, conn: Any) -> None:
        if self._statement:
            await conn.execute(self._statement, *self._args)
        if self._cells:
            await conn.execute(INSERT_CELLS, *self._cells)

    async def find_overflows(self, conn: Any) -> set[str]:
        return await find_overflows(conn, self.upserts, self.buckets)


def _general(
    lengths: tuple[int, ...],
    upserts: Mapping[str, int],
    deltas: Mapping[int, Mapping[str, int]],
) -> tuple[str, list[Any], list[Any]]:
    """The general statement and its arguments, and the older deltas' counter_buckets rows."""
    folded = fold(lengths, {}, deltas)
    keys = list(upserts) + [k for k in folded.inline if k not in upserts]
    if not keys:
        return "", [], _cell_arrays(folded.cells)
    totals = [upserts.get(k, 0) for k in keys]
    empty: list[Slot] = [EMPTY] * len(lengths)
    per_key = [folded.inline.get(k, empty) for k in keys]
    columns_: list[list[int | None]] = []
    for i in range(len(lengths)):
        columns_.append([slots[i][0] for slots in per_key])
        columns_.append([slots[i][1] if slots[i][0] is not None else None for slots in per_key])
    joined = SEPARATOR.join(keys)
    # Which form carries the keys changes nothing but speed: both write the same rows.
    if joined.count(SEPARATOR) == len(keys) - 1 and len(keys) > 1:  # pragma: no mutate
        args: list[Any] = [joined, ",".join(map(str, totals))]
        args += [",".join("" if x is None else str(x) for x in column) for column in columns_]
        return general_statement(lengths, True), args, _cell_arrays(folded.cells)
    return (
        general_statement(lengths, False),  # pragma: no mutate (None reads the same)
        [keys, totals, *columns_],
        _cell_arrays(folded.cells),
    )


def _cell_arrays(cells: Mapping[tuple[str, int, int], int]) -> list[Any]:
    if not cells:
        return []
    return [
        [k for k, _, _ in cells],
        [g for _, g, _ in cells],
        [s for _, _, s in cells],
        list(cells.values()),
    ]


async def find_overflows(conn: Any, upserts: Mapping[str, int], buckets: Buckets) -> set[str]:
    """The keys whose total or one of whose buckets would leave signed 64-bit if this batch
    were written now: the rows are read and the batch folded into them in Python (rare: only
    after PostgreSQL refused a sum)."""
    lengths = buckets.granularities
    names = [columns(length) for length in lengths]
    keys = list(set(upserts).union(*(d.keys() for d in buckets.deltas.values())))
    selected = ", ".join(f"{s}, {v}" for s, v in names)
    rows = await conn.fetch(
        f"SELECT key, value, {selected} FROM counters WHERE key = ANY($1::text[])", keys
    )
    values = {row[0]: int(row[1]) for row in rows}
    current: dict[str, list[Slot]] = {
        row[0]: [
            (row[2 + 2 * i], int(row[3 + 2 * i])) if row[2 + 2 * i] is not None else EMPTY
            for i in range(len(lengths))
        ]
        for row in rows
    }
    folded = fold(lengths, current, buckets.deltas)
    bad = {k for k, d in upserts.items() if not _fits(values.get(k, 0) + d)}
    bad.update(k for k, slots in folded.inline.items() if not all(_fits(v) for _, v in slots))
    for per_key in buckets.deltas.values():
        bad.update(k for k, d in per_key.items() if not _fits(d))
    if folded.cells:
        found = await conn.fetch(SELECT_CELLS, *_cell_arrays(folded.cells)[:3])
        stored = {(r[0], r[1], r[2]): int(r[3]) for r in found}
        bad.update(
            k for (k, g, s), d in folded.cells.items() if not _fits(stored.get((k, g, s), 0) + d)
        )
    return bad


def _fits(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX
