"""Shared rate limits, measured: how exactly a group and a fleet hold one limit, what limits cost,
and how soon a revoked key stops everywhere.

    .venv/bin/python -m bench.limits [--seconds 5] [--cost-seconds 10] [--rounds 2]
                                     [--skip-cost] [--skip-revocation]

Accuracy: an API key rated 50 requests/s with a burst of 50, loaded by 12 connections sending
as fast as they are answered for --seconds (5): a token bucket lets 50 + 5 x 50 = 300 through.
Each scenario is run and its 202s counted: one process (the reference); `--workers 3` (the
supervisor's buckets); three instances sharing one Redis; the same three with the load on the
first instance for the first half and on the second for the rest.

Cost: wrk (bench.run's 10keys scenario, 32 connections) against one incrementer with a limit per
client address that never refuses (`--rate-limit 1e9`: every request takes a token and its 202
carries the RateLimit fields) and against the same without a limit, alternating, --rounds times
each; then the same pair for `--workers 2` (limits reconciled with the supervisor) and for one
process reconciling with Redis. Ratios of req/s within one run are what to read: absolute figures
drift on a shared machine.

Revocation: three instances on one PostgreSQL database with --auth-refresh 60, each asked every
10 ms with a key; the key is revoked (as `incrementer keys revoke` does), and the time until each
instance answers 401 is reported.

Exchange cost: the CPU one reconciliation costs per limit, with 1,000 limits per exchange, in the
reconciling process and (from its commandstats) in Redis; and through a group's supervisor.

Writes bench/results/limits-<date>.md. Needs PostgreSQL (as bench.run), wrk and redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench.harness import database, machine, procfs
from bench.harness.load import Load, run_wrk
from bench.harness.paths import RESULTS
from bench.harness.redisserver import RedisServer, free_port, redis_server
from bench.harness.targets import INCREMENTER_WAL, Target, running
from incrementer.auth import admin
from incrementer.auth.budgets import BudgetStore, Usage
from incrementer.auth.redis_budgets import RedisBudgets
from incrementer.process.budget_channel import BudgetServer, SupervisorBudgets

RATE, BURST = 50, 50
LISTENING = re.compile(r"listening on (http://\S+?)(?: with \d+ workers|\s|$)")
START_TIMEOUT = 60.0


@dataclass
class Counts:
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)


def expected(seconds: float) -> float:
    return BURST + RATE * seconds


# --- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    proc: asyncio.subprocess.Process
    url: str


@contextlib.asynccontextmanager
async def serving(
    database_url: str, workdir: Path, *flags: str, workers: int = 1, auth: str = "required"
) -> AsyncIterator[Server]:
    """`incrementer serve` (with `workers`), once it (every worker) listens; SIGTERM after."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "incrementer", "serve", "--port", str(free_port()),
        "--database-url", database_url, "--data-dir", str(workdir / "data"),
        "--auth", auth, "--log-level", "info", "--workers", str(workers), *flags,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    drain: asyncio.Task[None] | None = None
    try:
        url = await asyncio.wait_for(_listening(proc.stderr, workers), START_TIMEOUT)
        drain = asyncio.create_task(_discard(proc.stderr))
        yield Server(proc, url)
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if drain is not None:
            drain.cancel()


async def _listening(stream: asyncio.StreamReader, workers: int) -> str:
    lines = []
    while line := (await stream.readline()).decode(errors="replace"):
        lines.append(line)
        found = LISTENING.search(line)
        if found and (workers == 1 or " workers " in line):
            return found.group(1)
    raise RuntimeError("the server exited before it listened:\n" + "".join(lines[-20:]))


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def new_key(database_url: str, name: str, rate: float | None, burst: int | None) -> str:
    return await admin.create(database_url, name, rate, burst)


# --- load ------------------------------------------------------------------------------------


