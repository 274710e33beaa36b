"""One measured run: a target under one scenario, from a fresh start to a verified total.

start (fresh database, fresh data dir) -> scrape /metrics -> wrk + 1 s sampler -> wait until the
database holds everything the service accepted (the lag after load) -> scrape again -> SIGTERM ->
check that the database total lies between what wrk saw acknowledged and what it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import database, metrics, procfs
from bench.harness.load import Load, LoadError, LoadResult, run_wrk
from bench.harness.procfs import CpuTimes, MachineTimes
from bench.harness.targets import Running, Target, TargetError, create_api_key, running

SEED = 42  # every target gets the same key sequence
DRAIN_TIMEOUT = 15.0

Progress = Callable[[str, float], None]
"""progress(phase description, fraction of the load done)"""


@dataclass
class RunResult:
    target: Target
    scenario: str
    prefix: str
    round_number: int = 1
    load_average: float = 0.0  # 1-minute load average at the start: how busy the machine was
    load: LoadResult | None = None
    lag_p50: float | None = None  # seconds, from the persistence-lag histogram
    lag_p99: float | None = None
    flushes: int = 0
    flush_keys_per_second: float | None = None  # dirty keys upserted per second of flush time
    lag_after_load: float | None = None  # seconds from the end of the load to a complete database
    drained: bool | None = None  # the database caught up within DRAIN_TIMEOUT
    accepted: int | None = None  # increments the service counted as accepted during the run
    db_total: int | None = None  # sum of the run's keys after the service stopped
    verified: bool | None = None  # None: nothing to verify (nginx)
    timeline: metrics.Timeline = field(default_factory=metrics.Timeline)
    # CPU seconds during the load (and, for the server and PostgreSQL, the drain after it)
    cpu_server: CpuTimes | None = None
    cpu_database: CpuTimes | None = None
    cpu_wrk: CpuTimes | None = None
    cpu_machine: MachineTimes | None = None  # whole machine, during the load only
    increments_per_wal_frame: float | None = None  # one frame per event-loop tick that accepted
    rate: float | None = None  # offered requests/s of a paced run; None: closed loop
    peak_rss: int | None = None  # bytes, the server's processes, read before it stopped
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.verified is not False

    @property
    def rps(self) -> float:
        return self.load.rps if self.load else 0.0

    def us_per_request(self, times: CpuTimes | None) -> float | None:
        """CPU microseconds (user + system) per request wrk completed; None without either."""
        if times is None or self.load is None or not self.load.requests:
            return None
        return times.total * 1e6 / self.load.requests


async def measure(
    target: Target,
    scenario: str,
    run_id: str,
    workdir: Path,
    duration: float,
    connections: int,
    progress: Progress,
    round_number: int = 1,
    rate: float | None = None,
) -> RunResult:
    """One run; with `rate`, wrk offers that many requests per second (bench/wrk/paced.lua)."""
    paced = f"-{rate:.0f}rps" if rate else ""
    prefix = f"{run_id}-r{round_number}-{target.name}-{scenario}{paced}-"
    result = RunResult(target, scenario, prefix, round_number, os.getloadavg()[0], rate=rate)
    try:
        if target.needs_database:
            progress("creating database", 0.0)
            async with database.fresh_database(target.name) as url:
                await _run(result, workdir, duration, connections, progress, url)
        else:
            await _run(result, workdir, duration, connections, progress, "")
    except (TargetError, LoadError, OSError, TimeoutError, *database.ERRORS) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.verified = False if target.needs_database else None
    return result


async def _run(
    result: RunResult,
    workdir: Path,
    duration: float,
    connections: int,
    progress: Progress,
    url: str,
) -> None:
    target = result.target
    api_key = ""
    if target.auth:
        progress("creating an API key", 0.0)
        api_key = await create_api_key(url)
    progress(f"starting {target.name}", 0.0)
    async with running(target, workdir, url, api_key) as server:
        before = (
            await metrics.scrape(server.url, api_key)
            if target.accepted_metric
            else metrics.Samples()
        )
        server_cpu = procfs.process_group(server.pid)
        db_cpu = procfs.processes(await database.backend_pids(url)) if url else {}
        wrk_cpu = procfs.children()
        machine_cpu = procfs.machine()
        stop_sampling = asyncio.Event()
        sampler = None
        if target.accepted_metric:
            sampler = asyncio.create_task(
                metrics.sample(server.url, target.accepted_metric, stop_sampling, api_key=api_key)
            )
        ticker = asyncio.create_task(_tick(progress, f"load on {target.name}", duration))
        try:
            spec = Load(
                server.url, result.scenario, result.prefix, SEED, duration, connections,
                api_key, result.rate,
            )  # fmt: skip
            result.load = await run_wrk(spec)
        finally:
            ticker.cancel()
            stop_sampling.set()
            if sampler is not None:
                result.timeline = await sampler
        result.cpu_machine = procfs.machine() - machine_cpu
        result.cpu_wrk = procfs.children() - wrk_cpu
        if result.load.acked == 0:
            raise LoadError(
                f"no request was acknowledged; wrk said:\n{result.load.raw}\n"
                f"server log:\n{server.log_tail()}"
            )
        _note_load_problems(result, result.load)
        if target.needs_database:
            progress(f"waiting for {target.name} to persist", 1.0)
            await _drain(result, server, url)
        result.cpu_server = procfs.process_group(server.pid) - server_cpu
        result.peak_rss = procfs.peak_rss(server.pid)
        if url:
            backends = procfs.processes(await database.backend_pids(url))
            result.cpu_database = procfs.since(db_cpu, backends)
        if not target.needs_database:
            return
        after = await metrics.scrape(server.url, api_key)
        _read_histograms(result, before, after)
        progress(f"stopping {target.name}", 1.0)
    if server.exit_code not in (0, None):
        result.error = f"{target.name} exited with {server.exit_code} on SIGTERM"
    if target.kind == "incrementer" and target.durability != "memory":
        result.increments_per_wal_frame = await _wal_batching(workdir / "data")
    result.db_total = await database.sum_by_prefix(url, result.prefix)
    load = result.load
    # Never less than acknowledged, never more than sent; and exactly what the service counted
    # as accepted (wrk may stop before reading the answers to its last requests).
    within = load.acked_value <= result.db_total <= load.sent_value
    exact = result.accepted is None or result.db_total == result.accepted
    result.verified = within and exact
    if result.db_total < load.acked_value:
        result.notes.append(f"LOST {load.acked_value - result.db_total} acknowledged increments")
    elif result.db_total > load.sent_value:
        result.notes.append(f"database holds {result.db_total - load.sent_value} more than sent")
    if not exact:
        result.notes.append(
            f"database total {result.db_total} != {result.accepted} accepted by the service"
        )


async def _wal_batching(data_dir: Path) -> float | None:
    """Increments per WAL frame: how many requests each write() (and fsync) covered; with
    --workers, over every worker's WAL."""
    records = frames = 0
    for node in sorted(data_dir.glob("worker-*")) or [data_dir]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "incrementer", "wal", "inspect", "--json", "--data-dir",
            str(node), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        try:
            summary = json.loads(out)
            records, frames = records + summary["records"], frames + summary["frames"]
        except (ValueError, KeyError, TypeError):
            return None
    return records / frames if frames else None


