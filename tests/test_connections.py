"""Connections that hold a slot without asking anything: timed from the accept, and recycled
(the longest idle first) when the connection limit is reached."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from support import exchange, host_port, run_service, settings_for

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
OK = b'{"status":"ok"}'


async def healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One GET /healthz on an open connection: the body of its answer."""
    writer.write(HEALTHZ)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    return await asyncio.wait_for(reader.readexactly(len(OK)), 5)


async def test_silent_connection_closed_after_request_timeout(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A connection that never sends a byte is closed after --request-timeout (without an
    answer: nothing was asked), not held for --idle-timeout."""
    settings = settings_for(tmp_path, sqlite_url, request_timeout=1.0, idle_timeout=60.0)
    async with run_service(settings) as svc:
        reader, writer = await asyncio.open_connection(*host_port(svc.url))
        try:
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert time.monotonic() - started < 10
        finally:
            writer.close()


async def test_connection_limit_closes_the_longest_idle(tmp_path: Path, sqlite_url: str) -> None:
    """At --max-connections a new client is served: the keep-alive connection idle the longest
    is closed to make room, and the others keep working."""
    settings = settings_for(tmp_path, sqlite_url, max_connections=3, idle_timeout=60.0)
    async with run_service(settings) as svc:
        held = [await asyncio.open_connection(*host_port(svc.url)) for _ in range(3)]
        try:
            for reader, writer in held:
                assert await healthz(reader, writer) == OK
            [newcomer] = await exchange(svc.url, HEALTHZ, 1)
            assert newcomer.status == 200
            oldest_reader, _ = held[0]
            assert await asyncio.wait_for(oldest_reader.read(), 5) == b""
            for reader, writer in held[1:]:
                assert await healthz(reader, writer) == OK
        finally:
            for _, writer in held:
                writer.close()


async def test_silent_connections_do_not_lock_others_out(tmp_path: Path, sqlite_url: str) -> None:
    """With every slot taken by connections that never speak, new clients are still served
    at once: each takes the slot of the oldest silent connection."""
    settings = settings_for(tmp_path, sqlite_url, max_connections=20, request_timeout=60.0)
    async with run_service(settings) as svc:
        silent = [await asyncio.open_connection(*host_port(svc.url)) for _ in range(20)]
        newcomers = []
        try:
            await asyncio.sleep(0.1)
            for _ in range(5):
                newcomers.append(await asyncio.open_connection(*host_port(svc.url)))
                assert await healthz(*newcomers[-1]) == OK
            closed = [await asyncio.wait_for(reader.read(), 5) for reader, _ in silent[:5]]
            assert closed == [b""] * 5
        finally:
            for _, writer in silent + newcomers:
                writer.close()
