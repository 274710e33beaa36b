"""A long run at half the measured ceiling, with everything that happens over a night: keys
churning from 10 to 1M, the database restarted every few minutes, an API key rotated, a stream of
idempotent retries. It reports whether memory, file descriptors, latency and lag hold still, and
whether the totals are exact.

    .venv/bin/python -m bench.soak [--duration 1800] [--period 60] [--restart-every 300]
                                   [--rate R] [--ceiling-seconds 10] [--database-nice N]
                                   [--results DIR]

- `incrementer serve` (wal, --auth required) on a PostgreSQL cluster of its own (initdb, pg_ctl:
  bench/harness/cluster.py), which is restarted (`pg_ctl restart -m fast`) every --restart-every
  seconds: the service keeps acknowledging from its WAL and flushes once the database is back;
  with --database-nice N the cluster runs at that CPU niceness, as a database on a host of its
  own would take nothing from the service's cores;
- the ceiling: wrk closed-loop for --ceiling-seconds; then wrk paced at half of it (or --rate),
  one run per --period, each on new keys; the key space climbs from 10 to 1,000,000 on a log
  scale over the warm-up (the first third of the run), then comes back down the same way and
  climbs again, one step a period (3.6-fold with the defaults): the warm-up reaches the largest
  working set, so memory that still grows after it is a leak and not the scenario, and no period's
  traffic jumps from the one before (a real key space grows and shrinks; it does not fall from a
  million keys to ten in a minute);
- half-way, the API key is rotated (the old one keeps working for two periods, then is revoked:
  the load moves to the new key, and the old one must then get 401);
- beside the load, idempotent batches, each sent two or three times under its Idempotency-Key,
  with a two-minute --idempotency-window so that keys expire, here and in the database, all
  through the run;
- every second the service's RSS, open file descriptors and /readyz lag are sampled.

The report (bench/results/soak-DATE.md) has one row per period (p99, lag, RSS, fds) and the targets:
RSS growing less than 1 MiB per 10 minutes after the warm-up (the first third of the run); p99
within 2x from one period to the next after it, and within 2x of the period one cycle before,
which had the same traffic (from 10 keys to 1M a flush goes from a handful of rows to tens of
thousands, written by PostgreSQL on the same machine, so p99 climbs with the key space); totals
exact (the database sum of the run's keys equals the acknowledged increments, each idempotent batch
once). Exit status 1 when the totals are not exact (the other targets are reported, not enforced:
they need a quiet machine), 2 when wrk or PostgreSQL's binaries are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
import uuid
from pathlib import Path

from bench.harness import database, machine, metrics, procfs, rawhttp
from bench.harness.cluster import Cluster, binaries
from bench.harness.load import Load, run_wrk
from bench.harness.paths import RESULTS, WORK
from bench.harness.targets import Target, create_api_key, free_port, running
from bench.report.soak import Period, Soak, render, warmup
from incrementer.auth import admin

# A two-minute idempotency window: keys expire, in memory and in the database's sweep, many times
# over the run (with the default 24 h the ledger only grows for a whole soak, toward its bound).
IDEMPOTENCY_WINDOW = 120
TARGET = Target(
    "incrementer-soak",
    "incrementer",
    "wal",
    auth=True,
    flags=("--auth-refresh", "2", "--idempotency-window", str(IDEMPOTENCY_WINDOW)),
)
CONNECTIONS = 32
KEYS_FROM, KEYS_TO = 10, 1_000_000
IDEMPOTENT_EVERY = 0.2  # seconds between two idempotent batches
IDEMPOTENT_ITEMS = 5
TOTALS_TIMEOUT = 60.0


def churn(index: int, climb: int) -> int:
    """Keys of period index: up from KEYS_FROM to KEYS_TO evenly on a log scale over `climb`
    periods, then down again the same way, and so on (a triangle: no period's key space is
    more than one step from the one before)."""
    if climb <= 1:
        return KEYS_TO
    steps = climb - 1
    position = index % (2 * steps)
    height = position if position <= steps else 2 * steps - position
    growth: float = (KEYS_TO / KEYS_FROM) ** (height / steps)
    return round(KEYS_FROM * growth)


def climb_periods(duration: float, period: float) -> int:
    """Periods per climb from 10 keys to 1M: those of the warm-up, at least two."""
    return max(2, math.ceil(warmup(duration) / period))


def cycle_periods(duration: float, period: float) -> int:
    """Periods between two with the same traffic: one climb up and one down."""
    return 2 * (climb_periods(duration, period) - 1)


async def main(args: argparse.Namespace) -> int:
    if machine.which("wrk") is None or binaries() is None:
        print(
            "bench.soak: needs wrk and PostgreSQL's server binaries (initdb, pg_ctl)",
            file=sys.stderr,
        )
        return 2
    run_id = uuid.uuid4().hex[:8]
    workdir = WORK / f"soak-{run_id}"
    cluster = Cluster(free_port(), nice=args.database_nice)
    await asyncio.to_thread(cluster.init)
    await asyncio.to_thread(cluster.start)
    try:
        result = await soak(args, cluster, workdir, f"soak-{run_id}-")
    finally:
        await asyncio.to_thread(cluster.destroy)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    report = results / f"soak-{result.started}.md"
    report.write_text(render(result))
    print(f"report: {report}")
    return 0 if result.exact else 1


async def soak(args: argparse.Namespace, cluster: Cluster, workdir: Path, prefix: str) -> Soak:
    api_key = await create_api_key(cluster.url)
    async with running(TARGET, workdir, cluster.url, api_key) as server:
        ceiling = await run_wrk(
            Load(
                server.url,
                "keys:100000",
                prefix + "ceiling-",
                1,
                args.ceiling_seconds,
                CONNECTIONS,
                api_key,
            )
        )
        rate = args.rate or ceiling.rps / 2
        result = Soak(
            args.duration, args.period, args.restart_every, ceiling.rps, rate,
            time.strftime("%Y-%m-%d-%H%M", time.gmtime()), IDEMPOTENCY_WINDOW,
            cycle_periods(args.duration, args.period), args.database_nice,
        )  # fmt: skip
        result.expected += ceiling.acked_value
        result.unknown += ceiling.sent - ceiling.requests + ceiling.socket_errors
        start = time.monotonic()
        done = asyncio.Event()
        keys = [api_key]  # the API keys in use, the current one last
        side = [
            asyncio.create_task(_sample(server.url, server.pid, result, start, done)),
            asyncio.create_task(_restart(cluster, result, start, done)),
            asyncio.create_task(_idempotent(server.url, keys, prefix, result, done)),
        ]
        count = max(1, round(args.duration / args.period))
        result.scrape = await metrics.scrape(server.url, api_key)
        try:
            for index in range(count):
                if index == count // 2 and count > 1:
                    keys.append(await admin.rotate(cluster.url, "bench", args.period, None, None))
                    result.rotated_at = time.monotonic() - start
                await _period(server.url, keys[-1], prefix, index, rate, result, start)
        finally:
            done.set()
            await asyncio.gather(*side)
        if result.rotated_at is not None:
            status, _ = await rawhttp.request(server.url, "GET", "/metrics", api_key=keys[0])
            result.old_key_refused = status == 401
        await _settle(server.url, cluster.url, prefix, result)
    return result


async def _period(
    url: str,
    api_key: str,
    prefix: str,
    index: int,
    rate: float,
    result: Soak,
    start: float,
) -> None:
    keys = churn(index, climb_periods(result.duration, result.period))
    began = time.monotonic() - start
    run = await run_wrk(
        Load(
            url,
            f"keys:{keys}",
            f"{prefix}p{index}-",
            index + 2,
            result.period,
            CONNECTIONS,
            api_key,
            rate,
        )
    )
    ended = time.monotonic() - start
    after = await metrics.scrape(url, api_key)
    lag = metrics.quantile(metrics.histogram_delta(result.scrape, after, metrics.LAG), 0.99)
    result.scrape = after
    unknown = run.sent - run.requests + run.socket_errors
    result.expected += run.acked_value
    result.unknown += unknown
    window = [s for s in result.samples if began <= s[0] <= ended]
    last = window[-1] if window else (0.0, 0, 0, 0.0)
    result.periods.append(
        Period(
            index,
            keys,
            run.rps,
            run.latency_ms["p99"],
            run.acked_value,
            unknown,
            lag_p99=lag,
            lag_max=max((s[3] for s in window), default=0.0),
            rss=last[1],
            fds=last[2],
            restarts=sum(began <= r <= ended for r in result.restarts),
        )
    )


async def _sample(url: str, pid: int, result: Soak, start: float, done: asyncio.Event) -> None:
    while not done.is_set():
        lag = 0.0
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            status, body = await rawhttp.request(url, "GET", "/readyz", timeout=2.0)
            if status in (200, 503):
                lag = float(_field(body, b'"lag_seconds":'))
        with contextlib.suppress(OSError):
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            rss = procfs.memory(pid, "VmRSS") or 0
            result.samples.append((time.monotonic() - start, rss, fds, lag))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 1.0)


def _field(body: bytes, name: bytes) -> bytes:
    """The number after name in a flat JSON object."""
    rest = body.split(name, 1)[1]
    return rest.split(b",", 1)[0].split(b"}", 1)[0].strip()


async def _restart(cluster: Cluster, result: Soak, start: float, done: asyncio.Event) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), result.restart_every)
        if done.is_set():
            return
        result.restarts.append(time.monotonic() - start)
        await asyncio.to_thread(cluster.restart)


async def _idempotent(
    url: str, keys: list[str], prefix: str, result: Soak, done: asyncio.Event
) -> None:
    """Batches under an Idempotency-Key, each sent 2 or 3 times with the current API key
    (keys[-1]): counted once if any copy got a 202, as unknown if none did."""
    number = 0
    while not done.is_set():
        number += 1
        value = number % 7 + 1
        items = (f'{{"key":"{prefix}idem-{i}","value":{value}}}' for i in range(IDEMPOTENT_ITEMS))
        body = ("[" + ",".join(items) + "]").encode()
        headers = {"Idempotency-Key": f"{prefix}{number}"}
        acked = False
        for _ in range(2 + number % 2):
            result.idempotent_sends += 1
            with contextlib.suppress(OSError, TimeoutError):
                status, _ = await rawhttp.request(
                    url, "POST", "/increments", body, keys[-1], 5.0, headers
                )
                acked = acked or status == 202
        result.idempotent_batches += 1
        if acked:
            result.idempotent_value += IDEMPOTENT_ITEMS * value
        else:
            result.idempotent_unknown += IDEMPOTENT_ITEMS * value
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), IDEMPOTENT_EVERY)


async def _settle(url: str, database_url: str, prefix: str, result: Soak) -> None:
    """Wait until the service holds nothing unflushed (the lag after the load), then judge the
    totals: exact when the database sum is at least what the clients saw acknowledged and at
    most that plus what had no answer (wrk stops with requests in flight)."""
    began = time.monotonic()
    while time.monotonic() - began < TOTALS_TIMEOUT:
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            status, body = await rawhttp.request(url, "GET", "/readyz", timeout=2.0)
            if status == 200 and int(_field(body, b'"pending_keys":')) == 0:
                break
        await asyncio.sleep(0.1)
    result.settle_seconds = time.monotonic() - began
    result.total = await database.sum_by_prefix(database_url, prefix)
    acked = result.expected + result.idempotent_value
    unknown = result.unknown + result.idempotent_unknown
    result.exact = acked <= result.total <= acked + unknown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load (1800)")
    parser.add_argument(
        "--period", type=float, default=60.0, help="seconds per wrk run and report row (60)"
    )
    parser.add_argument(
        "--restart-every", type=float, default=300.0, help="seconds between database restarts (300)"
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="requests/s (default: half the measured ceiling)"
    )
    parser.add_argument(
        "--ceiling-seconds",
        type=float,
        default=10.0,
        help="seconds of the ceiling measurement (10)",
    )
    parser.add_argument(
        "--database-nice",
        type=int,
        default=0,
        help="the PostgreSQL cluster's CPU niceness (0: the service's own priority)",
    )
    parser.add_argument(
        "--results", default=str(RESULTS), help="where the report goes (bench/results)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
