"""The service's request path without sockets: CPU microseconds per request, steady and repeatable.

    .venv/bin/python -m bench.hotpath [--durability wal] [--keys 10] [--per-tick 20]
                                      [--requests 300000] [--profile] [--lean] [--auth]
                                      [--batch N [--idempotent]] [--buckets minute,hour,day]

wrk numbers on a shared 2-core machine move by 20% from run to run; this does not, so it is the
tool for checking whether a change to the hot path helps. It starts the real Service (SQLite in a
temporary directory, a long flush interval so no flush runs), opens 32 HttpConnection objects on
fake transports, and feeds them raw POST /increment requests, --per-tick of them per event-loop
tick (under wrk -c32 a tick handles about 20: see "increments per WAL write" in the benchmark
report). What it measures is the service's own code, without the sockets and the loop's I/O:
httptools callbacks, routing, validation, the WAL append (and in wal mode its write() per tick),
the buffer, the ack gate and the response. --profile prints cProfile's top functions as well
(it sees only Python code: profile a pure-Python build, INCREMENTER_PURE_PYTHON=1, or use
`perf record` on the compiled one); --lean drives bench/servers/lean.py's protocol the same way,
for the floor of what plain Python can do; --auth runs the service with --auth required and a key
whose rate limit never refuses, every request carrying it (as bench.run's incrementer-wal-auth
does). --batch N sends POST /increments of N random keys instead (bench.run's batch scenario has
N = 50), and --idempotent gives each one an Idempotency-Key of its own: the cost of the header,
its database lookup (SQLite, on the reader thread, whose CPU counts too) included. Costs are then
per increment, not per request. No flush runs, so idempotent batches stay held in memory: keep
N x --requests to a few million. --buckets runs the service counting per time bucket (each
increment also summed under its minute at arrival).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.servers.lean import LeanProtocol
from incrementer import build
from incrementer.auth import admin as keys
from incrementer.config import Settings
from incrementer.http.protocol import HttpConnection
from incrementer.service import Service

CONNECTIONS = 32
REPEATS = 7  # report the best and the median: the noise of a shared machine only adds


class FakeTransport:
    """Just enough of asyncio.Transport for HttpConnection: counts what it is asked to write."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def batch_body(keys: list[str]) -> bytes:
    return b"[" + b",".join(b'{"key":"%s","value":1}' % k.encode() for k in keys) + b"]"


def batch_request(body: bytes, api_key: str, idempotency_key: int = 0) -> bytes:
    """POST /increments of body; with an Idempotency-Key when idempotency_key > 0."""
    authorization = b"Authorization: Bearer %s\r\n" % api_key.encode() if api_key else b""
    idempotency = b"Idempotency-Key: b-%d\r\n" % idempotency_key if idempotency_key else b""
    return (
        b"POST /increments HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        b"%s%sContent-Length: %d\r\n\r\n%s" % (authorization, idempotency, len(body), body)
    )


def request(key: str, api_key: str) -> bytes:
    """The bytes wrk sends for one increment (same headers as bench/wrk/increments.lua)."""
    body = b'{"key":"%s","value":1}' % key.encode()
    authorization = b"Authorization: Bearer %s\r\n" % api_key.encode() if api_key else b""
    return (
        b"POST /increment HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        b"%sContent-Length: %d\r\n\r\n%s" % (authorization, len(body), body)
    )


