"""p99 by the size of the key space, paced, and what the service's event loop waited behind.

    .venv/bin/python -m bench.latency_keys [--keys 10,32,100,...,100000] [--rate R]
                                           [--seconds 10] [--rounds 2] [--database-nice N]
                                           [--sched] [--results DIR]

`incrementer serve` (wal, --auth required) on a PostgreSQL cluster of its own; wrk closed-loop for
10 s for the ceiling, then paced at half of it (or at --rate) for --seconds at each key count in
turn, each on new keys, --rounds times over. From a few keys to many, a flush goes from a handful
of rows to thousands: the report (bench/results/latency-keys-DATE.md) gives p99 and p50 at each
count and the largest step between two neighbouring counts.

With --sched, `perf sched record` runs for a few seconds inside each wrk run (needs perf and
root), and the report adds the event-loop thread's run-queue waits: how many lasted 0.5 ms or
more, their sum, and what ran on its CPU meanwhile (bench/report/sched.py), beside the time the
thread ran in the recording. Exit status 2 when wrk or PostgreSQL's binaries are missing, or a
working perf with --sched (Debian: linux-perf).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.harness import machine
from bench.harness.cluster import Cluster, binaries
from bench.harness.load import Load, LoadResult, run_wrk
from bench.harness.paths import RESULTS, WORK
from bench.harness.targets import Target, create_api_key, free_port, running
from bench.report import sched
from bench.report.cells import md_table

TARGET = Target("incrementer-latency", "incrementer", "wal", auth=True)
CONNECTIONS = 32
KEYS = (10, 32, 100, 316, 1000, 3162, 10000, 31623, 100000)
SCHED_AFTER = 1.0  # seconds into a wrk run before perf starts recording


@dataclass(frozen=True)
class Run:
    """One wrk run at one key count, with its scheduler waits when recorded."""

    keys: int
    load: LoadResult
    waits: sched.Waits | None

    @property
    def p99(self) -> float:
        return self.load.latency_ms["p99"]


async def main(args: argparse.Namespace) -> int:
    missing = [] if machine.which("wrk") else ["wrk"]
    if args.sched and not perf_works():
        missing.append("perf (Debian: linux-perf)")
    if missing or binaries() is None:
        print(
            f"bench.latency_keys: needs {', '.join(missing) or 'PostgreSQL server binaries'}",
            file=sys.stderr,
        )
        return 2
    cluster = Cluster(free_port(), nice=args.database_nice)
    await asyncio.to_thread(cluster.init)
    await asyncio.to_thread(cluster.start)
    try:
        started = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
        rate, ceiling, runs = await measure(args, cluster)
    finally:
        await asyncio.to_thread(cluster.destroy)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    report = results / f"latency-keys-{started}.md"
    report.write_text(render(args, started, rate, ceiling, runs))
    print(f"report: {report}")
    return 0


def perf_works() -> bool:
    """Debian's /usr/bin/perf is a wrapper that fails until linux-perf is installed."""
    try:
        return subprocess.run(["perf", "--version"], capture_output=True).returncode == 0
    except OSError:
        return False


async def measure(args: argparse.Namespace, cluster: Cluster) -> tuple[float, float, list[Run]]:
    api_key = await create_api_key(cluster.url)
    prefix = f"lk-{uuid.uuid4().hex[:8]}-"
    async with running(TARGET, WORK / prefix.rstrip("-"), cluster.url, api_key) as server:
        ceiling = 0.0
        if not args.rate:
            closed = Load(server.url, "keys:100000", prefix + "c-", 1, 10, CONNECTIONS, api_key)
            ceiling = (await run_wrk(closed)).rps
        rate = args.rate or ceiling / 2
        runs = []
        for round_ in range(args.rounds):
            for i, keys in enumerate(args.keys):
                load = Load(
                    server.url, f"keys:{keys}", f"{prefix}{round_}-{i}-", i + 2, args.seconds,
                    CONNECTIONS, api_key, rate,
                )  # fmt: skip
                wrk = asyncio.create_task(run_wrk(load))
                waits = await record(server.pid, args.seconds) if args.sched else None
                runs.append(Run(keys, await wrk, waits))
                print(f"{keys:>9,} keys: p99 {runs[-1].p99:.2f} ms", flush=True)
    return rate, ceiling, runs


