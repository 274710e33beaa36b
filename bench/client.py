"""The Python client moving counts into the server, beside one HTTP request per increment (wrk).

    .venv/bin/python -m bench.client [--duration 10] [--keys 10,100000] [--connections 32]
                                     [--results-dir bench/results]

For each key count, a fresh PostgreSQL database and `incrementer serve` (durability wal, its
defaults), then, one after the other against it:

- wrk -t1 -cN, one POST /increment per increment (scenario 10keys or 100kkeys of bench.run);
- at 100,000 keys also wrk's batch scenario, POST /increments of 50 random keys: the batch
  route's rate, the client's target there;
- one client process (`python -m bench.client --drive URL`): a loop calling Client.incr(key) for
  the duration (the same key order every run: a seeded random draw, or the ten keys in turn),
  then close(), which returns when the server has acknowledged everything. The rate is
  increments acknowledged per second, from the first incr() to the end of close(); the loop's
  own rate is shown beside it. The database total of the run's keys must equal the number of
  incr() calls.

Targets: at 10 keys, at least 1,000,000 increments/s from the one client process (the counts
coalesce locally: a handful of requests per flush interval); at 100,000 keys, at least the batch
route's rate measured in the same run. Misses are reported, not failed (exit status 1 only when
a total is wrong or a run fails; 2 when wrk or PostgreSQL is missing). A report goes to
<results-dir>/client-<YYYY-MM-DD-HHMM>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench.harness import database, preflight
from bench.harness.load import Load, items_per_request, run_wrk
from bench.harness.paths import RESULTS, ROOT, WORK
from bench.harness.targets import INCREMENTER_WAL, running

MARKER = "CLIENT_RESULT "
KEY_TARGET = 1_000_000  # increments/s at 10 keys


@dataclass
class Row:
    keys: int
    rates: dict[str, float] = field(default_factory=dict)
    """increments/s per load: wrk-single, wrk-batch, client, client-loop."""
    problems: list[str] = field(default_factory=list)


# --- the client process -------------------------------------------------------------------------


def drive(url: str, keys: int, duration: float, prefix: str, seed: int) -> dict[str, float]:
    """Call incr() for duration seconds, close, and say how fast: run in its own process."""
    from incrementer_client import Client

    names = [f"{prefix}{i}" for i in range(keys)]
    if keys <= 1024:
        order = [names[i % keys] for i in range(1024)]
    else:
        order = random.Random(seed).choices(names, k=2**20)
    mask = len(order) - 1
    calls = 0
    client = Client(url, max_batch=5000, close_at_exit=None)
    incr = client.incr
    started = time.perf_counter()
    deadline = started + duration
    while time.perf_counter() < deadline:
        for _ in range(4096):
            incr(order[calls & mask])
            calls += 1
    looped = time.perf_counter() - started
    client.close()
    total = time.perf_counter() - started
    stats = client.stats
    return {
        "calls": calls,
        "loop_seconds": looped,
        "seconds": total,
        "batches": stats.batches,
        "dropped": stats.dropped,
    }


async def run_client(url: str, keys: int, duration: float, prefix: str) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.client", "--drive", url, "--keys", str(keys),
        "--duration", str(duration), "--prefix", prefix,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), duration + 300)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith(MARKER)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"client process exited with {proc.returncode}:\n{err.decode()[-2000:]}")
    result: dict[str, float] = json.loads(line[len(MARKER) :])
    return result


# --- the harness --------------------------------------------------------------------------------


async def measure_keys(keys: int, args: argparse.Namespace, run_id: str, workroot: Path) -> Row:
    row = Row(keys)
    async with (
        database.fresh_database(f"client{keys}") as url,
        running(INCREMENTER_WAL, workroot / f"k{keys}", url) as server,
    ):
        scenarios = ["10keys"] if keys == 10 else ["100kkeys", "batch"]
        for scenario in scenarios:
            prefix = f"{run_id}-{scenario}-"
            spec = Load(server.url, scenario, prefix, 42, args.duration, args.connections)
            load = await run_wrk(spec)
            name = "wrk-batch" if scenario == "batch" else "wrk-single"
            row.rates[name] = load.rps * items_per_request(scenario)
        prefix = f"{run_id}-client{keys}-"
        found = await run_client(server.url, keys, args.duration, prefix)
        row.rates["client"] = found["calls"] / found["seconds"]
        row.rates["client-loop"] = found["calls"] / found["loop_seconds"]
        row.rates["client-batches"] = found["batches"]

        async def calls() -> int:
            return int(found["calls"])

        total, _, matched = await database.wait_for_total(url, prefix, calls, timeout=30)
        if not matched or found["dropped"]:
            row.problems.append(
                f"database holds {total} of {int(found['calls'])} increments passed to incr() "
                f"({int(found['dropped'])} dropped by the client)"
            )
    return row


def verdict(row: Row) -> str:
    client = row.rates.get("client", 0.0)
    if row.keys == 10:
        return "met" if client >= KEY_TARGET else f"missed (< {KEY_TARGET:,}/s)"
    batch = row.rates.get("wrk-batch")
    if batch is None:
        return "-"
    return "met" if client >= batch else "missed (< the batch route)"


def report(rows: list[Row], command: str) -> str:
    lines = [
        f"# Client benchmark {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Command: `{command}`",
        "",
        "| keys | wrk, one request per increment | wrk, batches of 50 | client (acknowledged) "
        "| client loop alone | batches sent | target |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        r = row.rates

        def shown(name: str, r: dict[str, float] = r) -> str:
            return f"{r[name]:,.0f}/s" if name in r else "-"

        lines.append(
            f"| {row.keys:,} | {shown('wrk-single')} | {shown('wrk-batch')} | {shown('client')} "
            f"| {shown('client-loop')} | {int(r.get('client-batches', 0)):,} | {verdict(row)} |"
        )
    for row in rows:
        lines.extend(f"- {row.keys:,} keys: {problem}" for problem in row.problems)
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    if await preflight.check_async("bench.client", tools=("wrk",)) is None:
        return 2
    run_id = "c" + uuid.uuid4().hex[:6]
    workroot = WORK / f"client-{run_id}"
    rows = []
    for keys in args.key_counts:
        row = await measure_keys(keys, args, run_id, workroot)
        rows.append(row)
        print(report([row], "").splitlines()[-1 - len(row.problems)], flush=True)
    command = " ".join([".venv/bin/python", "-m", "bench.client", *args.argv])
    text = report(rows, command)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"client-{datetime.now():%Y-%m-%d-%H%M}.md"
    path.write_text(text)
    print(f"report: {path}")
    return 1 if any(row.problems for row in rows) else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.client", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each load")
    parser.add_argument("--keys", default="10,100000", help="comma-separated key counts")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--drive", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    args.key_counts = [int(k) for k in args.keys.split(",") if k]
    if args.drive:
        found = drive(args.drive, args.key_counts[0], args.duration, args.prefix, seed=42)
        print(MARKER + json.dumps(found), flush=True)
        return 0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