async def hammer(
    url_at: Callable[[int, float], str],
    seconds: float,
    api_key: str,
    connections: int = 12,
    window: int = 8,
) -> Counts:
    """`connections` keep-alive connections sending POST /increment with the key, `window`
    pipelined at a time, as fast as they are answered, for `seconds`; url_at(connection, fraction
    of the time gone) says where each window goes (a connection moves when it changes)."""
    counts = Counts()
    body = b'{"key":"limited","value":1}'
    request = (
        b"POST /increment HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (api_key.encode(), len(body), body)
    )
    started = time.monotonic()
    stop = started + seconds

    async def one(connection: int) -> None:
        writer: asyncio.StreamWriter | None = None
        current = ""
        buffer = b""
        try:
            while (now := time.monotonic()) < stop:
                url = url_at(connection, (now - started) / seconds)
                if url != current or writer is None:
                    if writer is not None:
                        writer.close()
                    host, port = url.removeprefix("http://").rsplit(":", 1)
                    reader, writer = await asyncio.open_connection(host, int(port))
                    current, buffer = url, b""
                writer.write(request * window)
                answered = 0
                while answered < window:
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionResetError
                    buffer += chunk
                    while (end := buffer.find(b"\r\n\r\n")) >= 0:
                        head = buffer[:end]
                        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                        if len(buffer) < end + 4 + length:
                            break
                        status = int(head.split(b" ", 2)[1])
                        counts.statuses[status] = counts.statuses.get(status, 0) + 1
                        buffer = buffer[end + 4 + length :]
                        answered += 1
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(connections)))
    return counts


# --- accuracy --------------------------------------------------------------------------------


async def accuracy_alone(database_url: str, workdir: Path, seconds: float) -> Counts:
    key = await new_key(database_url, "alone", RATE, BURST)
    async with serving(database_url, workdir / "alone") as server:
        return await hammer(lambda _conn, _gone: server.url, seconds, key)


async def accuracy_group(database_url: str, workdir: Path, seconds: float) -> Counts:
    key = await new_key(database_url, "group", RATE, BURST)
    async with serving(database_url, workdir / "group", workers=3) as server:
        return await hammer(lambda _conn, _gone: server.url, seconds, key)


@contextlib.asynccontextmanager
async def fleet(
    database_url: str, workdir: Path, store: RedisServer, size: int = 3
) -> AsyncIterator[list[Server]]:
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                serving(database_url, workdir / f"node{i}", "--rate-limit-store", store.url)
            )
            for i in range(size)
        ]
        yield servers


async def accuracy_fleet(
    database_url: str, workdir: Path, seconds: float, moving: bool = False
) -> Counts:
    """Three instances sharing Redis; the load spread over all (round robin by connection), or
    on the first for the first half and on the second for the rest."""
    name = "moving" if moving else "fleet"
    key = await new_key(database_url, name, RATE, BURST)
    with redis_server(workdir / f"{name}-redis") as store:
        async with fleet(database_url, workdir / name, store) as servers:
            urls = [s.url for s in servers]
            if moving:
                return await hammer(
                    lambda _conn, gone: urls[0] if gone < 0.5 else urls[1], seconds, key
                )
            return await hammer(lambda conn, _gone: urls[conn % len(urls)], seconds, key)


