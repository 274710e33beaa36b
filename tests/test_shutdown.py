"""--shutdown-timeout is a hard ceiling, even with a database that accepts and never answers:
the process exits, says what it left in the WAL, and the next start applies it exactly once."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
from proxy import proxy_to
from support import db_totals, kill, serve_args, spawn, spawned, unique

SHUTDOWN_TIMEOUT = 3.0


async def test_sigterm_with_a_frozen_database_exits_by_the_shutdown_timeout(
    tmp_path: Path, pg_url: str
) -> None:
    """PostgreSQL frozen under the service: SIGTERM ends the process soon after
    --shutdown-timeout (not after the driver's own minute-long timeouts), exit status 1, the log
    says why and what stays in the WAL; the next start applies exactly the acknowledged."""
    key = unique("frozen-")
    async with proxy_to(pg_url) as (proxy, via_proxy):
        args = serve_args(
            tmp_path, via_proxy, shutdown_timeout=str(SHUTDOWN_TIMEOUT), flush_interval="0.05"
        )
        server = await asyncio.to_thread(spawn, args)
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                for _ in range(20):
                    resp = await client.post("/increment", json={"key": key, "value": 1})
                    assert resp.status_code == 202
                proxy.freeze()
                for _ in range(30):
                    resp = await client.post("/increment", json={"key": key, "value": 1})
                    assert resp.status_code == 202  # the WAL takes them; the flush hangs
                await asyncio.sleep(0.3)  # a flush is now stuck inside the frozen database
            began = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.proc.wait, SHUTDOWN_TIMEOUT + 20)
            took = time.monotonic() - began
        finally:
            kill(server.proc)
        log = server.read_log()
        assert code == 1, log
        assert took < SHUTDOWN_TIMEOUT + 20, log  # the driver alone would wait 60 s
        assert "shutdown deadline" in log, log
        # Why: the watchdog's reason once the flush went --database-timeout unanswered.
        assert "no answer to the flush" in log or "the database did not answer" in log, log
        assert "stay in the WAL" in log and "replayed at the next start" in log, log
    with spawned(serve_args(tmp_path, pg_url)) as server:
        server.stop_cleanly()
    assert await db_totals(pg_url, [key]) == {key: 50}


async def test_a_frozen_database_is_reported_with_a_reason(tmp_path: Path, pg_url: str) -> None:
    """A database that stops answering is reported as unresponsive with what failed (a ping
    unanswered for --database-timeout), never an empty reason."""
    async with proxy_to(pg_url) as (proxy, via_proxy):
        args = serve_args(tmp_path, via_proxy, shutdown_timeout="1")
        server = await asyncio.to_thread(spawn, args)
        try:
            proxy.freeze()
            deadline = time.monotonic() + 30
            while "database unresponsive" not in server.read_log():
                assert time.monotonic() < deadline, server.read_log()
                await asyncio.sleep(0.2)
        finally:
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.proc.wait, 30)
            kill(server.proc)
    line = next(x for x in server.read_log().splitlines() if "database unresponsive" in x)
    assert line.rstrip().endswith("no answer to a ping within 3 s (--database-timeout)"), line
