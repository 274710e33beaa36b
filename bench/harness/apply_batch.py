"""Flush throughput in isolation: PostgresStore.apply_batch of many distinct keys on a fresh,
migrated database, nothing else on the event loop (bench/flush.py, and the end of bench/run.py)."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

from bench.harness import database
from incrementer.store.migrate import migrate
from incrementer.store.postgres import PostgresStore

NODE_ID = "bench-flush"
TARGET_KEYS_PER_SECOND = 150_000


@dataclass
class FlushResult:
    keys: int
    insert_seconds: float
    update_seconds: list[float] = field(default_factory=list)

    @property
    def insert_rate(self) -> float:
        return self.keys / self.insert_seconds

    @property
    def update_rates(self) -> list[float]:
        return [self.keys / s for s in self.update_seconds]

    @property
    def median_update_rate(self) -> float:
        return statistics.median(self.update_rates)


async def measure_flush(keys: int = 100_000, updates: int = 4) -> FlushResult:
    """Time apply_batch of `keys` distinct keys: one insert batch, then `updates` update batches."""
    deltas = {f"flush-{i}": 1 for i in range(keys)}
    async with database.fresh_database("flush") as url:
        # yoyo (synchronous) underneath: keep it off the event loop like the service does.
        await asyncio.to_thread(migrate, url)
        store = PostgresStore(url)
        await store.open()
        try:
            timings = []
            for seq in range(1, updates + 2):
                started = time.perf_counter()
                applied = await store.apply_batch(NODE_ID, seq, deltas)
                timings.append(time.perf_counter() - started)
                if not applied.applied or applied.overflowed:
                    raise RuntimeError(f"batch {seq} was not applied cleanly: {applied}")
        finally:
            await store.close()
    return FlushResult(keys, timings[0], timings[1:])
