"""Flush throughput in isolation: PostgresStore.apply_batch of 100,000 distinct keys, no HTTP.

    .venv/bin/python bench/flush.py [--keys 100000] [--updates 4]

Creates a fresh database, migrates it, times one apply_batch that inserts every key, then
--updates more over the same keys (updates of existing rows), prints the keys/s of each and the
median of the updates, and drops the database. The performance target is 150,000 dirty keys/s per flush.
Nothing else runs on the event loop, so this is the store's and PostgreSQL's capacity, not what a
flush achieves under HTTP load (see the flush keys/s column of bench/run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field

import database

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


def describe(result: FlushResult) -> list[str]:
    lines = [f"insert batch  : {result.insert_rate:>10,.0f} keys/s ({result.insert_seconds:.3f} s)"]
    for n, (rate, secs) in enumerate(zip(result.update_rates, result.update_seconds, strict=True)):
        lines.append(f"update batch {n + 1}: {rate:>10,.0f} keys/s ({secs:.3f} s)")
    verdict = "pass" if result.median_update_rate >= TARGET_KEYS_PER_SECOND else "FAIL"
    lines.append(
        f"median update : {result.median_update_rate:>10,.0f} keys/s "
        f"(target >= {TARGET_KEYS_PER_SECOND:,}: {verdict})"
    )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/flush.py", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keys", type=int, default=100_000, help="Distinct keys per batch.")
    parser.add_argument("--updates", type=int, default=4, help="Update batches after the insert.")
    args = parser.parse_args(argv)
    if args.keys < 1 or args.updates < 1:
        parser.error("--keys and --updates must be at least 1")
    result = asyncio.run(measure_flush(args.keys, args.updates))
    print(f"apply_batch of {result.keys:,} distinct keys on PostgreSQL ({database.ADMIN_URL})")
    print("\n".join(describe(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
