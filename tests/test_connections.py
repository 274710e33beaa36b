"""Connections that hold a slot without asking anything: timed from the accept, and recycled
(the longest idle first, then the longest-unfinished first request) when the connection limit
is reached; one client address holds at most --max-connections-per-ip of them."""

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
    settings = settings_for(
        tmp_path, sqlite_url, max_connections=3, max_connections_per_ip=3, idle_timeout=60.0
    )
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
    settings = settings_for(
        tmp_path, sqlite_url, max_connections=20, max_connections_per_ip=20, request_timeout=60.0
    )
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


HALF_SENT = b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


async def connect_from(url: str, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the server from a loopback address of our choice (127.0.0.0/8 is all
    this host's): clients at distinct addresses without a network."""
    return await asyncio.open_connection(*host_port(url), local_addr=(address, 0))


async def test_half_sent_first_requests_do_not_lock_others_out(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Guards item: connections. With every slot held by connections that sent the first bytes
    of a request and never the rest, a new client is served at once: the one sending its first
    request the longest is closed to make room (today the newcomer got 503)."""
    settings = settings_for(
        tmp_path,
        sqlite_url,
        max_connections=50,
        max_connections_per_ip=50,
        request_timeout=60.0,
    )
    async with run_service(settings) as svc:
        stalled = []
        try:
            for _ in range(50):
                stalled.append(await connect_from(svc.url, "127.0.0.2"))
                stalled[-1][1].write(HALF_SENT)
            await asyncio.sleep(0.2)
            newcomer = await connect_from(svc.url, "127.0.0.3")
            stalled.append(newcomer)
            assert await healthz(*newcomer) == OK
            oldest_reader, _ = stalled[0]
            assert await asyncio.wait_for(oldest_reader.read(), 5) == b""
            assert len(svc.server.connections) == 50
        finally:
            for _, writer in stalled:
                writer.close()


async def test_one_address_holds_at_most_its_share(tmp_path: Path, sqlite_url: str) -> None:
    """Guards item: connections. One address whose connections are all busy (each answered a
    request and is half-way through sending the next, so none can be closed without cutting an
    exchange short) holds at most --max-connections-per-ip, by default a quarter of
    --max-connections: past it, that address gets 503, and another address is still served
    (today the one address took every slot and the other got 503)."""
    settings = settings_for(tmp_path, sqlite_url, max_connections=50, request_timeout=60.0)
    assert settings.connections_per_ip == 12
    async with run_service(settings) as svc:
        held = []
        refused = 0
        try:
            for _ in range(50):
                reader, writer = await connect_from(svc.url, "127.0.0.2")
                held.append((reader, writer))
                writer.write(HEALTHZ)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                if head.startswith(b"HTTP/1.1 503"):
                    refused += 1
                    assert b"Retry-After: 1" in head
                    continue
                assert head.startswith(b"HTTP/1.1 200"), head
                assert await asyncio.wait_for(reader.readexactly(len(OK)), 5) == OK
                writer.write(HALF_SENT)  # the next request begun: busy
            assert refused == 50 - 12
            await asyncio.sleep(0.1)
            other = await connect_from(svc.url, "127.0.0.3")
            held.append(other)
            assert await healthz(*other) == OK
        finally:
            for _, writer in held:
                writer.close()


async def test_a_refusal_per_address_says_why(tmp_path: Path, sqlite_url: str) -> None:
    """The 503 an address gets at its own limit names that limit, in a JSON error."""
    settings = settings_for(
        tmp_path, sqlite_url, max_connections=10, max_connections_per_ip=1, request_timeout=60.0
    )
    async with run_service(settings) as svc:
        reader, writer = await connect_from(svc.url, "127.0.0.2")
        try:
            assert await healthz(reader, writer) == OK
            writer.write(HALF_SENT)
            await asyncio.sleep(0.1)
            [served] = await exchange(svc.url, HEALTHZ, 1)
            assert served.status == 200  # from 127.0.0.1: another address
            second, other = await connect_from(svc.url, "127.0.0.2")
            other.write(HEALTHZ)
            answer = await asyncio.wait_for(second.read(), 5)
            other.close()
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b'"error":"too_many_connections"' in answer
            assert b"from this address" in answer
        finally:
            writer.close()
