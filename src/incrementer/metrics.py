"""Counters kept as plain integers on the hot path, exported by prometheus-client on scrape.

The names are a stable interface (alert rules and dashboards use them): docs/operations.md lists
every one. Labelled counters are exported at 0 for every label value the service can produce
(`declare`), so `rate()`, `increase()` and ratios work from the first event, not the second.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 10, 100, 1000, 5000, 10_000, 20_000, 50_000, 100_000, 500_000)


class Histogram:
    """Cumulative-on-export histogram: one bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


class Metrics:
    def __init__(self) -> None:
        self.accepted_requests = 0  # 202s of POST /increment: one increment each, the hot path
        self.accepted_batch_increments = 0  # increments of accepted POST /increments
        self.requests: dict[tuple[str, int], int] = {}
        self.rejected: dict[str, int] = {}
        self.rejected_connections = 0
        self.wal_failures = {"write": 0, "fsync": 0}
        # Idempotent batches: what each request with an Idempotency-Key got (unchecked: taken
        # in without the database lookup, the database being down; refused: over the sender's
        # --idempotency-keys-per-client), and how each flush settled
        # them (duplicate: the key was applied before with the same body, so this copy was not).
        self.idempotent_requests = {
            "accepted": 0,
            "unchecked": 0,
            "replayed": 0,
            "conflict": 0,
            "refused": 0,
        }
        self.idempotent_settled = {"applied": 0, "duplicate": 0, "conflict": 0}
        self.idempotency_keys_swept = 0
        # Exchanges with the store of shared rate limits (auth/reconcile.py), by result.
        self.rate_limit_syncs = {"ok": 0, "failed": 0}
        self.rate_limit_sync_seconds = Histogram(LATENCY_BUCKETS)
        self.bucket_rows_swept = 0  # counter_buckets rows deleted past --bucket-retention
        self.flushes = 0
        self.flush_failures = 0
        self.skipped_batches = 0
        self.overflowed_keys = 0
        self.flushed_keys = 0
        self.flush_seconds = Histogram(LATENCY_BUCKETS)
        self.flush_keys = Histogram(SIZE_BUCKETS)
        self.lag_seconds = Histogram(LAG_BUCKETS)
        self.fsync_seconds = Histogram(LATENCY_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.build_info: dict[str, str] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ... (Linux)
        ProcessCollector(registry=self.registry)

    def declare(self, requests: Iterable[tuple[str, int]], reasons: Iterable[str]) -> None:
        """Export these (route, status) pairs and refusal reasons at 0 until they happen."""
        for key in requests:
            if key != ("increment", 202):  # exported from accepted_requests
                self.requests.setdefault(key, 0)
        for reason in reasons:
            self.rejected.setdefault(reason, 0)

    @property
    def accepted_increments(self) -> int:
        """Derived at scrape time, so the hot path bumps one counter per request, not two."""
        return self.accepted_requests + self.accepted_batch_increments

    def count_request(self, route: str, status: int) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def unaccept(self, singles: int, batches: int, increments: int) -> None:
        """Requests counted as accepted (202) whose WAL write then failed: their answer became
        503 wal_unavailable, so they move there, and their increments to the refused."""
        self.accepted_requests -= singles
        self.accepted_batch_increments -= increments - singles
        accepted_batches = ("increments", 202)
        self.requests[accepted_batches] = self.requests.get(accepted_batches, 0) - batches
        for route, count in (("increment", singles), ("increments", batches)):
            refused = (route, 503)
            self.requests[refused] = self.requests.get(refused, 0) + count
        self.count_rejected("wal_unavailable", increments)

    def count_rejected(self, reason: str, increments: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + increments

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (doc, read)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "incrementer_http_requests",
            "HTTP requests by route and status.",
            labels=["route", "status"],
        )
        # The fast path's 202s, plus those of POST /increment with an Idempotency-Key.
        counts = dict(self.requests)
        counts[("increment", 202)] = counts.get(("increment", 202), 0) + self.accepted_requests
        for (route, status), count in sorted(counts.items()):
            requests.add_metric([route, str(status)], count)
        yield requests
        rejected = CounterMetricFamily(
            "incrementer_rejected_increments", "Increments refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(self.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        simple = {
            "incrementer_accepted_increments": (
                "Increments accepted (acknowledged).",
                self.accepted_increments,
            ),
            "incrementer_rejected_connections": (
                "Connections refused at the connection limit.",
                self.rejected_connections,
            ),
            "incrementer_flushes": ("Batches committed to the database.", self.flushes),
            "incrementer_flush_failures": (
                "Flush attempts that failed (retried).",
                self.flush_failures,
            ),
            "incrementer_skipped_batches": (
                "Batches found already applied (exactly-once).",
                self.skipped_batches,
            ),
            "incrementer_flushed_keys": ("Key rows upserted.", self.flushed_keys),
            "incrementer_overflowed_keys": (
                "Keys isolated because their total would overflow.",
                self.overflowed_keys,
            ),
        }
        for name, (doc, value) in simple.items():
            yield CounterMetricFamily(name, doc, value=value)
        wal_failures = CounterMetricFamily(
            "incrementer_wal_failures",
            "WAL writes and fsyncs that failed (the disk is full or broken).",
            labels=["operation"],
        )
        for operation, count in self.wal_failures.items():
            wal_failures.add_metric([operation], count)
        yield wal_failures
        keyed = CounterMetricFamily(
            "incrementer_idempotent_requests",
            "Requests with an Idempotency-Key, by outcome.",
            labels=["outcome"],
        )
        for outcome, count in self.idempotent_requests.items():
            keyed.add_metric([outcome], count)
        yield keyed
        settled = CounterMetricFamily(
            "incrementer_idempotent_batches_settled",
            "Idempotent batches settled by a flush: applied, or left out as a duplicate or a "
            "conflicting reuse of a key applied before.",
            labels=["result"],
        )
        for result, count in self.idempotent_settled.items():
            settled.add_metric([result], count)
        yield settled
        yield CounterMetricFamily(
            "incrementer_idempotency_keys_swept",
            "Idempotency keys deleted from the database after --idempotency-window.",
            value=self.idempotency_keys_swept,
        )
        syncs = CounterMetricFamily(
            "incrementer_rate_limit_syncs",
            "Exchanges with the store of the shared rate limits (a --workers group's supervisor, "
            "or --rate-limit-store), by result.",
            labels=["result"],
        )
        for result, count in self.rate_limit_syncs.items():
            syncs.add_metric([result], count)
        yield syncs
        yield self.rate_limit_sync_seconds.family(
            "incrementer_rate_limit_sync_duration_seconds",
            "Time of one successful exchange with the store of the shared rate limits.",
        )
        yield CounterMetricFamily(
            "incrementer_bucket_rows_swept",
            "Time bucket rows deleted from the database after --bucket-retention.",
            value=self.bucket_rows_swept,
        )
        yield self.flush_seconds.family(
            "incrementer_flush_duration_seconds", "Time to apply one batch."
        )
        yield self.flush_keys.family("incrementer_flush_keys", "Dirty keys per flush.")
        yield self.lag_seconds.family(
            "incrementer_persistence_lag_seconds",
            "Age of the oldest increment of each batch at commit.",
        )
        yield self.fsync_seconds.family(
            "incrementer_wal_fsync_duration_seconds", "Time of one WAL fdatasync."
        )
        for name, (doc, read) in sorted(self.gauges.items()):
            yield GaugeMetricFamily(name, doc, value=read())
        if self.build_info:
            yield InfoMetricFamily(
                "incrementer_build",
                "The running version, and whether its hot path is compiled or pure Python.",
                value=self.build_info,
            )