async def _tick(progress: Progress, text: str, duration: float) -> None:
    started = time.monotonic()
    while True:
        progress(text, min(1.0, (time.monotonic() - started) / duration))
        await asyncio.sleep(0.25)


async def _drain(result: RunResult, server: Running, url: str) -> None:
    """Wait until the database sum equals what the service says it accepted during the run."""
    metric = server.target.accepted_metric
    assert metric is not None

    async def accepted() -> int | None:
        with contextlib.suppress(OSError, TimeoutError):
            scraped = await metrics.scrape(server.url, server.api_key)
            result.accepted = int(scraped.value(metric))
        return result.accepted

    total, waited, matched = await database.wait_for_total(
        url, result.prefix, accepted, DRAIN_TIMEOUT
    )
    result.lag_after_load = waited
    result.drained = matched
    if not matched:
        result.notes.append(
            f"database at {total} of {result.accepted} accepted after {DRAIN_TIMEOUT:.0f} s"
        )


def _read_histograms(result: RunResult, before: metrics.Samples, after: metrics.Samples) -> None:
    lag = metrics.histogram_delta(before, after, metrics.LAG)
    result.lag_p50 = metrics.quantile(lag, 0.50)
    result.lag_p99 = metrics.quantile(lag, 0.99)
    result.flushes = int(metrics.delta(before, after, metrics.FLUSH_KEYS + "_count"))
    flush_seconds = metrics.delta(before, after, metrics.FLUSH_SECONDS + "_sum")
    flush_keys = metrics.delta(before, after, metrics.FLUSH_KEYS + "_sum")
    if flush_seconds > 0:
        result.flush_keys_per_second = flush_keys / flush_seconds


def _note_load_problems(result: RunResult, load: LoadResult) -> None:
    if load.other_status:
        result.notes.append(f"{load.other_status} responses were not 202")
    if load.socket_errors:
        kinds = ", ".join(f"{k} {v}" for k, v in load.errors.items() if v and k != "status")
        result.notes.append(f"socket errors: {kinds}")
