"""Reading a target's /metrics: Prometheus text, histogram quantiles, a once-a-second sampler."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

LAG = "incrementer_persistence_lag_seconds"
FLUSH_SECONDS = "incrementer_flush_duration_seconds"
FLUSH_KEYS = "incrementer_flush_keys"
OLDEST_PENDING = "incrementer_oldest_pending_seconds"
HTTP_TIMEOUT = 5.0

Samples = dict[str, float]
"""Series as written in the exposition (`name{label="x"}`) -> value."""


async def http_get(
    url: str, path: str, timeout: float = HTTP_TIMEOUT, api_key: str = ""
) -> tuple[int, bytes]:
    """One GET on its own connection (Connection: close): status and body. With `api_key`, it
    sends `Authorization: Bearer` it (/metrics needs a key when the service runs with auth)."""
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: bench\r\n{auth}Connection: close\r\n\r\n".encode()
            )
            raw = await reader.read(-1)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def parse(text: str) -> Samples:
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            samples[series] = float(value)
    return samples


async def scrape(url: str, api_key: str = "") -> Samples:
    status, body = await http_get(url, "/metrics", api_key=api_key)
    if status != 200:
        raise OSError(f"GET {url}/metrics answered {status}")
    return parse(body.decode())


def histogram(samples: Samples, name: str) -> list[tuple[float, float]]:
    """Cumulative buckets (upper bound, count), sorted, from `name_bucket{le="..."}` series."""
    start = f'{name}_bucket{{le="'
    buckets = [
        (float(series[len(start) : -2]), value)
        for series, value in samples.items()
        if series.startswith(start)
    ]
    return sorted(buckets)


def histogram_delta(before: Samples, after: Samples, name: str) -> list[tuple[float, float]]:
    """Observations made between two scrapes."""
    old = dict(histogram(before, name))
    return [(le, count - old.get(le, 0.0)) for le, count in histogram(after, name)]


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
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


def delta(before: Samples, after: Samples, series: str) -> float:
    return after.get(series, 0.0) - before.get(series, 0.0)


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
            timeline.lag.append(samples.get(OLDEST_PENDING, 0.0))
            commits = delta(last, samples, LAG + "_count")
            timeline.lag_mean.append(
                delta(last, samples, LAG + "_sum") / commits if commits else None
            )
        last, last_time = samples, now
    return timeline
