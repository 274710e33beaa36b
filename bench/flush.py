"""Flush throughput in isolation: PostgresStore.apply_batch of 100,000 distinct keys, no HTTP.

    .venv/bin/python -m bench.flush [--keys 100000] [--updates 4]

Creates a fresh database, migrates it, times one apply_batch that inserts every key, then
--updates more over the same keys (updates of existing rows), prints the keys/s of each and the
median of the updates, and drops the database. The performance target is 150,000 dirty keys/s
per flush. Nothing else runs on the event loop, so this is the store's and PostgreSQL's
capacity, not what a flush achieves under HTTP load (see the flush keys/s column of bench.run).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench.harness import database
from bench.harness.apply_batch import TARGET_KEYS_PER_SECOND, FlushResult, measure_flush


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
    parser = argparse.ArgumentParser(
        prog="python -m bench.flush", description=__doc__.split("\n", 1)[0]
    )
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
