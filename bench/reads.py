"""The read side on PostgreSQL with a large data set: a series of a day of minutes, batch reads,
a top N per prefix size, a page of a listing, and the bytes a bucket row takes.

    .venv/bin/python -m bench.reads [--keys 1000000] [--with-minutes 20000] [--requests 300]

A fresh database gets --keys counters and, for the first --with-minutes of them, a day of minute
buckets and its hours, laid down minute by minute for every key as a running service would
write them (one roll per key and minute), then VACUUM ANALYZE (what autovacuum does for a table
that is mostly inserted into: index-only scans need the visibility map). A day of minutes for
every one of 1,000,000 keys would be 1.44 billion rows, about 200 GB: more than this machine's
disk, so --with-minutes keys carry the minutes and the series are read from those. Then
`incrementer serve --buckets minute,hour,day` answers --requests requests of each kind, one at a
time on one kept-alive connection, timed from request to answer by the client; p50 and p99
reported. Writes bench/results/reads-<YYYY-MM-DD-HHMM>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import asyncpg

from bench.harness import database, machine, preflight
from bench.harness.paths import RESULTS, WORK
from bench.harness.rawhttp import address
from bench.harness.targets import Target, running
from bench.report.cells import md_table
from incrementer.store.migrate import migrate

MINUTE, HOUR, DAY = 60, 3600, 86400
SERVICE = Target(
    "incrementer-buckets", "incrementer", "wal", flags=("--buckets", "minute,hour,day")
)


def key(i: int) -> str:
    return f"read-{i:07d}"


async def load(url: str, keys: int, with_minutes: int, now: int) -> dict[str, float]:
    """Fill the database; the figures of what it holds."""
    minute, hour, day = now - now % MINUTE, now - now % HOUR, now - now % DAY
    conn = await asyncpg.connect(url, command_timeout=None)
    try:
        await conn.execute(
            "INSERT INTO counters (key, value, created_at, updated_at, minute_start,"
            " minute_value, hour_start, hour_value, day_start, day_value)"
            " SELECT 'read-' || lpad(i::text, 7, '0'), (i % 1000) * 1440 + 7, now(), now(),"
            " $1, 5, $2, 5, $3, 5 FROM generate_series(0, $4 - 1) AS i",
            minute,
            hour,
            day,
            keys,
        )
        # History as rolls write it: every minute of the last day for each key, minute by
        # minute (so a key's rows are far apart in the heap), then the hours.
        for length, last in ((MINUTE, minute), (HOUR, hour)):
            await conn.execute(
                "INSERT INTO counter_buckets (key, granularity, bucket_start, value)"
                " SELECT 'read-' || lpad(k::text, 7, '0'), $1, s, 5"
                " FROM generate_series($2::bigint, $3::bigint, $1::bigint) AS s,"
                " generate_series(0, $4 - 1) AS k ORDER BY s, k",
                length,
                last - DAY + length,
                last - length,
                with_minutes,
            )
        await conn.execute("VACUUM ANALYZE counters")
        await conn.execute("VACUUM ANALYZE counter_buckets")
        rows = int(await conn.fetchval("SELECT count(*) FROM counter_buckets"))
        sizes = await conn.fetchrow(
            "SELECT pg_relation_size('counter_buckets'),"
            " pg_relation_size('counter_buckets_pkey'),"
            " pg_relation_size('counter_buckets_expiry'),"
            " pg_total_relation_size('counters')"
        )
    finally:
        await conn.close()
    return {
        "rows": rows,
        "heap": sizes[0] / rows,
        "primary key": sizes[1] / rows,
        "expiry index": sizes[2] / rows,
        "counters MiB": sizes[3] / 2**20,
    }


async def timed(url: str, paths: list[str]) -> list[float]:
    """Each GET on one kept-alive connection, one at a time: milliseconds to the whole answer."""
    reader, writer = await asyncio.open_connection(*address(url))
    took = []
    try:
        for path in paths:
            started = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            took.append((time.perf_counter() - started) * 1000)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"GET {path[:80]}: {head.splitlines()[0]!r}")
    finally:
        writer.close()
    return took


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    args: argparse.Namespace, workdir: Path
) -> tuple[dict[str, float], list[list[str]]]:
    rng = random.Random(5)
    now = int(time.time())
    async with database.fresh_database("reads") as url:
        await asyncio.to_thread(migrate, url)
        started = time.monotonic()
        figures = await load(url, args.keys, args.with_minutes, now)
        figures["load s"] = time.monotonic() - started
        since = now - now % MINUTE - DAY + MINUTE
        n = args.requests
        kinds = {
            "series, 1,440 minute points": [
                f"/counters/{key(rng.randrange(args.with_minutes))}/series"
                f"?granularity=minute&from={since}"
                for _ in range(n)
            ],
            "batch read, 100 keys (totals)": [
                "/counters?" + "&".join(f"key={key(rng.randrange(args.keys))}" for _ in range(100))
                for _ in range(n)
            ],
            "batch read, 100 keys (today's count)": [
                "/counters?granularity=day&"
                + "&".join(f"key={key(rng.randrange(args.with_minutes))}" for _ in range(100))
                for _ in range(n)
            ],
            "a page of 100 keys": [
                f"/counters?limit=100&prefix={quote(key(rng.randrange(args.keys))[:9])}"
                for _ in range(n)
            ],
        }
        for digits, size in ((4, "1,000"), (3, "10,000"), (2, "100,000")):
            prefix = "read-" + "0" * digits
            kinds[f"top 10 of {size} keys"] = [
                f"/counters?order=value&limit=10&prefix={prefix}"
            ] * max(10, n // 10)
        rows = []
        async with running(SERVICE, workdir, url) as server:
            for name, paths in kinds.items():
                await timed(server.url, paths[:5])  # warm the connection pool and the cache
                took = await timed(server.url, paths)
                rows.append(
                    [name, str(len(took)), f"{statistics.median(took):.2f}", f"{p(took, 0.99):.2f}"]
                )
                print(f"{name:<40} p50 {rows[-1][2]:>7} ms  p99 {rows[-1][3]:>7} ms", flush=True)
    return figures, rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reads", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--with-minutes", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not 100 <= args.with_minutes <= args.keys or args.requests < 10:
        parser.error("100 <= --with-minutes <= --keys; --requests >= 10")
    pg_version = preflight.check("bench.reads", tools=())
    if pg_version is None:
        return 2
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M")
    workdir = WORK / f"reads-{stamp}"
    figures, rows = asyncio.run(measure(args, workdir))
    command = "python -m bench.reads " + " ".join(argv)
    lines = [
        f"# Reads {stamp}",
        "",
        f"Command: `{command}`",
        "",
        md_table(["", ""], [[k, v] for k, v in machine.describe(pg_version).items()]),
        "",
        f"{args.keys:,} counters; {args.with_minutes:,} of them with a day of minute buckets "
        f"and its hours: {figures['rows']:,.0f} counter_buckets rows, loaded in "
        f"{figures['load s']:.0f} s.",
        "",
        md_table(["request", "n", "p50 ms", "p99 ms"], rows),
        "",
        "Bytes per counter_buckets row: "
        f"{figures['heap'] + figures['primary key'] + figures['expiry index']:.0f} "
        f"(heap {figures['heap']:.0f}, primary key with value {figures['primary key']:.0f}, "
        f"expiry index {figures['expiry index']:.0f}); counters with its index: "
        f"{figures['counters MiB']:,.0f} MiB for {args.keys:,} keys.",
        "",
    ]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"reads-{stamp}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines[-4:]))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