async def record(pid: int, seconds: float) -> sched.Waits:
    """`perf sched record` on every CPU for a few seconds of the run under way, read back."""
    await asyncio.sleep(SCHED_AFTER)
    length = recording_seconds(seconds)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sched.data"
        await _run("perf", "sched", "record", "-a", "-o", str(data), "--", "sleep", f"{length:g}")
        text = await _run("perf", "sched", "timehist", "-w", "-i", str(data))
    return sched.waits(sched.parse(text), pid)


def recording_seconds(run_seconds: float) -> float:
    """How long perf records inside a run: up to 4 s, a second clear of either end."""
    return max(1.0, min(4.0, run_seconds - 2 * SCHED_AFTER))


async def _run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:3])} exited with {proc.returncode}")
    return out.decode(errors="replace")


def largest_step(runs: list[Run], per_round: int) -> float | None:
    """The largest ratio of p99s between neighbouring key counts of one round (`per_round`
    runs, in the order they ran)."""
    rounds = [runs[i : i + per_round] for i in range(0, len(runs), max(per_round, 1))]
    steps = [
        max(a.p99, b.p99) / min(a.p99, b.p99)
        for one in rounds
        for a, b in itertools.pairwise(one)
        if min(a.p99, b.p99) > 0
    ]
    return max(steps, default=None)


def render(
    args: argparse.Namespace, started: str, rate: float, ceiling: float, runs: list[Run]
) -> str:
    nice = f" --database-nice {args.database_nice}" if args.database_nice else ""
    listed = "" if tuple(args.keys) == KEYS else f"--keys {','.join(map(str, args.keys))} "
    paced = f" --rate {args.rate:g}" if args.rate else ""
    flags = f"{listed}--seconds {args.seconds:g} --rounds {args.rounds}{paced}{nice}" + (
        " --sched" if args.sched else ""
    )
    by_keys: dict[int, list[Run]] = {}
    for run in runs:
        by_keys.setdefault(run.keys, []).append(run)
    rows = []
    for keys, mine in by_keys.items():
        row = [f"{keys:,}", " / ".join(f"{r.p99:.2f}" for r in mine),
               " / ".join(f"{r.load.latency_ms['p50']:.2f}" for r in mine)]  # fmt: skip
        if args.sched:
            row += _waits_cells([r.waits for r in mine if r.waits is not None])
        rows.append(row)
    columns = ["keys", "p99 ms (each round)", "p50 ms"]
    if args.sched:
        columns += ["loop ran ms", "waits >= 0.5 ms", "their sum ms", "its CPU meanwhile ran (ms)"]
    step = largest_step(runs, len(args.keys))
    lines = [
        f"# p99 by the size of the key space {started} (UTC)",
        "",
        f"`python -m bench.latency_keys {flags}`: incrementer (wal, --auth required) on its own "
        f"PostgreSQL cluster, wrk paced at {rate:,.0f} requests/s "
        + (f"(half the ceiling of {ceiling:,.0f} measured at the start)" if ceiling else "(--rate)")
        + f", {args.seconds:g} s at each key count, each on new keys"
        + (
            f"; `perf sched` recorded {recording_seconds(args.seconds):g} s of each run."
            if args.sched
            else "."
        ),
        "",
        md_table(columns, rows),
        "",
        "Largest p99 step between neighbouring key counts of one round: "
        + ("-" if step is None else f"{step:.2f}x"),
        "",
    ]
    return "\n".join(lines)


def _waits_cells(recorded: list[sched.Waits]) -> list[str]:
    behind: Counter[str] = Counter()
    for w in recorded:
        behind.update(w.behind)
    return [
        " / ".join(f"{w.ran_ms:.0f}" for w in recorded),
        " / ".join(str(w.slow) for w in recorded),
        " / ".join(f"{w.slow_ms:.1f}" for w in recorded),
        ", ".join(f"{comm} {ms:.1f}" for comm, ms in behind.most_common(4)) or "-",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency_keys", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--keys",
        type=lambda text: [int(k) for k in text.split(",")],
        default=list(KEYS),
        help="key counts, comma-separated (10 to 100,000, about 3.2-fold apart)",
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="requests/s (default: half the ceiling)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per key count (10)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the key counts (2)")
    parser.add_argument(
        "--database-nice", type=int, default=0, help="the PostgreSQL cluster's CPU niceness"
    )
    parser.add_argument(
        "--sched", action="store_true", help="record the scheduler (perf sched) in each run"
    )
    parser.add_argument(
        "--results", default=str(RESULTS), help="where the report goes (bench/results)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
