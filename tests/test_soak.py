"""The soak (`python -m bench.soak`) in its 60-second version: the service on a PostgreSQL cluster
of its own under a paced load with key churn, database restarts, a key rotation and idempotent
retries ends with exact totals and writes its report. Latency and memory targets need the full
30 minutes on a quiet machine (docs/performance.md): they are reported, not asserted."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import skip_or_fail

from bench.harness import machine
from bench.harness.cluster import Cluster, binaries
from bench.harness.targets import free_port
from bench.report.soak import Period, Soak, p99_drift, p99_step, render
from bench.soak import churn, climb_periods, cycle_periods

ROOT = Path(__file__).resolve().parent.parent


def test_churn_climbs_from_10_keys_to_a_million_and_back_one_step_a_period() -> None:
    """The key space of the soak's periods climbs from 10 to 1,000,000 on a log scale over the
    warm-up (a third of the run: ten one-minute periods of thirty), then comes back down the same
    way and climbs again: no period's key space is more than one step (3.6-fold) from the
    one before, and the same traffic recurs one climb and one descent later."""
    assert cycle_periods(1800, 60) == 18 and climb_periods(1800, 60) == 10
    keys = [churn(i, 10) for i in range(30)]
    assert keys[:10] == [10, 36, 129, 464, 1668, 5995, 21544, 77426, 278256, 1000000]
    assert keys[10:19] == keys[8::-1]  # back down to 10
    assert keys[18:28] == keys[:10] and keys[28] == keys[10]
    steps = [max(a, b) / min(a, b) for a, b in itertools.pairwise(keys)]
    assert max(steps) <= 3.6
    assert climb_periods(30, 5) == 2 and cycle_periods(30, 5) == 2
    assert [churn(i, 2) for i in range(3)] == [10, 1000000, 10]


def test_p99_is_judged_against_the_next_period_and_the_same_traffic_a_cycle_later() -> None:
    """The report's two p99 figures: the largest step between consecutive periods, and between
    periods one key-space cycle apart (the same traffic), both past the warm-up."""
    p99s = [50.0, 1.0, 3.0, 1.2, 3.3, 1.1, 7.0]
    periods = [Period(i, 10, 1.0, ms, 0, 0) for i, ms in enumerate(p99s)]
    assert p99_step(periods, 1) == pytest.approx(7.0 / 1.1)  # 50 ms is the warm-up's
    assert p99_step(periods[:-1], 1) == pytest.approx(3.3 / 1.1)
    assert p99_drift(periods, 1, 2) == pytest.approx(7.0 / 3.3)
    assert p99_drift(periods[:-1], 1, 2) == pytest.approx(1.2 / 1.0)


def test_a_run_too_short_for_the_cycle_comparison_says_so_and_does_not_fail_it() -> None:
    """40 one-minute periods climb over 14 (the warm-up) and recur 26 apart: after the warm-up
    no two periods are a cycle apart, and the report says the comparison was not made ("-")
    rather than that it failed; a cycle that fits is judged."""
    soak = Soak(2400, 60, 300, 2.0, 1.0, "now", cycle=26)
    soak.periods = [Period(i, 10, 1.0, 1.0 + i % 2 * 0.5, 0, 0) for i in range(40)]
    line = next(x for x in render(soak).splitlines() if "at the same traffic" in x)
    assert line.endswith("| no two that far apart after the warm-up | <= 2x | - |"), line
    soak.cycle = 12
    line = next(x for x in render(soak).splitlines() if "at the same traffic" in x)
    assert line.endswith("| 1.00x | <= 2x | yes |"), line


def test_a_short_soak_keeps_the_totals_exact(tmp_path: Path) -> None:
    """The 60-second version: half the measured ceiling, the key space climbing from 10 to 1M
    over the 20 s warm-up and back down, a step each 5 s, the database restarted every 20 s, the
    API key rotated half-way (the old one refused after its grace) and idempotent batches
    retried: the totals are exact and the report says so, period by period."""
    if machine.which("wrk") is None:
        skip_or_fail("wrk is not installed (Debian: apt-get install -y wrk)")
    if binaries() is None:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", "60", "--period", "5",
         "--restart-every", "20", "--ceiling-seconds", "3", "--database-nice", "5",
         "--results", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    reports = list(tmp_path.glob("soak-*.md"))
    assert done.returncode == 0 and len(reports) == 1, done.stdout + done.stderr
    report = reports[0].read_text()
    totals = next(line for line in report.splitlines() if line.startswith("| totals |"))
    assert totals.endswith("| yes |"), report
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| ")]
    keys = [row[2].strip() for row in rows if row[1].strip().isdigit()]
    assert keys == ["10", "464", "21,544", "1,000,000", "21,544", "464"] * 2, report
    assert "the old key refused at the end: yes" in report
    assert "--database-nice 5`" in report and "cluster (at nice 5:" in report
    drift = next(line for line in report.splitlines() if "at the same traffic" in line)
    assert drift.startswith("| p99, period to period at the same traffic (6 periods apart) | ")
    assert drift.split("|")[2].strip().endswith("x"), drift  # two periods a cycle apart: judged
    restarts = next(line for line in report.splitlines() if "database restarts" in line)
    assert restarts.count(" s") >= 2, restarts
    assert "counted once: 0;" not in report


def test_a_niced_cluster_serves_at_its_niceness_through_a_restart() -> None:
    """`--database-nice`: the cluster's server runs at the niceness asked, and so does the server
    a restart starts (the soak restarts its database every few minutes)."""
    if binaries() is None:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    cluster = Cluster(free_port(), nice=7)
    try:
        cluster.init()
        for step in (cluster.start, cluster.restart):
            step()
            pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
            assert os.getpriority(os.PRIO_PROCESS, pid) == 7
    finally:
        cluster.destroy()