# --- cost ------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One variant's runs: req/s and the server's CPU microseconds per request (all its
    processes), with the limit on and off."""

    label: str
    on: list[float] = field(default_factory=list)
    off: list[float] = field(default_factory=list)
    cpu_on: list[float] = field(default_factory=list)
    cpu_off: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.on) / statistics.median(self.off)

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(self.cpu_on) / statistics.median(self.cpu_off)


async def cost(database_url: str, workdir: Path, seconds: float, rounds: int) -> list[Pair]:
    limited = ("--rate-limit", "1e9")
    with redis_server(workdir / "cost-redis") as store:
        variants = [
            ("one process", INCREMENTER_WAL, limited),
            (
                "--workers 2 (reconciled with the supervisor)",
                Target("incrementer-wal-2w", "incrementer", "wal", workers=2),
                limited,
            ),
            (
                "one process, limits in Redis",
                INCREMENTER_WAL,
                (*limited, "--rate-limit-store", store.url),
            ),
        ]
        pairs: list[Pair] = []
        for label, target, flags in variants:
            pair = Pair(label)
            for round_ in range(rounds):
                for on in (True, False):  # alternating, so drift hits both alike
                    run = Target(
                        target.name,
                        target.kind,
                        target.durability,
                        flags=flags if on else (),
                        workers=target.workers,
                    )
                    async with running(
                        run, workdir / f"cost-{len(pairs)}-{round_}-{on}", database_url
                    ) as server:
                        load = Load(server.url, "10keys", f"c{round_}{on}-", round_, seconds, 32)
                        before = procfs.process_group(server.pid)
                        result = await run_wrk(load)
                        spent = (procfs.process_group(server.pid) - before).total
                    (pair.on if on else pair.off).append(result.rps)
                    cpu = spent / max(1, result.requests) * 1e6
                    (pair.cpu_on if on else pair.cpu_off).append(cpu)
            pairs.append(pair)
    return pairs


# --- one exchange's cost ----------------------------------------------------------------------


@dataclass
class ExchangeCost:
    store: str
    process_us: float  # CPU of the reconciling process (and, for the supervisor, its server)
    redis_us: float | None = None  # Redis's own CPU


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _per_key(store: BudgetStore, keys: int, exchanges: int) -> float:
    usage = [Usage(f"key:k{i}", 3, float(RATE), float(BURST)) for i in range(keys)]
    await store.exchange("bench", usage)
    before = _cpu()
    for _ in range(exchanges):
        await store.exchange("bench", usage)
    return (_cpu() - before) / exchanges / keys * 1e6


async def exchange_cost(workdir: Path, keys: int = 1000, exchanges: int = 50) -> list[ExchangeCost]:
    """CPU microseconds per limit and exchange, `keys` limits per exchange, for both stores."""
    found = []
    with redis_server(workdir / "exchange-redis") as server:
        redis = RedisBudgets(server.url, 5.0)
        try:
            process = await _per_key(redis, keys, exchanges)
        finally:
            await redis.close()
        stats = subprocess.run(
            [machine.which("redis-cli") or "redis-cli", "-p", str(server.port), "info",
             "commandstats"], capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        found_usec = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", stats)
        redis_us = None
        if found_usec:
            calls, usec = int(found_usec.group(1)), int(found_usec.group(2))
            redis_us = usec / calls / keys
        found.append(ExchangeCost("Redis", process, redis_us))
    supervisor = BudgetServer()
    supervisor.start()
    end = supervisor.connect()
    channel = SupervisorBudgets(os.dup(end.fileno()), 1)
    end.close()
    try:
        found.append(ExchangeCost("a group's supervisor", await _per_key(channel, keys, exchanges)))
    finally:
        await channel.close()
    return found


# --- revocation ------------------------------------------------------------------------------


async def revocation(database_url: str, workdir: Path) -> list[float]:
    """Seconds from the revocation's commit until each of three instances answers 401."""
    key = await new_key(database_url, "revoked", None, None)
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                serving(database_url, workdir / f"rev{i}", "--auth-refresh", "60")
            )
            for i in range(3)
        ]
        refused: list[float | None] = [None] * len(servers)
        revoked_at = asyncio.get_running_loop().create_future()

        async def poll(index: int, url: str) -> None:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            body = b'{"key":"probe","value":1}'
            request = (
                b"POST /increment HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                % (key.encode(), len(body), body)
            )
            try:
                while True:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                    await reader.readexactly(length)
                    if b" 401 " in head.split(b"\r\n", 1)[0] and revoked_at.done():
                        refused[index] = time.monotonic() - revoked_at.result()
                        return
                    await asyncio.sleep(0.01)
            finally:
                writer.close()

        pollers = [asyncio.create_task(poll(i, s.url)) for i, s in enumerate(servers)]
        await asyncio.sleep(1.0)
        await admin.revoke(database_url, "revoked")
        revoked_at.set_result(time.monotonic())
        await asyncio.wait_for(asyncio.gather(*pollers), 90)
    return [r if r is not None else float("nan") for r in refused]


# --- the report ------------------------------------------------------------------------------


