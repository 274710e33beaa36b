"""Chaos: the Python client sends through a proxy that resets connections at random, before and
after the server got the request, to two instances, one of which is killed with kill -9 and
restarted meanwhile. The database totals must equal exactly what the caller passed to incr()."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from chaos_proxy import ChaosProxy, chaos_proxy
from incrementer_client import Client, ClientStats
from support import RekeyingTransport, db_totals, kill, serve_args, spawn, unique

KEYS = 200


@dataclass
class Outcome:
    expected: dict[str, int]
    totals: dict[str, int]
    stats: ClientStats
    proxy: ChaosProxy


def chaos_run(tmp_path: Path, db_url: str, transport: httpx.BaseTransport | None = None) -> Outcome:
    """Two instances behind the proxy; the caller counts for ~4 s while one instance is killed
    and restarted; then the client drains, both instances stop gracefully, totals are read."""
    prefix = unique()
    keys = [f"{prefix}-{i}" for i in range(KEYS)]

    def args(name: str) -> list[str]:
        return serve_args(tmp_path / name, db_url, "--flush-interval", "0.05")

    first, second = spawn(args("a")), spawn(args("b"))
    expected = dict.fromkeys(keys, 0)
    stop = threading.Event()
    try:
        with chaos_proxy([first.url, second.url], seed=7) as proxy:
            proxy.drop_before = 0.1
            proxy.drop_after = 0.3
            client = Client(
                proxy.url, max_batch=5, flush_interval=0.01, timeout=2, transport=transport
            )

            def caller() -> None:
                rng = random.Random(11)
                while not stop.is_set():
                    for _ in range(200):
                        key, value = rng.choice(keys), rng.randint(1, 9)
                        client.incr(key, value)
                        expected[key] += value
                    time.sleep(0.005)

            thread = threading.Thread(target=caller)
            thread.start()
            time.sleep(1.5)
            kill(first.proc)  # mid-load: batches it logged and never answered stay in its WAL
            time.sleep(0.5)
            first = spawn(args("a"))  # replays its WAL; a new port
            proxy.set_upstreams([first.url, second.url])
            time.sleep(1.5)
            stop.set()
            thread.join()
            client.close()  # delivers everything, through the same chaos
            stats = client.stats
        for server in (first, second):
            assert server.stop(signal.SIGTERM) == 0, server.read_log()
    finally:
        stop.set()
        kill(first.proc)
        kill(second.proc)
    totals = asyncio.run(db_totals(db_url, keys))
    return Outcome({k: v for k, v in expected.items() if v}, totals, stats, proxy)


def test_totals_equal_what_the_caller_counted_through_chaos(tmp_path: Path, db_url: str) -> None:
    """Resets before and after the request, an instance killed and restarted: every increment
    passed to incr() is in the database exactly once."""
    run = chaos_run(tmp_path, db_url)
    assert run.proxy.dropped_after > 0 and run.proxy.dropped_before > 0
    assert run.stats.replayed > 0  # answers were lost after the server had the batch
    assert run.stats.dropped == 0 and run.stats.pending == 0
    assert sum(run.expected.values()) > 10_000
    assert run.totals == run.expected


def test_the_chaos_harness_catches_double_counting(tmp_path: Path, sqlite_url: str) -> None:
    """The same run with a client that retries under a new key each time ends above what was
    counted: the harness above would catch a client (or server) that is not idempotent."""
    run = chaos_run(tmp_path, sqlite_url, RekeyingTransport())
    assert run.stats.dropped == 0
    assert sum(run.totals.values()) > sum(run.expected.values())
