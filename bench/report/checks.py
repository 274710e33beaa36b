"""The performance targets: each a goal, the figure measured, and whether it was met.

A missed target is reported, not failed: a benchmark on a shared machine is not a test. Totals
are another matter: one acknowledged increment missing fails the run (bench/run.py's exit status).
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from bench.harness.apply_batch import TARGET_KEYS_PER_SECOND, FlushResult
from bench.harness.measure import RunResult
from bench.report.cells import num, rich_table, secs, times
from bench.report.compare import (
    MEMORY,
    NAIVE,
    NGINX,
    WAL,
    WAL_AUTH,
    find,
    p99,
    paired,
    totals_verified,
)


@dataclass(frozen=True)
class Check:
    what: str
    goal: str
    measured: str
    passed: bool


def checks(
    results: list[RunResult], every: list[RunResult], flush: FlushResult | None = None
) -> list[Check]:
    """The performance targets: ratios as medians of same-round pairs, other figures from the
    median runs, totals on every run of every round. The throughput, latency and lag targets
    hold with auth on as well, so they are checked for incrementer-wal-auth too."""
    found: list[Check] = []

    def add(
        what: str, goal: str, value: float | None, limit: float, at_least: bool, shown: str
    ) -> None:
        if value is not None:
            passed = value >= limit if at_least else value <= limit
            found.append(Check(what, goal, shown, passed))

    for scenario, share, lag_limit, name in (
        (scenario, share, lag_limit, name)
        for scenario, share, lag_limit in (("10keys", 0.9, 0.25), ("100kkeys", 0.75, 1.0))
        for name in (WAL, WAL_AUTH)
    ):
        wal = find(results, name, scenario)
        if wal is None:
            continue
        label = name.removeprefix("incrementer-")
        ratio = paired(every, name, scenario, NGINX)
        add(
            f"{scenario}: {label} throughput vs nginx",
            f">= {share}x",
            ratio,
            share,
            True,
            times(ratio),
        )
        slower = paired(every, name, scenario, NGINX, p99)
        add(
            f"{scenario}: {label} p99 latency vs nginx",
            "<= 2x",
            slower,
            2.0,
            False,
            f"{times(slower)} ({p99(wal):.2f} ms in the median run)",
        )
        add(
            f"{scenario}: {label} persistence lag p99",
            f"<= {secs(lag_limit)}",
            wal.lag_p99,
            lag_limit,
            False,
            secs(wal.lag_p99),
        )
        naive = paired(every, name, scenario, NAIVE)
        add(f"{scenario}: {label} vs naive", ">= 10x", naive, 10.0, True, times(naive))
    for scenario in ("10keys", "100kkeys", "batch"):
        versus_memory = paired(every, WAL, scenario, MEMORY)
        add(
            f"{scenario}: wal vs memory",
            ">= 0.85x",
            versus_memory,
            0.85,
            True,
            times(versus_memory),
        )
    for scenario in ("100kkeys", "batch"):
        wal = find(results, WAL, scenario)
        if wal is not None:
            add(
                f"{scenario}: wal flush throughput",
                ">= 150,000 keys/s",
                wal.flush_keys_per_second,
                150_000,
                True,
                f"{num(wal.flush_keys_per_second)} keys/s",
            )
    if flush is not None:
        add(
            "isolated flush throughput (bench/flush.py, median of the update batches)",
            f">= {TARGET_KEYS_PER_SECOND:,} keys/s",
            flush.median_update_rate,
            TARGET_KEYS_PER_SECOND,
            True,
            f"{num(flush.median_update_rate)} keys/s",
        )
    good, checked = totals_verified(every)
    if checked:
        found.append(
            Check(
                "totals verified (no acknowledged increment lost)",
                "all runs",
                f"{good}/{checked} runs",
                good == checked,
            )
        )
    return found


def checks_table(found: list[Check]) -> Table:
    body = [
        [c.what, c.goal, c.measured, "[green]pass[/green]" if c.passed else "[red]FAIL[/red]"]
        for c in found
    ]
    return rich_table("performance targets", ("Target", "Goal", "Measured", "Result"), body, 4)