def report(
    seconds: float,
    accuracy: dict[str, Counts],
    pairs: Sequence[Pair],
    cost_seconds: float,
    rounds: int,
    revoked: list[float],
    exchanges: Sequence[ExchangeCost],
) -> str:
    facts = machine.describe("")
    lines = [
        f"# Shared rate limits, {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`python -m bench.limits --seconds {seconds:g} --cost-seconds {cost_seconds:g} "
        f"--rounds {rounds}` on {facts.get('cpu', 'this machine')}, shared with other work: "
        "compare ratios within this report, not absolute figures across reports.",
        "",
        f"## Accuracy: a key rated {RATE}/s, burst {BURST}, loaded for {seconds:g} s "
        f"(a token bucket allows {expected(seconds):.0f})",
        "",
        "| scenario | accepted | of the bucket's allowance | refused (429) |",
        "|---|---:|---:|---:|",
    ]
    for label, counts in accuracy.items():
        share = counts.accepted / expected(seconds)
        lines.append(
            f"| {label} | {counts.accepted} | {share:.1%} | {counts.statuses.get(429, 0)} |"
        )
    if pairs:
        lines += [
            "",
            f"## Cost: wrk 10keys, 32 connections, {cost_seconds:g} s, {rounds} rounds each, "
            "limit on (never refusing) against off, alternating",
            "",
            "| variant | req/s on | req/s off | on / off | server CPU µs/request on | off | "
            "on / off |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for pair in pairs:
            lines.append(
                f"| {pair.label} | {statistics.median(pair.on):,.0f} | "
                f"{statistics.median(pair.off):,.0f} | {pair.ratio:.3f} | "
                f"{statistics.median(pair.cpu_on):.2f} | {statistics.median(pair.cpu_off):.2f} | "
                f"{pair.cpu_ratio:.3f} |"
            )
        lines += [
            "",
            "Medians of the rounds. Server CPU per request (every process of the server, from "
            "/proc) is what a request costs whatever else the machine does; req/s also moves "
            "with the machine's other load.",
        ]
    if exchanges:
        lines += [
            "",
            "## One exchange's cost, per limit (1,000 limits per exchange, CPU microseconds)",
            "",
            "| store | the reconciling process | Redis |",
            "|---|---:|---:|",
        ]
        for cost_ in exchanges:
            redis_us = "" if cost_.redis_us is None else f"{cost_.redis_us:.1f}"
            lines.append(f"| {cost_.store} | {cost_.process_us:.1f} | {redis_us} |")
    if revoked:
        shown = ", ".join(f"{r * 1000:.0f} ms" for r in revoked)
        lines += [
            "",
            "## Revocation: three instances on PostgreSQL, --auth-refresh 60",
            "",
            f"From the revocation's commit to each instance's first 401: {shown}.",
        ]
    return "\n".join(lines) + "\n"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cost-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-revocation", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    accuracy: dict[str, Counts] = {}
    async with database.fresh_database("limits") as url:
        if not args.skip_accuracy:
            accuracy["one process (reference)"] = await accuracy_alone(url, work, args.seconds)
            accuracy["--workers 3"] = await accuracy_group(url, work, args.seconds)
            accuracy["3 instances, one Redis"] = await accuracy_fleet(url, work, args.seconds)
            accuracy["3 instances, one Redis, load moving half way"] = await accuracy_fleet(
                url, work, args.seconds, moving=True
            )
        for label, counts in accuracy.items():
            print(f"{label}: {counts.accepted} accepted ({counts.statuses})", flush=True)
        pairs = [] if args.skip_cost else await cost(url, work, args.cost_seconds, args.rounds)
        for pair in pairs:
            print(
                f"cost, {pair.label}: req/s on/off {pair.ratio:.3f}, "
                f"CPU per request on/off {pair.cpu_ratio:.3f}",
                flush=True,
            )
        revoked = [] if args.skip_revocation else await revocation(url, work)
        if revoked:
            print(f"revocation: {revoked}", flush=True)
    exchanges = await exchange_cost(work)
    for item in exchanges:
        print(f"exchange cost, {item.store}: {item.process_us:.1f} us/limit", flush=True)
    text = report(args.seconds, accuracy, pairs, args.cost_seconds, args.rounds, revoked, exchanges)
    out = RESULTS / f"limits-{datetime.now():%Y-%m-%d-%H%M}.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
