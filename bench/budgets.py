"""What the accounting per client costs: req/s and server CPU per request at 10 keys, this build
against a baseline build (another interpreter, with another incrementer installed), alternating.

    .venv-compiled/bin/python -m bench.budgets --baseline /path/to/main/venv/bin/python
                                               [--seconds 8] [--rounds 3]

Each variant runs wrk (bench.run's 10keys scenario, 32 connections) against one incrementer
(durability wal, PostgreSQL) started by the baseline's interpreter, then by this one, --rounds
times: the build under test pays, on every request of the fast path, the client's name handed to
the intake, and per new key its share's count; a batch, its charge per increment. Variants:

- keys on, one key whose rate limit never refuses (as bench.run's incrementer-wal-auth): every
  request a Bearer lookup in the cache, a token, the share;
- keys off, a limit per client address that never refuses (`--rate-limit 1e9`).

Ratios of medians within one run are what to read: absolute figures drift on a shared machine.
Server CPU per request (all its processes, from /proc) moves less than req/s with the machine's
other load. Writes bench/results/budgets-<date>.md. Needs PostgreSQL (as bench.run) and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench.harness import database, procfs
from bench.harness.load import Load, run_wrk
from bench.harness.paths import RESULTS
from bench.harness.targets import Target, create_api_key, running


@dataclass
class Runs:
    """One variant's runs: req/s and server CPU µs per request, baseline and this build."""

    label: str
    base: list[float] = field(default_factory=list)
    this: list[float] = field(default_factory=list)
    cpu_base: list[float] = field(default_factory=list)
    cpu_this: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.this) / statistics.median(self.base)

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.cpu_this) / statistics.median(self.cpu_base)


VARIANTS = [
    ("keys on, one key never refused", True, ()),
    ("keys off, a limit per address never refusing", False, ("--rate-limit", "1e9")),
]


async def measure(baseline: str, workdir: Path, seconds: float, rounds: int) -> list[Runs]:
    found: list[Runs] = []
    async with database.fresh_database("budgets") as url:
        api_key = await create_api_key(url)
        for index, (label, auth, flags) in enumerate(VARIANTS):
            runs = Runs(label)
            for round_ in range(rounds):
                # Alternating, so that drift hits both alike.
                for this, python in ((False, baseline), (True, sys.executable)):
                    target = Target(
                        "incrementer-wal", "incrementer", "wal", auth=auth, flags=flags,
                        python=python,
                    )  # fmt: skip
                    key = api_key if auth else ""
                    where = workdir / f"{index}-{round_}-{'this' if this else 'base'}"
                    async with running(target, where, url, key) as server:
                        prefix = f"b{index}{round_}{int(this)}-"
                        load = Load(server.url, "10keys", prefix, round_, seconds, 32, key)
                        before = procfs.process_group(server.pid)
                        result = await run_wrk(load)
                        spent = (procfs.process_group(server.pid) - before).total
                    cpu = spent / max(1, result.requests) * 1e6
                    (runs.this if this else runs.base).append(result.rps)
                    (runs.cpu_this if this else runs.cpu_base).append(cpu)
                    print(
                        f"{label}, round {round_ + 1}, {'this' if this else 'baseline'}: "
                        f"{result.rps:,.0f} req/s, {cpu:.2f} µs/request, "
                        f"{result.other_status} not 202",
                        flush=True,
                    )
            found.append(runs)
    return found


def report(baseline: str, seconds: float, rounds: int, found: list[Runs]) -> str:
    lines = [
        f"# Accounting per client, {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`{Path(sys.executable).name} -m bench.budgets --baseline {baseline} "
        f"--seconds {seconds:g} --rounds {rounds}`, this build `{sys.executable}` against the "
        f"baseline, alternating, on a machine shared with other work (load average "
        f"{os.getloadavg()[0]:.1f} at the end): compare ratios within this report.",
        "",
        f"## wrk 10keys, 32 connections, {seconds:g} s, {rounds} rounds each",
        "",
        "| variant | req/s baseline | req/s this | this / baseline "
        "| server CPU µs/request baseline | this | this / baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for runs in found:
        lines.append(
            f"| {runs.label} | {statistics.median(runs.base):,.0f} "
            f"| {statistics.median(runs.this):,.0f} | {runs.ratio:.3f} "
            f"| {statistics.median(runs.cpu_base):.2f} | {statistics.median(runs.cpu_this):.2f} "
            f"| {runs.cpu_ratio:.3f} |"
        )
    lines += [
        "",
        "Medians of the rounds. Every round, in order (req/s, baseline then this):",
        "",
    ]
    for runs in found:
        pairs = ", ".join(f"{b:,.0f} / {t:,.0f}" for b, t in zip(runs.base, runs.this, strict=True))
        lines.append(f"- {runs.label}: {pairs}")
    return "\n".join(lines) + "\n"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budgets", description=__doc__)
    parser.add_argument("--baseline", required=True, help="the baseline build's python")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-budgets-"))
    found = await measure(args.baseline, work, args.seconds, args.rounds)
    for runs in found:
        print(f"{runs.label}: req/s {runs.ratio:.3f}, CPU per request {runs.cpu_ratio:.3f}")
    out = RESULTS / f"budgets-{datetime.now():%Y-%m-%d-%H%M}.md"
    out.write_text(report(args.baseline, args.seconds, args.rounds, found))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
