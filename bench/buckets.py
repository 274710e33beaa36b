"""How to store time buckets, measured: the flush cost of each layout on PostgreSQL, no HTTP.

    .venv/bin/python -m bench.buckets [--keys 100000] [--share 0.3] [--batches 40]
                                      [--per-minute 12] [--layouts totals,inline,...]

Each layout (bench/harness/layouts.py) gets a fresh database and the same batches: a random
--share of --keys per batch, one delta each, the minute advancing every --per-minute batches.
Prints the median keys/s of the steady batches (the first quarter, which inserts the rows, is
left out), each against totals alone, and what the buckets take on disk. This is what chose
the layout of store/buckets.py; docs/performance.md quotes a run. Writes
bench/results/buckets-<YYYY-MM-DD-HHMM>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime
from pathlib import Path

from bench.harness import database, machine, preflight
from bench.harness.layouts import LAYOUTS, LayoutResult, batches, measure
from bench.harness.paths import RESULTS
from bench.report.cells import md_table


def describe(results: list[LayoutResult]) -> list[str]:
    base = next((r.keys_per_second for r in results if r.layout == "totals"), None)
    lines = []
    for r in results:
        ratio = f"{r.keys_per_second / base:.2f}x totals" if base else ""
        lines.append(
            f"{r.layout:<12} {r.keys_per_second:>10,.0f} keys/s  {ratio:<14}"
            f" counter_buckets rows {r.bucket_rows:>9,}  counters + buckets"
            f" {r.table_bytes / 2**20:,.1f} MiB"
        )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.buckets", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--share", type=float, default=0.3, help="Share of the keys per batch.")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument(
        "--per-minute", type=int, default=12, help="Batches per minute: how often buckets roll."
    )
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    layouts = [name for name in args.layouts.split(",") if name]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown or not 0 < args.share <= 1 or args.keys < 1 or args.batches < 4:
        parser.error(f"--layouts from {', '.join(LAYOUTS)}; 0 < --share <= 1; --batches >= 4")
    pg_version = preflight.check("bench.buckets", tools=())
    if pg_version is None:
        return 2
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M")
    plan = batches(args.keys, args.share, args.batches, args.per_minute)
    head = (
        f"flush of {len(plan[0][1]):,} of {args.keys:,} keys per batch, {args.batches} batches, "
        f"a new minute every {args.per_minute}, on PostgreSQL ({database.ADMIN_URL})"
    )
    print(head)
    results = []
    for layout in layouts:
        results.append(asyncio.run(measure(layout, plan)))
        print(describe(results)[-1], flush=True)
    base = next((r.keys_per_second for r in results if r.layout == "totals"), None)
    table = [
        [
            r.layout,
            f"{r.keys_per_second:,.0f}",
            f"{r.keys_per_second / base:.2f}x" if base else "-",
            f"{r.bucket_rows:,}",
            f"{r.table_bytes / 2**20:,.1f}",
        ]
        for r in results
    ]
    lines = [
        f"# Bucket layouts {stamp}",
        "",
        f"Command: `python -m bench.buckets {' '.join(argv)}`: {head}.",
        "",
        md_table(["", ""], [[k, v] for k, v in machine.describe(pg_version).items()]),
        "",
        md_table(
            ["layout", "keys/s (median)", "vs totals", "counter_buckets rows", "MiB on disk"],
            table,
        ),
        "",
        "The layouts are described in bench/harness/layouts.py. keys/s: keys (totals) per "
        "second of apply_batch, median of the batches after the first quarter.",
        "",
    ]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"buckets-{stamp}.md"
    path.write_text("\n".join(lines))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