async def feed(
    conns: list[Any], transports: list[FakeTransport], args: argparse.Namespace, api_key: str = ""
) -> list[float]:
    """Feed the connections in ticks; CPU seconds per request of each of REPEATS rounds."""
    rng = random.Random(42)
    if args.batch:
        batches = [
            batch_body([f"hot-{rng.randrange(args.keys)}" for _ in range(args.batch)])
            for _ in range(256)
        ]
        pool = [batch_request(body, api_key) for body in batches * 16]
    else:
        pool = [request(f"hot-{rng.randrange(args.keys)}", api_key) for _ in range(4096)]
    ticks = args.requests // CONNECTIONS // REPEATS
    per_tick = args.per_tick
    profiler = cProfile.Profile() if args.profile else None
    samples = []
    i = 0
    for _ in range(REPEATS):
        started = time.process_time()
        if profiler:
            profiler.enable()
        for _ in range(ticks):
            for start in range(0, CONNECTIONS, per_tick):
                for conn in conns[start : start + per_tick]:
                    if args.idempotent:
                        data = batch_request(batches[i & 255], api_key, i + 1)
                    else:
                        data = pool[i & 4095]
                    conn.data_received(data)
                    i += 1
                await asyncio.sleep(0)  # the gate's end-of-tick commit runs here
        while sum(t.written for t in transports) < i:  # answers after a database lookup
            await asyncio.sleep(0.005)  # asleep, not spinning: the wait costs no CPU
        if profiler:
            profiler.disable()
        samples.append((time.process_time() - started) / (ticks * CONNECTIONS * max(1, args.batch)))
    answered = sum(t.written for t in transports)
    if answered != i:
        raise SystemExit(f"expected {i} responses, got {answered}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return samples


def connect(protocols: list[Any]) -> list[FakeTransport]:
    transports = [FakeTransport() for _ in protocols]
    for protocol, transport in zip(protocols, transports, strict=True):
        protocol.connection_made(transport)
    return transports


async def drive_service(args: argparse.Namespace, tmp: Path) -> list[float]:
    database_url = f"sqlite:///{tmp / 'counters.db'}"
    api_key = ""
    if args.auth:
        api_key = await keys.create(database_url, "hotpath", rate=1e9, burst=1_000_000_000)
    settings = replace(
        Settings(),
        port=0,
        auth="required" if args.auth else "auto",
        database_url=database_url,
        data_dir=tmp / "data",
        durability=args.durability,
        flush_interval=3600.0,
        lag_bound=7200.0,
        flush_max_keys=1_000_000,
        # At least twice flush_max_keys (a settings rule); and with no flush during the run,
        # room for every idempotent batch (held until its flush) that --batch sends.
        max_pending_keys=max(2_000_000, 2 * args.requests * args.batch),
        log_level="warning",
        buckets=args.buckets,
    )
    service = Service(settings)
    await service.start()
    server = service.server
    assert server is not None
    try:
        conns = [HttpConnection(server) for _ in range(CONNECTIONS)]
        return await feed(conns, connect(conns), args, api_key)
    finally:
        server.connections.clear()  # fake connections: nothing to drain
        await service.stop()


async def drive_lean(args: argparse.Namespace) -> list[float]:
    """The same requests through bench/servers/lean.py's protocol: the floor to compare with."""
    conns = [LeanProtocol() for _ in range(CONNECTIONS)]
    return await feed(conns, connect(conns), args)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hotpath", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--durability", default="wal", choices=("memory", "wal", "wal-fsync"))
    parser.add_argument("--keys", type=int, default=10, help="distinct keys (10 or 100000)")
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument(
        "--per-tick", type=int, default=20, help="requests handled per event-loop tick (1-32)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile instead of timing")
    parser.add_argument(
        "--lean", action="store_true", help="drive bench.servers.lean's protocol instead: the floor"
    )
    parser.add_argument("--auth", action="store_true", help="--auth required, every request keyed")
    parser.add_argument(
        "--batch", type=int, default=0, help="POST /increments of this many keys per request"
    )
    parser.add_argument(
        "--idempotent", action="store_true", help="with --batch: an Idempotency-Key per request"
    )
    parser.add_argument(
        "--buckets", default="", help="--buckets of the service, e.g. minute,hour,day"
    )
    args = parser.parse_args(argv)
    if args.idempotent and not args.batch:
        parser.error("--idempotent needs --batch")
    import uvloop

    if args.lean:
        samples = uvloop.run(drive_lean(args))
        what = "python-lean"
    else:
        with tempfile.TemporaryDirectory(prefix="incrementer-hotpath-") as tmp:
            samples = uvloop.run(drive_service(args, Path(tmp)))
        what = (
            f"incrementer ({'compiled' if build.compiled() else 'pure Python'}), "
            f"durability {args.durability}"
            + (", auth on" if args.auth else "")
            + (f", buckets {args.buckets}" if args.buckets else "")
        )
    best, median = min(samples), statistics.median(samples)
    unit = "request"
    if args.batch:
        unit = "increment"
        what += f", batches of {args.batch}" + (" with Idempotency-Key" if args.idempotent else "")
    print(
        f"{what}, {args.keys} keys, {args.per_tick} requests per tick: "
        f"{1e6 * best:.2f} µs CPU per {unit} (median of {REPEATS}: {1e6 * median:.2f}), "
        f"{1 / best:,.0f} {unit}s/s of one core without the socket syscalls"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
