"""The figures docs/operations.md sizes a deployment by, measured on this machine.

    .venv/bin/python -m bench.sizing [--keys 200000] [--key-bytes 32] [--duration 10] [--out FILE]

- memory per pending key: `incrementer serve` (wal, PostgreSQL) with the flush held off, its
  resident memory (VmRSS) before and after --keys distinct keys arrive through POST /increments,
  divided by the keys; then its peak (VmHWM) while SIGTERM's final flush writes them all, and the
  WAL bytes per increment (what a database outage costs in disk);
- CPU per request and flush keys/s: bench/harness/measure.py's run of the incrementer-wal target
  under wrk for --duration seconds in three of bench.run's scenarios (10 keys, 100,000 random
  keys, batches of 50): server and PostgreSQL CPU seconds per request, and dirty keys written per
  second of flush time.

It prints a Markdown table (and writes it to --out). Needs wrk and PostgreSQL, like bench.run
(BENCH_PG_ADMIN_URL); exit status 2 when one is missing, 1 when a run fails. Run it on a quiet
machine: other processes on the cores change the CPU figures, not the memory ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.harness import database, metrics, preflight, procfs, rawhttp
from bench.harness.measure import RunResult, measure
from bench.harness.paths import WORK
from bench.harness.targets import INCREMENTER_WAL, Target, TargetError, flush_held, running

# The flush held off until SIGTERM: every key stays pending while memory is read.
HELD = Target(
    "incrementer-wal-held",
    "incrementer",
    "wal",
    flags=flush_held(600, max_keys=50_000_000, lag_bound=1200),
)
BATCH = 1000  # increments per POST /increments while filling
POST_TIMEOUT = 60.0


@dataclass
class Memory:
    keys: int
    key_bytes: int
    rss_before: int  # bytes
    rss_pending: int
    peak_in_flush: int
    wal_bytes: float
    drained: bool

    @property
    def per_key(self) -> float:
        return (self.rss_pending - self.rss_before) / self.keys

    @property
    def peak_per_key(self) -> float:
        return (self.peak_in_flush - self.rss_before) / self.keys


async def measure_memory(keys: int, key_bytes: int, workdir: Path) -> Memory:
    async with (
        database.fresh_database("sizing") as url,
        running(HELD, workdir / "memory", url) as server,
    ):
        await asyncio.sleep(1.0)  # start-up allocations settle
        before = procfs.memory(server.pid, "VmRSS") or 0
        prefix = uuid.uuid4().hex[:8] + "-"
        width = max(1, key_bytes - len(prefix))
        for start in range(0, keys, BATCH):
            items = [
                {"key": f"{prefix}{i:0{width}d}", "value": 1}
                for i in range(start, min(keys, start + BATCH))
            ]
            body = json.dumps(items).encode()
            status, _ = await rawhttp.request(
                server.url, "POST", "/increments", body, timeout=POST_TIMEOUT
            )
            if status != 202:
                raise TargetError(f"POST /increments answered {status}:\n{server.log_tail()}")
        scraped = await metrics.scrape(server.url)
        if scraped.get("incrementer_pending_keys") != keys:
            raise TargetError(f"{scraped.get('incrementer_pending_keys')} keys pending, not {keys}")
        await asyncio.sleep(0.5)
        pending = procfs.memory(server.pid, "VmRSS") or 0
        wal_bytes = scraped.value("incrementer_wal_bytes")
        # SIGTERM: the final flush writes every key in one batch; the peak is read until exit.
        server.proc.terminate()
        peak = pending
        while server.proc.returncode is None:
            peak = max(peak, procfs.memory(server.pid, "VmHWM") or 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.proc.wait(), 0.01)
        drained = server.proc.returncode == 0
    return Memory(keys, key_bytes, before, pending, peak, wal_bytes / keys, drained)


async def measure_cpu(duration: float, workdir: Path) -> list[RunResult]:
    results = []
    for scenario in ("10keys", "100kkeys", "batch"):
        result = await measure(
            INCREMENTER_WAL, scenario, "sizing", workdir / scenario, duration, 32, lambda *_: None
        )
        if not result.ok:
            raise TargetError(f"{scenario}: {result.error or result.notes}")
        results.append(result)
    return results


def per_request(result: RunResult, which_cpu: str) -> float:
    return result.us_per_request(getattr(result, which_cpu)) or 0.0


def table(memory: Memory, runs: list[RunResult]) -> str:
    mib = 1024 * 1024
    lines = [
        "| figure | measured | how |",
        "|---|---:|---|",
        f"| memory per pending key ({memory.key_bytes}-byte keys) | {memory.per_key:.0f} bytes | "
        f"VmRSS {memory.rss_before / mib:.0f} -> {memory.rss_pending / mib:.0f} MiB with "
        f"{memory.keys:,} keys pending |",
        f"| peak per key while flushing them in one batch | {memory.peak_per_key:.0f} bytes | "
        f"VmHWM {memory.peak_in_flush / mib:.0f} MiB during SIGTERM's final flush"
        f"{'' if memory.drained else ' (it did not exit 0)'} |",
        f"| WAL per increment ({memory.key_bytes}-byte keys) | {memory.wal_bytes:.1f} bytes | "
        "incrementer_wal_bytes / increments |",
    ]
    for run in runs:
        rps = run.rps
        lines.append(
            f"| CPU per request, {run.scenario} | {per_request(run, 'cpu_server'):.1f} µs "
            f"server + {per_request(run, 'cpu_database'):.1f} µs PostgreSQL | "
            f"{rps:,.0f} req/s, wrk -c32, {run.load.seconds if run.load else 0:.0f} s |"
        )
        if run.scenario != "10keys" and run.flush_keys_per_second:  # 10 keys: tiny flushes
            lines.append(
                f"| flush keys/s, {run.scenario} | {run.flush_keys_per_second:,.0f} | "
                f"keys written per second of flush time, {run.flushes} flushes |"
            )
    return "\n".join(lines) + "\n"


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sizing", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--keys", type=int, default=200_000, help="Distinct pending keys.")
    parser.add_argument("--key-bytes", type=int, default=32, help="Length of each key.")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds of wrk per run.")
    parser.add_argument("--out", type=Path, help="Also write the table here.")
    args = parser.parse_args(argv)
    if await preflight.check_async("bench.sizing", tools=("wrk",)) is None:
        return 2
    started = time.monotonic()
    # A fresh data dir for every run: an old one's WAL would be replayed into the new database.
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="sizing-", dir=WORK) as workdir:
            memory = await measure_memory(args.keys, args.key_bytes, Path(workdir))
            runs = await measure_cpu(args.duration, Path(workdir))
    except (TargetError, OSError, TimeoutError, *database.ERRORS) as exc:
        print(f"bench.sizing: {exc}", file=sys.stderr)
        return 1
    text = table(memory, runs)
    print(text, end="")
    print(f"(measured in {time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
