"""Running wrk with the increments script and reading the totals it prints from done()."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from machine import which

SCRIPT = Path(__file__).resolve().parent / "wrk" / "increments.lua"
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


def command(
    url: str,
    scenario: str,
    prefix: str,
    seed: int,
    duration: float,
    connections: int,
    api_key: str = "",
    rate: float | None = None,
) -> list[str]:
    """wrk's argv; with `rate`, the paced script offers that many requests per second."""
    paced = [api_key, f"{rate:.0f}"] if rate else ([api_key] if api_key else [])
    return [
        which("wrk") or "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(PACED_SCRIPT if rate else SCRIPT),
        url + "/",
        "--",
        scenario,
        prefix,
        str(seed),
        str(BATCH_SIZE),
        *paced,
    ]


async def run_wrk(
    url: str,
    scenario: str,
    prefix: str,
    seed: int,
    duration: float,
    connections: int,
    api_key: str = "",
    rate: float | None = None,
) -> LoadResult:
    """Load `url` with wrk; with `api_key`, every request carries `Authorization: Bearer` it;
    with `rate`, at that many requests per second rather than as fast as it answers."""
    argv = command(url, scenario, prefix, seed, duration, connections, api_key, rate)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + GRACE)
    except TimeoutError:
        raise LoadError(f"wrk did not finish within {duration + GRACE:.0f} s") from None
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
