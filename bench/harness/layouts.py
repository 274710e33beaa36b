"""Flush cost of the ways time buckets could be stored, on PostgreSQL, each on a fresh migrated
database, with the same batches (bench/buckets.py): the store's own flush (totals alone, and
the chosen layout: the current bucket inline in the counters row, store/buckets.py), and two
alternatives written here in SQL the way they would be, with what else it would take:

- rows: one counter_buckets row per granularity upserted beside each total (four rows per key
  for minute, hour and day);
- minute rows: only the finest bucket beside each total; hours and days would then be rolled
  up in the background (RRD, Graphite), which this leaves out, so it is that design's floor;
- value index: totals alone with an index on `value` (what a top N by an index would need),
  which makes every update of a counter a non-HOT one.

A batch is a random share of the keys, one delta each, as a flush of random keys under load
is; the minute advances every `per_minute` batches, so each key's bucket rolls about as often
as it would under load (a key is flushed many times a minute).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from bench.harness import database
from incrementer.store.buckets import Buckets
from incrementer.store.migrate import migrate
from incrementer.store.postgres import PostgresStore

GRANULARITIES = (60, 3600, 86400)
START = 1_796_515_200  # a day's start, UTC
ROWS = (
    "INSERT INTO counter_buckets (key, granularity, bucket_start, value)"
    " SELECT t.k, g.s, $3::bigint / g.s * g.s, t.v"
    " FROM unnest(string_to_array($1, E'\\x1f'), string_to_array($2, ',')::bigint[]) AS t(k, v)"
    " CROSS JOIN unnest($4::integer[]) AS g(s) ORDER BY 1, 2"
    " ON CONFLICT (key, granularity, bucket_start)"
    " DO UPDATE SET value = counter_buckets.value + excluded.value"
)
TOTALS = (
    "INSERT INTO counters (key, value, created_at, updated_at)"
    " SELECT k, v, now(), now()"
    " FROM unnest(string_to_array($1, E'\\x1f'), string_to_array($2, ',')::bigint[]) AS t(k, v)"
    ' ORDER BY k COLLATE "C" ON CONFLICT (key) DO UPDATE'
    " SET value = counters.value + excluded.value, updated_at = excluded.updated_at"
)
LAYOUTS = ("totals", "inline", "rows", "minute rows", "value index")


@dataclass
class LayoutResult:
    layout: str
    seconds: list[float]
    keys: int
    bucket_rows: int = 0
    """counter_buckets rows at the end."""
    table_bytes: int = 0
    """counter_buckets with its indexes, and counters, at the end."""

    @property
    def keys_per_second(self) -> float:
        return self.keys / statistics.median(self.seconds)


def batches(
    keys: int, share: float, count: int, per_minute: int, seed: int = 1
) -> list[tuple[int, list[str]]]:
    """(the minute's start, the keys flushed) of each batch, sorted keys."""
    rng = random.Random(seed)
    names = [f"layout-{i:07d}" for i in range(keys)]
    size = int(keys * share)
    return [(START + 60 * (n // per_minute), sorted(rng.sample(names, size))) for n in range(count)]


async def measure(layout: str, plan: list[tuple[int, list[str]]]) -> LayoutResult:
    async with database.fresh_database("layout") as url:
        await asyncio.to_thread(migrate, url)
        store = PostgresStore(url)
        await store.open()
        conn = await asyncpg.connect(url)
        try:
            if layout == "value index":
                await conn.execute("CREATE INDEX counters_value ON counters (value)")
            seconds = []
            for seq, (minute, keys) in enumerate(plan, 1):
                deltas = dict.fromkeys(keys, 1)
                started = time.perf_counter()
                await _flush(layout, store, conn, seq, minute, deltas)
                seconds.append(time.perf_counter() - started)
            rows = int(await conn.fetchval("SELECT count(*) FROM counter_buckets"))
            size = int(
                await conn.fetchval(
                    "SELECT pg_total_relation_size('counter_buckets')"
                    " + pg_total_relation_size('counters')"
                )
            )
        finally:
            await conn.close()
            await store.close()
    # The first batches insert every row; the rest update them, as a running service does.
    steady = seconds[len(seconds) // 4 :]
    return LayoutResult(layout, steady, len(plan[0][1]), rows, size)


async def _flush(
    layout: str, store: PostgresStore, conn: Any, seq: int, minute: int, deltas: dict[str, int]
) -> None:
    if layout in ("totals", "value index"):
        await store.apply_batch("bench", seq, deltas)
    elif layout == "inline":
        await store.apply_batch("bench", seq, deltas, (), Buckets(GRANULARITIES, {minute: deltas}))
    else:
        keys, values = "\x1f".join(deltas), ",".join(map(str, deltas.values()))
        granularities = list(GRANULARITIES) if layout == "rows" else [60]
        async with conn.transaction():
            await conn.execute(TOTALS, keys, values)
            await conn.execute(ROWS, keys, values, minute, granularities)
