"""What the processes of one `--workers` group share: a run directory under the data dir.

Whichever worker the kernel hands a connection answers for the whole group, so each worker
publishes, four times a second and when it stops, what the others need:

- its metrics, into prometheus-client's multiprocess files (`run/metrics/*.db`), which the worker
  answering `/metrics` merges. The hot path keeps counting in plain integers (metrics.py); only
  this periodic copy touches the files. Counters and histograms are summed over every process
  the group has run, the dead included (their counts happened); gauges are summed over the live
  workers, except those in GAUGE_MODES (a worst case, or a start time) and those in PER_WORKER
  (one series per worker, labelled `worker`).
- its readiness (`run/ready/worker-N.json`): why it is not ready, its lag and pending keys, which
  the worker answering `/readyz` adds to its own (app.py). A worker silent for STALE_AFTER
  seconds is reported as `worker_unresponsive`.

The supervisor empties the directory when the group starts and removes a worker's live gauges and
readiness when it reaps it. Figures from other workers are up to PUBLISH_EVERY old.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from incrementer.api.handler import App
    from incrementer.metrics import Metrics

log = logging.getLogger("incrementer.group")

# Often enough that a scrape's sum of counters is close to exact, rarely enough to cost nothing
# (one publish is ~0.2 ms of Python).
PUBLISH_EVERY = 0.25
STALE_AFTER = 5.0
GAUGE_MODES = {
    "incrementer_oldest_pending_seconds": "livemax",  # the alert is about the worst worker
    "incrementer_flush_interval_seconds": "livemax",
    "incrementer_build_info": "livemax",
    # Each worker's gauge is the group's verdict; a frozen worker's stale 1 must not hide it.
    "incrementer_ready": "livemin",
    "process_start_time_seconds": "livemin",
    "process_max_fds": "livemin",
}
"""How a gauge is combined over the live workers when it is not summed."""
PER_WORKER = frozenset({"incrementer_open_connections"})
"""Gauges shown per worker, labelled worker="N": how the kernel spreads the connections."""


def metrics_dir(run_dir: Path) -> Path:
    return run_dir / "metrics"


def ready_dir(run_dir: Path) -> Path:
    return run_dir / "ready"


def reset(run_dir: Path) -> None:
    """A new group starts with no figures: the files of an earlier group would be summed in."""
    shutil.rmtree(run_dir, ignore_errors=True)
    metrics_dir(run_dir).mkdir(parents=True)
    ready_dir(run_dir).mkdir()


def forget(run_dir: Path, ident: str, index: int) -> None:
    """A worker process has exited: drop its live gauges and its readiness; its counters stay."""
    for path in metrics_dir(run_dir).glob(f"gauge_live*_{ident}.db"):
        path.unlink(missing_ok=True)
    (ready_dir(run_dir) / f"worker-{index}.json").unlink(missing_ok=True)


class Publisher:
    """Copies one process's registry into its multiprocess files, named after `ident` (unique
    for the life of the group, unlike a pid, which the system may give again)."""

    def __init__(
        self, source: CollectorRegistry, directory: Path, ident: str, labels: dict[str, str]
    ) -> None:
        self.source = source
        self.directory = directory
        self.ident = ident
        self.labels = labels  # added to the PER_WORKER gauges
        self._files: dict[str, MmapedDict] = {}
        self._keys: dict[tuple[str, str, tuple[tuple[str, str], ...]], str] = {}

    def publish(self) -> None:
        for family in self.source.collect():
            for kind, metric_name, name, labels, value in self._samples(family):
                self._write(kind, metric_name, name, labels, value, family.documentation)

    def _samples(self, family: Metric) -> Iterator[tuple[str, str, str, dict[str, str], float]]:
        """(file kind, metric name, sample name, labels, value) as the multiprocess collector
        reads them back."""
        if family.type == "counter":
            for s in family.samples:
                if s.name.endswith("_total"):
                    yield "counter", family.name, s.name, s.labels, s.value
        elif family.type == "histogram":
            # The files hold each bucket's own count; the collector makes them cumulative.
            below: dict[tuple[tuple[str, str], ...], float] = {}
            for s in family.samples:
                if s.name.endswith("_sum"):
                    yield "histogram", family.name, s.name, s.labels, s.value
                elif s.name.endswith("_bucket"):
                    rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                    yield "histogram", family.name, s.name, s.labels, s.value - below.get(rest, 0)
                    below[rest] = s.value
        elif family.type in ("gauge", "info"):
            for s in family.samples:
                # An info family is exposed as the gauge `<name>_info` = 1: publish it so.
                name = s.name
                mode = GAUGE_MODES.get(name, "livesum")
                labels = {**s.labels, **self.labels} if name in PER_WORKER else s.labels
                yield f"gauge_{mode}", name, name, labels, s.value

    def _write(
        self,
        kind: str,
        metric_name: str,
        name: str,
        labels: dict[str, str],
        value: float,
        documentation: str,
    ) -> None:
        cache = (metric_name, name, tuple(sorted(labels.items())))
        key = self._keys.get(cache)
        if key is None:
            key = self._keys[cache] = mmap_key(
                metric_name, name, list(labels), list(labels.values()), documentation
            )
        file = self._files.get(kind)
        if file is None:
            path = self.directory / f"{kind}_{self.ident}.db"
            file = self._files[kind] = MmapedDict(str(path))  # type: ignore[no-untyped-call]
        file.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        for file in self._files.values():
            file.close()  # type: ignore[no-untyped-call]
        self._files.clear()


class GroupCollector:
    """What /metrics shows in a worker: this process's figures published this instant, merged
    with every other worker's last ones."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.merged = MultiProcessCollector(None, path=str(publisher.directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        self.publisher.publish()
        return self.merged.collect()  # type: ignore[no-untyped-call,no-any-return]


