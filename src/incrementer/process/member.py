"""One worker's place in its `--workers` group: what it publishes for the others, what it reads
of theirs, and the word to the supervisor that it serves.

Whichever worker the kernel hands a connection answers for the whole group, so each worker
publishes, four times a second and when it stops, its metrics (metrics_files.py) and its
readiness (`run/ready/worker-N.json`: why it is not ready, its lag and pending keys), which the
worker answering `/readyz` adds to its own (api/readiness.py, through the Peers this class
implements). A worker silent for STALE_AFTER seconds is reported as `worker_unresponsive`.
Figures from other workers are up to PUBLISH_EVERY old.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from incrementer import faults
from incrementer.api.readiness import Peer, Readiness, reason_entry
from incrementer.metrics import Metrics
from incrementer.process.budget_channel import SupervisorBudgets
from incrementer.process.metrics_files import MergedCollector, Publisher
from incrementer.process.rundir import metrics_dir, ready_dir, ready_file

log = logging.getLogger("incrementer.group")

# Often enough that a scrape's sum of counters is close to exact, rarely enough to cost nothing
# (one publish is ~0.2 ms of Python).
PUBLISH_EVERY = 0.25
STALE_AFTER = 5.0


class Member:
    """One worker's place in its group: publishing, its peers' readiness, and the word to the
    supervisor that it serves (a line on a pipe, once it listens)."""

    def __init__(
        self,
        index: int,
        ident: str,
        run_dir: Path,
        supervisor: int,
        notify_fd: int,
        budget_fd: int = -1,
        workers: int = 1,
    ) -> None:
        self.index = index
        self.budget_fd = budget_fd
        self.workers = workers
        self.ident = ident
        self.run_dir = run_dir
        self.supervisor = supervisor
        self.notify_fd = notify_fd
        self._publisher: Publisher | None = None
        self._readiness: Readiness | None = None
        self._stop: Callable[[], None] = lambda: None
        self._orphaned = False
        self._publish_failed = False

    def join(self, metrics: Metrics, readiness: Readiness, stop: Callable[[], None]) -> None:
        """Publish this process's metrics and readiness; answer /metrics for all (readiness
        answers /readyz for all through peers(), given to it when the service built it)."""
        labels = {"worker": str(self.index)}
        publisher = Publisher(metrics.registry, metrics_dir(self.run_dir), self.ident, labels)
        self._publisher = publisher
        group_registry = CollectorRegistry(auto_describe=False)
        group_registry.register(MergedCollector(publisher))
        metrics.registry = group_registry
        self._readiness = readiness
        self._stop = stop

    def ready(self) -> None:
        """Listening: tell the supervisor (who counts the group up once every worker says so)."""
        os.write(self.notify_fd, b"ready\n")
        os.close(self.notify_fd)

    def budgets(self) -> SupervisorBudgets:
        """The group's shared rate-limit buckets, through the supervisor."""
        if self.budget_fd < 0:
            raise RuntimeError("the supervisor gave this worker no budget channel")
        return SupervisorBudgets(self.budget_fd, self.workers)

    async def run(self) -> None:
        while True:
            faults.hang_if_asked()
            self.publish()
            self._check_supervisor()
            await asyncio.sleep(PUBLISH_EVERY)

    def _check_supervisor(self) -> None:
        # The parent-death signal (worker.py) covers a supervisor killed outright; this covers
        # systems without one. Either way the worker drains like any stopped worker.
        if not self._orphaned and os.getppid() != self.supervisor:
            self._orphaned = True
            log.warning("the supervisor (pid %d) is gone; stopping", self.supervisor)
            self._stop()

    def publish(self) -> None:
        if self._publisher is None or self._readiness is None:
            return
        self._publisher.publish()
        now = time.monotonic()
        readiness = self._readiness
        state = {
            "at": now,
            "pid": os.getpid(),
            "problems": readiness.problems(now),
            "warnings": readiness.warnings(),
            "lag": readiness.lag(now),
            "pending_keys": readiness.pending_keys(),
        }
        path = ready_file(self.run_dir, self.index)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, path)  # a reader sees the old state or the new, never half
        except OSError as exc:  # a full disk: the supervisor's watchdog reads this file's age
            if not self._publish_failed:
                log.error("cannot publish this worker's state to %s: %s", path, exc)
            self._publish_failed = True
        else:
            self._publish_failed = False

    def peers(self, now: float) -> list[Peer]:
        """The other live workers' last published readiness (monotonic clock: one per host)."""
        found = []
        for path in ready_dir(self.run_dir).glob("worker-*.json"):
            index = int(path.stem.removeprefix("worker-"))
            if index == self.index:
                continue
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # reaped meanwhile
            age = now - float(state["at"])
            if age > STALE_AFTER:
                reasons = [reason_entry("worker_unresponsive", age, index)]
            else:
                reasons = [
                    reason_entry(code, now - since, index) for code, since in state["problems"]
                ]
            warnings = [reason_entry(code, now - since, index) for code, since in state["warnings"]]
            lag, pending = float(state["lag"]), int(state["pending_keys"])
            found.append(Peer(index, reasons, lag, pending, warnings))
        return sorted(found, key=lambda peer: peer.index)

    def leave(self) -> None:
        """The final publish, after the final flush: the group's counters include all of it."""
        if self._publisher is not None:
            self._publisher.publish()
            self._publisher.close()
