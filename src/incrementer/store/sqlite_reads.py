"""The read side on SQLite: many keys, a series, a page of keys, the top of a prefix, and the
retention sweep. A read of several statements runs in one read transaction (WAL mode: one
snapshot from its first read to its end), so what it returns and this node's applied_seq agree.
Each runs on the store's reader thread (the sweep on its writer thread).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from incrementer.store.base import KeyList, ManyRead, SeriesRead, Window, sum_deltas
from incrementer.store.buckets import EMPTY, Stored, columns

APPLIED = "SELECT applied_seq FROM incrementer_nodes WHERE node_id = ?"
BY_KEY = " ORDER BY key LIMIT ?"
BELOW = " AND key < ?"  # the prefix's upper bound, when it has one
OVERFLOW = "(SELECT group_concat(delta, ',') FROM counter_overflows AS o WHERE o.key = c.key)"
CELLS = (
    "SELECT bucket_start, value FROM counter_buckets WHERE key = ? AND granularity = ?"
    " AND bucket_start >= ? AND bucket_start < ? ORDER BY bucket_start"
)
SWEEP = (
    "DELETE FROM counter_buckets WHERE (key, granularity, bucket_start) IN ("
    " SELECT key, granularity, bucket_start FROM counter_buckets"
    " WHERE granularity = ? AND bucket_start < ? ORDER BY bucket_start LIMIT ?)"
)


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _applied(conn: sqlite3.Connection, node_id: str) -> int:
    row = conn.execute(APPLIED, (node_id,)).fetchone()
    return int(row[0]) if row else 0


def _stored(conn: sqlite3.Connection, key: str, window: Window, inline: Any) -> Stored:
    """The key's counter_buckets rows in the window, and its inline bucket (start, value)."""
    cells = dict(conn.execute(CELLS, (key, window.length, window.start, window.end)).fetchall())
    start, value = inline
    return Stored(cells, EMPTY if start is None else (int(start), int(value)))


def read_series(conn: sqlite3.Connection, *, key: str, window: Window, node_id: str) -> SeriesRead:
    start, value = columns(window.length)
    with _snapshot(conn):
        row = conn.execute(
            f"SELECT value, {start}, {value} FROM counters WHERE key = ?", (key,)
        ).fetchone()
        stored = _stored(conn, key, window, row[1:] if row else EMPTY)
        return SeriesRead(None if row is None else int(row[0]), _applied(conn, node_id), stored)


def read_many(
    conn: sqlite3.Connection, *, keys: list[str], node_id: str, window: Window | None
) -> ManyRead:
    inline = ", {}, {}".format(*columns(window.length)) if window is not None else ""
    values: dict[str, tuple[int | None, int]] = {}
    windows: dict[str, Stored] = {}
    with _snapshot(conn):
        for key in keys:
            row = conn.execute(
                f"SELECT value, {OVERFLOW}{inline} FROM counters AS c WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                overflow = conn.execute(
                    "SELECT group_concat(delta, ',') FROM counter_overflows WHERE key = ?", (key,)
                ).fetchone()[0]
                values[key] = (None, sum_deltas(overflow))
            else:
                values[key] = (int(row[0]), sum_deltas(row[1]))
            if window is not None:
                windows[key] = _stored(conn, key, window, row[2:] if row else EMPTY)
        return ManyRead(_applied(conn, node_id), values, windows)


def list_keys(
    conn: sqlite3.Connection,
    *,
    prefix: str,
    upper: str | None,
    limit: int,
    after: str | None,
    node_id: str,
) -> KeyList:
    lower = ">" if after is not None else ">="
    bound = BELOW if upper is not None else ""
    params: tuple[object, ...] = (prefix if after is None else after,)
    if upper is not None:
        params += (upper,)
    with _snapshot(conn):
        rows = conn.execute(
            f"SELECT key, value, {OVERFLOW} FROM counters AS c WHERE key {lower} ?{bound}{BY_KEY}",
            (*params, limit),
        ).fetchall()
        return KeyList(
            [(str(k), int(v), sum_deltas(o)) for k, v, o in rows], _applied(conn, node_id)
        )


def top_keys(
    conn: sqlite3.Connection, *, prefix: str, upper: str | None, limit: int, scan: int
) -> tuple[list[tuple[str, int]], int]:
    bound = BELOW if upper is not None else ""
    params: tuple[object, ...] = (prefix, upper) if upper is not None else (prefix,)
    inner = f"SELECT key, value FROM counters WHERE key >= ?{bound} LIMIT ?"
    with _snapshot(conn):
        seen = conn.execute(f"SELECT count(*) FROM ({inner})", (*params, scan + 1)).fetchone()[0]
        rows = conn.execute(
            f"SELECT key, value FROM ({inner}) ORDER BY value DESC, key LIMIT ?",
            (*params, scan + 1, limit),
        ).fetchall()
    return [(str(k), int(v)) for k, v in rows], int(seen)


def sweep(conn: sqlite3.Connection, length: int, before: int, limit: int) -> int:
    """On the writer's connection, in a transaction of its own (autocommit)."""
    return int(conn.execute(SWEEP, (length, before, limit)).rowcount)
