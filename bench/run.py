"""Benchmark incrementer against the HTTP ceiling (nginx) and the naive design, and write a report.

    .venv/bin/python -m bench.run [--duration 10] [--connections 32] [--rounds 1]
                                  [--scenarios 10keys,100kkeys,batch,10mkeys] [--targets ...]
                                  [--paced 0.5,0.8] [--quick] [--results-dir bench/results]

Targets: nginx `return 202` (the HTTP ceiling), python-lean (bench/servers/lean.py, the Python
floor), incrementer in each --durability mode, incrementer-wal-auth (wal with --auth required and
a never-refusing rate limit: the guard rails' cost), incrementer-wal-buckets (wal with --buckets
minute,hour,day: counting per time bucket), incrementer-wal-deferred (wal with no flush
during the load: the service without PostgreSQL competing for the cores), naive
(bench/servers/naive.py, one upsert per request), and the scale-out pair nginx-2w and
incrementer-wal-2w (two worker processes each, bench/report/scaleout.py). After the closed-loop
runs of 10keys and 100kkeys, nginx and incrementer-wal run again at fixed offered rates (--paced:
fractions of that round's nginx req/s). 10mkeys (keys from 10,000,000) runs nginx and
incrementer-wal with one and two workers only. Then, unless --quick, apply_batch of 100,000 keys
is timed in isolation (what bench/flush.py does alone).

For every scenario each target is started on a free port (PostgreSQL-backed ones on a database of
their own), loaded with `wrk -t1 -cN` for the duration, checked (the database must hold every
increment wrk saw acknowledged, no more than it sent, and exactly what the service counted) and
stopped. The tables are printed and written to bench/results/<YYYY-MM-DD-HHMM>.md with a PNG of
throughput and lag over time. See docs/performance.md for what the columns mean.

Exit status: 0 when every run completed with verified totals (missed performance targets are
reported, not failed: a benchmark is not a test), 1 when a run failed or lost increments, 2 when a
tool or PostgreSQL is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

# Before rich and matplotlib: without the bench extra, one line says what to install.
from bench.harness import extras  # noqa: F401  # isort: skip

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bench.harness import database, machine, preflight
from bench.harness.apply_batch import FlushResult, measure_flush
from bench.harness.load import BATCH_SIZE, SCENARIOS
from bench.harness.measure import RunResult, measure
from bench.harness.paths import RESULTS, ROOT, WORK
from bench.harness.targets import (
    INCREMENTER_2W,
    INCREMENTER_AUTH,
    INCREMENTER_BUCKETS,
    INCREMENTER_DEFERRED,
    INCREMENTER_MODES,
    LEAN,
    NAIVE,
    NGINX,
    NGINX_2W,
    Target,
)
from bench.report import buckets, checks, markdown, plot, scaleout, tables
from bench.report.compare import representatives

ALL_TARGETS = [
    NGINX,
    NGINX_2W,
    LEAN,
    *INCREMENTER_MODES,
    INCREMENTER_2W,
    INCREMENTER_AUTH,
    INCREMENTER_BUCKETS,
    INCREMENTER_DEFERRED,
    NAIVE,
]
NOT_IN_QUICK = (NAIVE.name, LEAN.name, INCREMENTER_DEFERRED.name)
QUICK_DURATION = 2.0
QUICK_PACED = "0.5"
# A run of 10mkeys adds ~800,000 rows: worth it for the targets that answer the question (what
# a per-user counter costs, with one worker and two), not for every baseline.
ONLY_FOR = {"10mkeys": (NGINX.name, "incrementer-wal", INCREMENTER_2W.name)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="Seconds of load per run (default 10, or 2 with --quick).",
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk -c: open connections.")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"Comma-separated, from {', '.join(SCENARIOS)}.",
    )
    parser.add_argument(
        "--targets",
        default=",".join(t.name for t in ALL_TARGETS),
        help="Comma-separated target names.",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Repeat the whole plan; the report shows each target's median run (by req/s).",
    )
    parser.add_argument(
        "--paced",
        default=None,
        help="Comma-separated fractions of nginx's closed-loop req/s at which nginx and "
        "incrementer-wal run again, paced, in 10keys and 100kkeys (default 0.5,0.8, or 0.5 "
        "with --quick; empty: none).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke: 2-second runs, the first scenario only, no naive, python-lean or "
        "deferred target, paced at 0.5 only, no isolated flush measurement.",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="Where the .md report and the .png plot go.",
    )
    args = parser.parse_args(argv)
    scenarios = _chosen(parser, "--scenarios", args.scenarios, SCENARIOS)
    by_name = {t.name: t for t in ALL_TARGETS}
    names = _chosen(parser, "--targets", args.targets, list(by_name))
    args.scenario_list = scenarios[:1] if args.quick else scenarios
    args.target_list = [by_name[n] for n in names if not (args.quick and n in NOT_IN_QUICK)]
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.duration is None:
        args.duration = QUICK_DURATION if args.quick else 10.0
    paced = args.paced if args.paced is not None else (QUICK_PACED if args.quick else "0.5,0.8")
    try:
        args.paced_fractions = [float(f) for f in paced.split(",") if f.strip()]
    except ValueError:
        parser.error(f"--paced: {paced!r} is not a list of fractions like 0.5,0.8")
    if any(not 0 < f <= 1 for f in args.paced_fractions):
        parser.error("--paced: each fraction must be above 0 and at most 1")
    return args


def _chosen(
    parser: argparse.ArgumentParser, option: str, value: str, choices: Sequence[str]
) -> list[str]:
    """The comma-separated names of `value`, each one of `choices`, at least one."""
    names = [n for n in value.split(",") if n]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        parser.error(
            f"{option}: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(choices)}"
        )
    return names


def targets_for(args: argparse.Namespace, scenario: str) -> list[Target]:
    only = ONLY_FOR.get(scenario)
    return [t for t in args.target_list if only is None or t.name in only]


def paced_targets(args: argparse.Namespace, scenario: str) -> list[Target]:
    """nginx and incrementer-wal, when both run and the scenario is one paced runs compare."""
    if scenario not in scaleout.PACED_SCENARIOS or not args.paced_fractions:
        return []
    chosen = [t for t in args.target_list if t.name in scaleout.PACED_TARGETS]
    return chosen if len(chosen) == len(scaleout.PACED_TARGETS) else []


def runs_in(args: argparse.Namespace, scenario: str) -> int:
    """Runs of one scenario in one round: closed-loop, then paced."""
    closed = len(targets_for(args, scenario))
    return closed + len(args.paced_fractions) * len(paced_targets(args, scenario))


def exact_command(argv: list[str]) -> str:
    """The command as typed, with the environment that changes what is measured."""
    python = Path(sys.executable)
    shown_python = os.path.relpath(python, ROOT) if python.is_relative_to(ROOT) else str(python)
    env = [
        f"{k}={shlex.quote(os.environ[k])}"
        for k in ("PYTHONOPTIMIZE", "BENCH_PG_ADMIN_URL")
        if os.environ.get(k)
    ]
    return " ".join([*env, shown_python, "-m", "bench.run", *map(shlex.quote, argv)])


def results_path(directory: Path, stamp: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path, n = directory / f"{stamp}.md", 1
    while path.exists():
        n += 1
        path = directory / f"{stamp}-{n}.md"
    return path


async def run_all(
    args: argparse.Namespace, console: Console, run_id: str, workroot: Path
) -> list[RunResult]:
    # Round after round, and within a scenario every target back to back, so that targets compared
    # in one row of the report ran minutes apart at most on a machine whose speed drifts. The
    # paced runs follow their scenario's closed-loop runs: their rate comes from nginx's req/s.
    blocks = [(n, s) for n in range(1, args.rounds + 1) for s in args.scenario_list]
    total = sum(runs_in(args, s) for _, s in blocks)
    results: list[RunResult] = []
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<42}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("benchmark", total=total)
        current = progress.add_task("", total=100)

        async def one(
            round_number: int, scenario: str, target: Target, rate: float | None = None
        ) -> RunResult:
            paced = f" at {rate:,.0f} req/s" if rate else ""
            progress.update(overall, description=f"{scenario} / {target.name}{paced}")
            suffix = f"-{rate:.0f}rps" if rate else ""
            workdir = workroot / f"r{round_number}-{scenario}-{target.name}{suffix}"

            def on_progress(text: str, fraction: float) -> None:
                progress.update(current, description=text, completed=round(fraction * 100))

            result = await measure(
                target,
                scenario,
                run_id,
                workdir,
                args.duration,
                args.connections,
                on_progress,
                round_number,
                rate,
            )
            results.append(result)
            shutil.rmtree(workdir / "data", ignore_errors=True)  # WAL segments: large, not needed
            progress.advance(overall)
            console.print(_one_line(result))
            return result

        for round_number, scenario in blocks:
            ceiling = 0.0
            for target in targets_for(args, scenario):
                result = await one(round_number, scenario, target)
                if target.name == NGINX.name and result.load is not None:
                    ceiling = result.rps
            for fraction in args.paced_fractions if ceiling else []:
                for target in paced_targets(args, scenario):
                    await one(round_number, scenario, target, fraction * ceiling)
    return results


def _one_line(r: RunResult) -> str:
    paced = f" paced {r.rate:,.0f}/s" if r.rate else ""
    head = f"r{r.round_number} {r.scenario:>9} {r.target.name + paced:<36}"
    if r.error:
        return f"[red]{head} failed: {r.error.splitlines()[0]}[/red]"
    verdict = {None: "", True: "totals verified", False: "[red]TOTALS WRONG[/red]"}[r.verified]
    p99 = r.load.latency_ms["p99"] if r.load else 0.0
    return f"{head} {r.rps:>10,.0f} req/s  p99 {p99:6.2f} ms  {verdict}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Wide enough for the table when the output goes to a file or CI log rather than a terminal.
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 180)
    pg_version = preflight.check("bench.run")
    if pg_version is None:
        return 2
    now = datetime.now()
    stamp = now.strftime("%Y-%m-%d-%H%M")
    run_id = "b" + uuid.uuid4().hex[:6]
    workroot = WORK / f"{stamp}-{run_id}"
    machine_info = machine.describe(pg_version)
    command = exact_command(argv)
    runs = sum(runs_in(args, s) for s in args.scenario_list)
    console.print(
        f"[bold]incrementer benchmark[/bold] {stamp}: "
        f"{args.rounds * runs} runs of "
        f"{args.duration:g} s "
        f"(logs in {os.path.relpath(workroot, ROOT)})"
    )

    every = asyncio.run(run_all(args, console, run_id, workroot))
    results = representatives(every)
    flush: FlushResult | None = None
    flush_error = ""
    if not args.quick:
        console.print("isolated flush: apply_batch of 100,000 keys (bench/flush.py)")
        try:
            flush = asyncio.run(measure_flush())
        except (OSError, TimeoutError, RuntimeError, *database.ERRORS) as exc:
            flush_error = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]isolated flush failed: {flush_error}[/red]")
        else:
            for line in tables.flush_lines(flush):
                console.print(line)

    found = (
        checks.checks(results, every, flush)
        + scaleout.checks(results, every)
        + buckets.checks(results, every)
    )
    console.print(tables.results_table(results, every))
    console.print(tables.cpu_table(results))
    for table in scaleout.rich_tables(results, every) + buckets.rich_tables(results, every):
        console.print(table)
    console.print(checks.checks_table(found))
    md_path = results_path(args.results_dir, stamp)
    png_path = plot.plot(results, md_path.with_suffix(".png"))
    settings = {
        "Started": now.isoformat(timespec="seconds"),
        "Load": f"wrk -t1 -c{args.connections} -d{args.duration:g}s, bench/wrk/increments.lua"
        + (
            f"; paced runs: bench/wrk/paced.lua at {', '.join(f'{f:g}' for f in args.paced_fractions)}"
            " x nginx's req/s of the same round and scenario"
            if args.paced_fractions
            else ""
        ),
        "Scenarios": ", ".join(args.scenario_list) + f" (batch: {BATCH_SIZE} increments/request)",
        "Targets": ", ".join(t.name for t in args.target_list),
        "Rounds": f"{args.rounds} (the tables show each target's median run by req/s)",
        "Service": "incrementer serve with its defaults but --durability (and, for "
        "incrementer-wal-auth, --auth required with an API key rated 10M requests/s; for "
        "incrementer-wal-deferred, " + " ".join(INCREMENTER_DEFERRED.flags) + ": no flush "
        "during the load; for incrementer-wal-2w, --workers 2; for incrementer-wal-buckets, --buckets minute,hour,day), on PostgreSQL; each run on a "
        "fresh database and data dir. 10mkeys runs only " + ", ".join(ONLY_FOR["10mkeys"]),
        "Asserts": "disabled (PYTHONOPTIMIZE)" if os.environ.get("PYTHONOPTIMIZE") else "on",
    }
    extra = scaleout.sections(results, every) + buckets.sections(results, every)
    text = markdown.markdown(
        stamp, command, machine_info, settings, results, every, found, png_path, flush, extra
    )
    md_path.write_text(text)
    failed: list[object] = [r for r in every if not r.ok]
    if flush_error:
        failed.append(flush_error)
    if not failed:
        shutil.rmtree(workroot, ignore_errors=True)
    else:
        console.print(f"[red]{len(failed)} run(s) failed[/red]; server logs kept in {workroot}")
    print(f"report: {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
