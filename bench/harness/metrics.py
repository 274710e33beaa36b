"""Reading a target's /metrics: one scrape's samples, histogram quantiles, a once-a-second sampler.

The exposition is parsed by prometheus-client's own parser; the figures the benchmark reads are
the unlabelled samples (a counter's `_total`, a gauge, a histogram's `_sum`, `_count` and
`_bucket{le=...}`), as a single process or a group of workers merged exposes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from bench.harness import rawhttp

LAG = "incrementer_persistence_lag_seconds"
FLUSH_SECONDS = "incrementer_flush_duration_seconds"
FLUSH_KEYS = "incrementer_flush_keys"
OLDEST_PENDING = "incrementer_oldest_pending_seconds"

Buckets = list[tuple[float, float]]
"""A histogram's cumulative buckets: (upper bound, count), sorted by bound."""


@dataclass(frozen=True)
class Samples:
    """One scrape: each unlabelled sample's value by its name, and each histogram's buckets."""

    values: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, Buckets] = field(default_factory=dict)  # by histogram name

    def get(self, name: str, default: float | None = None) -> float | None:
        return self.values.get(name, default)

    def value(self, name: str) -> float:
        """The sample's value, 0 when the scrape has none (a figure not counted yet)."""
        return self.values.get(name, 0.0)


def parse(text: str) -> Samples:
    values: dict[str, float] = {}
    buckets: dict[str, Buckets] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
            elif sample.name.endswith("_bucket") and sample.labels.keys() == {"le"}:
                histogram = buckets.setdefault(sample.name.removesuffix("_bucket"), [])
                histogram.append((float(sample.labels["le"]), sample.value))
    return Samples(values, {name: sorted(found) for name, found in buckets.items()})


async def scrape(url: str, api_key: str = "") -> Samples:
    status, body = await rawhttp.request(url, "GET", "/metrics", api_key=api_key)
    if status != 200:
        raise OSError(f"GET {url}/metrics answered {status}")
    return parse(body.decode())


def histogram_delta(before: Samples, after: Samples, name: str) -> Buckets:
    """Observations made between two scrapes."""
    old = dict(before.buckets.get(name, []))
    return [(le, count - old.get(le, 0.0)) for le, count in after.buckets.get(name, [])]


def quantile(buckets: Buckets, q: float) -> float | None:
    """Like PromQL histogram_quantile: linear interpolation inside the bucket holding rank q.

    The answer lies within the bucket's bounds, so comparing it with a limit that is a bucket
    bound (0.25 s, 1 s for the lag) gives the same verdict as the exact observations would.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: say at least that much
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def delta(before: Samples, after: Samples, name: str) -> float:
    return after.value(name) - before.value(name)


@dataclass
class Timeline:
    """Once-a-second samples taken while the load runs: for the plot."""

    seconds: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)  # increments acknowledged per second
    lag: list[float] = field(default_factory=list)  # age of the oldest unflushed increment, s
    lag_mean: list[float | None] = field(default_factory=list)  # of the batches committed since
    errors: int = 0


async def sample(
    url: str,
    accepted_metric: str,
    stop: asyncio.Event,
    interval: float = 1.0,
    api_key: str = "",
) -> Timeline:
    """Scrape every `interval` until `stop` is set; rates come from the accepted-counter deltas."""
    timeline = Timeline()
    started = last_time = time.monotonic()
    last: Samples | None = None
    with contextlib.suppress(OSError, TimeoutError, ValueError):
        last = await scrape(url, api_key)
        last_time = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if stop.is_set():
            break
        try:
            samples = await scrape(url, api_key)
        except (OSError, TimeoutError, ValueError):
            timeline.errors += 1  # the target is too busy to answer in time: a gap in the plot
            continue
        now = time.monotonic()
        if last is not None:
            timeline.seconds.append(now - started)
            timeline.rate.append(delta(last, samples, accepted_metric) / (now - last_time))
            timeline.lag.append(samples.value(OLDEST_PENDING))
            commits = delta(last, samples, LAG + "_count")
            timeline.lag_mean.append(
                delta(last, samples, LAG + "_sum") / commits if commits else None
            )
        last, last_time = samples, now
    return timeline
