"""Running wrk with bench/wrk/increments.lua (or paced.lua) and reading the totals it prints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass

from bench.harness.machine import which
from bench.harness.paths import WRK_SCRIPTS

SCRIPT = WRK_SCRIPTS / "increments.lua"
PACED_SCRIPT = SCRIPT.with_name("paced.lua")  # the same requests at a fixed offered rate
SCENARIOS = ("10keys", "100kkeys", "batch", "10mkeys")
BATCH_SIZE = 50
MARKER = "BENCH_RESULT "
GRACE = 30.0  # past duration + GRACE, wrk is killed


def items_per_request(scenario: str) -> int:
    return BATCH_SIZE if scenario == "batch" else 1


class LoadError(Exception):
    """wrk failed or printed no result line."""


@dataclass(frozen=True)
class LoadResult:
    requests: int  # responses wrk completed in the measured window
    seconds: float
    sent: int  # requests built by the script (an upper bound of what reached the server)
    acked: int  # 202 responses
    other_status: int  # responses that were not 202
    sent_value: int
    acked_value: int  # sum of the values of the acknowledged increments
    latency_ms: dict[str, float]  # p50, p90, p99, max, mean
    errors: dict[str, int]  # socket errors by kind, and non-2xx/3xx count ("status")
    raw: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")


@dataclass(frozen=True)
class Load:
    """One wrk run: which requests (scenario, key prefix, seed), for how long, on how many
    connections; with `api_key`, every request carries `Authorization: Bearer` it; with `rate`,
    the paced script offers that many requests per second rather than as fast as it answers."""

    url: str
    scenario: str
    prefix: str
    seed: int
    duration: float
    connections: int
    api_key: str = ""
    rate: float | None = None

    def argv(self) -> list[str]:
        rate = self.rate
        paced = [self.api_key, f"{rate:.0f}"] if rate else ([self.api_key] if self.api_key else [])
        return [
            which("wrk") or "wrk",
            "-t1",
            f"-c{self.connections}",
            f"-d{max(1, round(self.duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(PACED_SCRIPT if rate else SCRIPT),
            self.url + "/",
            "--",
            self.scenario,
            self.prefix,
            str(self.seed),
            str(BATCH_SIZE),
            *paced,
        ]


async def run_wrk(load: Load) -> LoadResult:
    """Run wrk to the end and read the totals its script prints."""
    proc = await asyncio.create_subprocess_exec(
        *load.argv(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    limit = load.duration + GRACE
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        raise LoadError(f"wrk did not finish within {limit:.0f} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise LoadError(f"wrk exited with {proc.returncode}:\n{text}")
    return parse(text)


def parse(text: str) -> LoadResult:
    line = next((ln for ln in text.splitlines() if ln.startswith(MARKER)), None)
    if line is None:
        raise LoadError(f"wrk printed no {MARKER.strip()} line:\n{text}")
    data = json.loads(line[len(MARKER) :])
    return LoadResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        sent=data["sent"],
        acked=data["acked"],
        other_status=data["other_status"],
        sent_value=data["sent_value"],
        acked_value=data["acked_value"],
        latency_ms={k: v / 1000 for k, v in data["latency_us"].items()},
        errors=data["errors"],
        raw=text,
    )
