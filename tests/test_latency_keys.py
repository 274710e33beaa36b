"""`python -m bench.latency_keys`: p99 by the size of the key space, and what the event loop waited
behind in the run queue (`perf sched timehist`, read by bench/report/sched.py). The reading is
checked on an excerpt recorded on this machine, where the service's loop waited 3.1 ms behind
PostgreSQL's backend; a short real run writes its report, with the scheduler recorded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import skip_or_fail

from bench.harness import machine
from bench.harness.cluster import binaries
from bench.latency_keys import perf_works
from bench.report import sched

ROOT = Path(__file__).resolve().parent.parent

# `perf sched timehist -w` around one wait of the service (pid 1747): woken by wrk at 1808.650786
# on CPU 0 and queued on CPU 1, where PostgreSQL's backend (1758) had just begun a 3.257 ms slice,
# while CPU 0 went idle. One of the service's other threads (1767) and a short wait of its loop
# are in the excerpt too.
EXCERPT = """\
           time    cpu  task name                       wait time  sch delay   run time
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------
    1808.650575 [0000]  postgres[1758]                      0.269      0.000      3.149
    1808.650649 [0001]  <idle>                              1.138      0.000      2.735
    1808.650786 [0000]  wrk[1803/1801]                                                   awakened: python[1747]
    1808.651147 [0000]  wrk[1803/1801]                      3.149      3.032      0.571
    1808.652100 [0000]  python[1767/1747]                   1.948      1.248      0.045
    1808.653375 [0000]  <idle>                             11.315      0.000      2.228
    1808.653906 [0001]  postgres[1758]                      0.073      0.000      3.257
    1808.658573 [0001]  python[1747]                        5.993      3.120      4.667
    1808.658722 [0001]  postgres[1758]                      4.667      3.367      0.148
    1808.659900 [0001]  python[1747]                        0.300      0.200      1.000
"""


def test_a_wait_of_the_loop_is_put_on_what_held_its_cpu() -> None:
    """The loop's 3.12 ms in the run queue goes to the backend that ran on its CPU meanwhile,
    not to the idle CPU next door; the service's other thread and the loop's short wait are
    counted as what they are."""
    switches = sched.parse(EXCERPT)
    assert len(switches) == 9  # the header and the wakeup line are not switches
    waits = sched.waits(switches, 1747)
    assert waits.switches == 2
    assert waits.ran_ms == pytest.approx(5.667)
    assert waits.delay_ms == pytest.approx(3.32)
    assert waits.slow == 1 and waits.slow_ms == pytest.approx(3.12)
    assert waits.behind.keys() == {"postgres"}
    assert waits.behind["postgres"] == pytest.approx(3.12, abs=0.001)
    assert sched.waits(switches, 1767).switches == 0  # a thread is not its process's loop


def test_a_short_run_writes_p99_by_key_count_and_the_loops_waits(tmp_path: Path) -> None:
    """Two key counts, 3 s each, with the scheduler recorded: the report has a row for each,
    the time the loop ran in each recording, and the largest step between the two."""
    if machine.which("wrk") is None:
        skip_or_fail("wrk is not installed (Debian: apt-get install -y wrk)")
    if binaries() is None:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    if not perf_works():
        skip_or_fail("perf does not work (Debian: apt-get install -y linux-perf)")
    done = subprocess.run(
        [sys.executable, "-m", "bench.latency_keys", "--keys", "10,3162", "--seconds", "4",
         "--rounds", "1", "--rate", "5000", "--sched", "--results", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    reports = list(tmp_path.glob("latency-keys-*.md"))
    assert done.returncode == 0 and len(reports) == 1, done.stdout + done.stderr
    report = reports[0].read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in report.splitlines()
        if line.startswith("| ")
    }
    assert {"10", "3,162"} <= rows.keys(), report
    for key in ("10", "3,162"):
        p99, ran = float(rows[key][2]), float(rows[key][4])
        assert p99 > 0 and ran > 0, report  # the loop thread was found in the recording
    assert "`perf sched` recorded 2 s of each run." in report
    assert "Largest p99 step between neighbouring key counts of one round: " in report
    assert "x\n" in report.split("Largest p99 step")[1]
