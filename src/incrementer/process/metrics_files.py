"""A `--workers` group's metrics: each process copies its registry into prometheus-client's
multiprocess files (`run/metrics/*.db`), and the worker answering `/metrics` merges them all.

The hot path keeps counting in plain integers (metrics.py); only this periodic copy (Member.run,
four times a second, and at exit) touches the files. Counters and histograms are summed over
every process the group has run, the dead included (their counts happened); gauges are summed
over the live workers, except those in GAUGE_MODES (a worst case, or a start time) and those in
PER_WORKER (one series per worker, labelled `worker`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

GAUGE_MODES = {
    "incrementer_oldest_pending_seconds": "livemax",  # the alert is about the worst worker
    "incrementer_flush_interval_seconds": "livemax",
    # The answering worker's, published as it answers: the others' are older by up to a beat.
    "incrementer_clock_seconds": "livemax",
    "incrementer_build_info": "livemax",
    # Each worker's gauge is the group's verdict; a frozen worker's stale 1 must not hide it.
    "incrementer_ready": "livemin",
    "incrementer_rate_limit_store_up": "livemin",  # one worker cut off is the group's problem
    "process_start_time_seconds": "livemin",
    "process_max_fds": "livemin",
}
"""How a gauge is combined over the live workers when it is not summed."""
PER_WORKER = frozenset({"incrementer_open_connections"})
"""Gauges shown per worker, labelled worker="N": how the kernel spreads the connections."""


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


class MergedCollector:
    """What /metrics shows in a worker: this process's figures published this instant, merged
    with every other worker's last ones."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.merged = MultiProcessCollector(None, path=str(publisher.directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        self.publisher.publish()
        return self.merged.collect()  # type: ignore[no-untyped-call,no-any-return]
