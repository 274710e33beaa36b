"""The read side on PostgreSQL: many keys, a series, a page of keys, the top of a prefix, and the
retention sweep. Each read is one statement, so what it returns and this node's applied_seq
come from one snapshot (the caller adds this node's unflushed deltas on top: api/).

Within the distributed engines' means (docs/operations.md): a series and a key's read touch
one key (one shard of counters and counter_buckets, colocated) and the ledger (a reference
table); many keys are an unnest joined with counters, which Citus sends to every shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from incrementer.store.base import KeyList, ManyRead, SeriesRead, Window, sum_deltas
from incrementer.store.buckets import EMPTY, Stored, columns

APPLIED = "(SELECT applied_seq FROM incrementer_nodes WHERE node_id = $2)"
SELECT_APPLIED = "SELECT applied_seq FROM incrementer_nodes WHERE node_id = $1"
OVERFLOW = "(SELECT string_agg(delta, ',') FROM counter_overflows AS o WHERE o.key = {key})"
READ_MANY = (
    f"SELECT t.k, c.value, {OVERFLOW.format(key='t.k')}, {APPLIED}"
    " FROM unnest($1::text[]) AS t(k) LEFT JOIN counters AS c ON c.key = t.k"
)
# Rows of counter_buckets come from the primary key index alone (its INCLUDE (value)), once
# the visibility map says their pages are all-visible: autovacuum sees to that for a table
# that is mostly inserted into.
CELLS = (
    "SELECT array_agg(bucket_start ORDER BY bucket_start), array_agg(value ORDER BY bucket_start)"
    " FROM counter_buckets WHERE key = {key} AND granularity = $3"
    " AND bucket_start >= $4 AND bucket_start < $5"
)
SWEEP = (
    "DELETE FROM counter_buckets WHERE (key, granularity, bucket_start) IN ("
    " SELECT key, granularity, bucket_start FROM counter_buckets"
    " WHERE granularity = $1 AND bucket_start < $2"
    " ORDER BY granularity, bucket_start LIMIT $3)"
)
LIST = (
    f"SELECT key, value, {OVERFLOW.format(key='c.key')}, {{applied}} FROM counters AS c"
    " WHERE key {lower} $1{upper} ORDER BY key LIMIT $3"
)
# count(*) OVER () runs over every row the inner scan returned, before the sort and the limit:
# more than the scan allowed means the prefix holds more keys than were ranked.
TOP = (
    "SELECT key, value, count(*) OVER () FROM ("
    " SELECT key, value FROM counters WHERE key >= $1{upper} LIMIT $3) AS s"
    " ORDER BY value DESC, key LIMIT $2"
)


@cache
def series_statement(length: int) -> str:
    start, value = columns(length)
    return (
        f"SELECT {APPLIED}, c.value, c.{start}, c.{value}, cells.* FROM (SELECT 1) AS one"
        " LEFT JOIN counters AS c ON c.key = $1"
        f" CROSS JOIN LATERAL ({CELLS.format(key='$1')}) AS cells"
    )


@cache
def window_statement(length: int) -> str:
    start, value = columns(length)
    return (
        f"SELECT t.k, c.value, {OVERFLOW.format(key='t.k')}, {APPLIED}, c.{start}, c.{value},"
        " cells.*"
        " FROM unnest($1::text[]) AS t(k) LEFT JOIN counters AS c ON c.key = t.k"
        f" CROSS JOIN LATERAL ({CELLS.format(key='t.k')}) AS cells"
    )


@cache
def list_statement(after: bool, bounded: bool) -> str:
    """Keys from $1 (after it, when paging), below $4 when the prefix needs a bound; $2 the
    node, $3 the limit."""
    return LIST.format(
        applied=APPLIED,
        lower=">" if after else ">=",
        upper=" AND key < $4" if bounded else "",
    )


@cache
def top_statement(bounded: bool) -> str:
    """The top $2 of at most $3 keys from $1, below $4 when the prefix needs a bound."""
    return TOP.format(upper=" AND key < $4" if bounded else "")


def _stored(starts: list[int] | None, values: list[int] | None, start: Any, value: Any) -> Stored:
    # strict: the two arrays come from one aggregate, so they are never of different lengths.
    cells = dict(zip(starts or [], map(int, values or []), strict=True))  # pragma: no mutate
    inline = EMPTY if start is None else (int(start), int(value))
    return Stored(cells, inline)


async def read_series(conn: Any, key: str, window: Window, node_id: str) -> SeriesRead:
    row = await conn.fetchrow(
        series_statement(window.length), key, node_id, window.length, window.start, window.end
    )
    applied, value, start, inline, starts, values = row
    return SeriesRead(
        value=None if value is None else int(value),
        applied_seq=int(applied or 0),
        stored=_stored(starts, values, start, inline),
    )


async def read_many(
    conn: Any, keys: Sequence[str], node_id: str, window: Window | None
) -> ManyRead:
    if window is None:
        rows = await conn.fetch(READ_MANY, list(keys), node_id)
    else:
        rows = await conn.fetch(
            window_statement(window.length),
            list(keys),
            node_id,
            window.length,
            window.start,
            window.end,
        )
    applied = 0
    values: dict[str, tuple[int | None, int]] = {}
    windows: dict[str, Stored] = {}
    for row in rows:
        key = row[0]
        applied = int(row[3] or 0)
        values[key] = (None if row[1] is None else int(row[1]), sum_deltas(row[2]))
        if window is not None:
            windows[key] = _stored(row[6], row[7], row[4], row[5])
    return ManyRead(applied, values, windows)


async def list_keys(
    conn: Any, prefix: str, upper: str | None, limit: int, after: str | None, node_id: str
) -> KeyList:
    statement = list_statement(after is not None, upper is not None)
    args: list[Any] = [prefix if after is None else after, node_id, limit]
    if upper is not None:
        args.append(upper)
    rows = await conn.fetch(statement, *args)
    applied = int(rows[0][3] or 0) if rows else await _applied(conn, node_id)
    return KeyList([(str(r[0]), int(r[1]), sum_deltas(r[2])) for r in rows], applied)


async def _applied(conn: Any, node_id: str) -> int:
    found = await conn.fetchval(SELECT_APPLIED, node_id)
    return int(found or 0)


async def top_keys(
    conn: Any, prefix: str, upper: str | None, limit: int, scan: int
) -> tuple[list[tuple[str, int]], int]:
    args: list[Any] = [prefix, limit, scan + 1]
    if upper is not None:
        args.append(upper)
    rows = await conn.fetch(top_statement(upper is not None), *args)
    return [(str(r[0]), int(r[1])) for r in rows], int(rows[0][2]) if rows else 0


async def sweep(conn: Any, length: int, before: int, limit: int) -> int:
    return rows_affected(await conn.execute(SWEEP, length, before, limit))


def rows_affected(status: str) -> int:
    """The row count of a command's status, "DELETE 12": always two words, so splitting at any
    space, from either end, gives the same count."""
    return int(status.rsplit(" ", 1)[-1])  # pragma: no mutate
