"""Which run stands for a target, and ratios between targets, paired within a round.

A machine shared with others drifts from minute to minute, so a ratio is only taken between runs
of the same round (minutes apart at most), and the ratios of several rounds are summarised by
their median.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from bench.harness.measure import RunResult

# The targets the report compares with each other (bench.harness.targets defines them all).
NGINX, NGINX_2W, LEAN, NAIVE = "nginx", "nginx-2w", "python-lean", "naive"
WAL, MEMORY = "incrementer-wal", "incrementer-memory"
WAL_AUTH, WAL_2W = "incrementer-wal-auth", "incrementer-wal-2w"
WAL_BUCKETS = "incrementer-wal-buckets"


def representatives(every: list[RunResult]) -> list[RunResult]:
    """Per scenario and target, the run with the median req/s (the lower one of an even count).
    Closed-loop runs only: the paced ones have their own section (report/scaleout.py)."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in every:
        if r.rate is not None:
            continue
        groups.setdefault((r.scenario, r.target.name), []).append(r)
    shown = []
    for runs in groups.values():
        loaded = sorted((r for r in runs if r.load is not None), key=lambda r: r.rps)
        shown.append(loaded[(len(loaded) - 1) // 2] if loaded else runs[0])
    return shown


def find(results: list[RunResult], target: str, scenario: str) -> RunResult | None:
    """The closed-loop run of `target` in `scenario` that completed its load, if any."""
    for r in results:
        if (
            r.target.name == target
            and r.scenario == scenario
            and r.load is not None
            and r.rate is None
        ):
            return r
    return None


def side_by_side(
    results: list[RunResult], first: str, second: str
) -> list[tuple[str, RunResult, RunResult]]:
    """Per scenario, in the order they ran: the runs of `first` and `second`, where both completed
    their load."""
    found = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        a, b = find(results, first, scenario), find(results, second, scenario)
        if a is not None and b is not None:
            found.append((scenario, a, b))
    return found


def paired(
    every: list[RunResult],
    target: str,
    scenario: str,
    against: str,
    measure: Callable[[RunResult], float] = lambda r: r.rps,
) -> float | None:
    """Median over rounds of measure(target) / measure(against), each pair from one round."""
    ratios = []
    for n in sorted({r.round_number for r in every}):
        one_round = [r for r in every if r.round_number == n]
        mine, base = find(one_round, target, scenario), find(one_round, against, scenario)
        if mine is not None and base is not None and measure(base):
            ratios.append(measure(mine) / measure(base))
    return statistics.median(ratios) if ratios else None


def p99(r: RunResult) -> float:
    return r.load.latency_ms["p99"] if r.load else 0.0


def server_us(r: RunResult) -> float | None:
    """The server's CPU microseconds per request (its whole process group)."""
    return r.us_per_request(r.cpu_server)


def totals_verified(every: list[RunResult]) -> tuple[int, int]:
    """(runs whose database totals were verified, runs with a database), over every round."""
    checked = [r for r in every if r.target.needs_database]
    return sum(1 for r in checked if r.ok and r.verified), len(checked)