@dataclass(frozen=True)
class Peer:
    """Another worker of the group, as it last published."""

    index: int
    reasons: list[dict[str, object]]
    lag: float
    pending_keys: int


class Member:
    """One worker's place in its group: publishing, its peers' readiness, and the word to the
    supervisor that it serves (a line on a pipe, once it listens)."""

    def __init__(self, index: int, ident: str, run_dir: Path, supervisor: int, notify_fd: int):
        self.index = index
        self.ident = ident
        self.run_dir = run_dir
        self.supervisor = supervisor
        self.notify_fd = notify_fd
        self._publisher: Publisher | None = None
        self._app: App | None = None
        self._stop: Callable[[], None] = lambda: None
        self._orphaned = False

    def join(self, metrics: Metrics, app: App, stop: Callable[[], None]) -> None:
        """Publish this process's metrics and readiness; answer /metrics and /readyz for all."""
        labels = {"worker": str(self.index)}
        publisher = Publisher(metrics.registry, metrics_dir(self.run_dir), self.ident, labels)
        self._publisher = publisher
        group_registry = CollectorRegistry(auto_describe=False)
        group_registry.register(GroupCollector(publisher))
        metrics.registry = group_registry
        app.group = self
        self._app = app
        self._stop = stop

    def ready(self) -> None:
        """Listening: tell the supervisor (who counts the group up once every worker says so)."""
        os.write(self.notify_fd, b"ready\n")
        os.close(self.notify_fd)

    async def run(self) -> None:
        while True:
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
        if self._publisher is None or self._app is None:
            return
        self._publisher.publish()
        now = time.monotonic()
        app = self._app
        state = {
            "at": now,
            "pid": os.getpid(),
            "problems": app.problems(now),
            "lag": app.flusher.oldest_pending_age(now),
            "pending_keys": app.flusher.pending_keys(),
        }
        path = ready_dir(self.run_dir) / f"worker-{self.index}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)  # a reader sees the old state or the new, never half

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
                reasons = [_reason("worker_unresponsive", age, index)]
            else:
                reasons = [_reason(code, now - since, index) for code, since in state["problems"]]
            found.append(Peer(index, reasons, float(state["lag"]), int(state["pending_keys"])))
        return sorted(found, key=lambda peer: peer.index)

    def leave(self) -> None:
        """The final publish, after the final flush: the group's counters include all of it."""
        if self._publisher is not None:
            self._publisher.publish()
            self._publisher.close()


def _reason(code: str, seconds: float, worker: int) -> dict[str, object]:
    return {"code": code, "for_seconds": round(seconds, 3), "worker": worker}
