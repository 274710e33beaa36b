"""One of the N places in a `--workers` group, as the supervisor keeps it: the process filling it
now, how it has fared (its restarts' backoff), and whether its event loop still beats.

A worker's heartbeat is its readiness file, which its loop rewrites four times a second
(member.py): a loop stuck for --worker-timeout (gunicorn's `--timeout` is the model, and its
default of 30 s) stops rewriting it, while the process lives on and keeps taking its share of
new connections, answering none of them. Only a worker that said it serves is judged, so a long
WAL replay at start is never taken for a hang.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from incrementer.process import rundir

STABLE_AFTER = 10.0  # a worker up this long before it died starts its backoff over
BACKOFF_FIRST = 0.5  # the delay before the second restart of a worker that keeps dying
BACKOFF_MAX = 30.0


@dataclass
class WorkerSlot:
    """A restart fills the same slot with a new generation."""

    index: int
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    notify: int = -1  # read end of the worker's "ready" pipe
    started: float = 0.0
    ready: bool = False
    quick_deaths: int = 0  # deaths in a row, each soon after its start
    restart_at: float | None = None
    ready_at: float = 0.0  # wall clock: the heartbeat's age counts from here at most
    killed_stuck: bool = False

    @property
    def ident(self) -> str:
        """Names the worker's metrics files: unique in the group's life, unlike a pid."""
        return f"w{self.index}g{self.generation}"

    def restart_delay(self, lived: float) -> float:
        """The pause before restarting a worker that died after `lived` seconds: none, unless
        it keeps dying soon after its start (0.5 s, 1 s, 2 s ... up to 30 s)."""
        self.quick_deaths = 0 if lived >= STABLE_AFTER else self.quick_deaths + 1
        if self.quick_deaths <= 1:
            return 0.0
        return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** (self.quick_deaths - 2)))

    def stuck_for(self, run_dir: Path, now: float) -> float:
        """Seconds (wall clock) since the serving worker's loop last beat; 0 when it is not
        serving, or already being killed for it."""
        if self.proc is None or not self.ready or self.killed_stuck:
            return 0.0
        return now - max(rundir.heartbeat(run_dir, self.index) or 0.0, self.ready_at)


def how(code: int) -> str:
    """How a worker ended, from its exit status."""
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
