"""The listening socket, the set of connections, the once-a-second clock and timeout sweep."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from dataclasses import dataclass

from incrementer.http import responses
from incrementer.http.pipeline import Gate
from incrementer.http.protocol import Handler, HttpConnection

log = logging.getLogger("incrementer.http")


@dataclass(frozen=True)
class Limits:
    """What one connection and one request may take (the --max-* and --*-timeout settings)."""

    max_body_bytes: int
    max_header_bytes: int
    max_connections: int
    idle_timeout: float
    request_timeout: float


class HttpServer:
    def __init__(self, handler: Handler, gate: Gate, limits: Limits) -> None:
        self.handler = handler
        self.fast_path = handler.fast_path()
        self.gate = gate
        self.clock = responses.Clock(time.monotonic())
        # In accept order (a dict as an ordered set): the longest-idle search breaks ties by it.
        self.connections: dict[HttpConnection, None] = {}
        self.max_body_bytes = limits.max_body_bytes
        self.max_header_bytes = limits.max_header_bytes
        self.max_connections = limits.max_connections
        self.idle_timeout = limits.idle_timeout
        self.request_timeout = limits.request_timeout
        self._server: asyncio.Server | None = None
        self._tick: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> tuple[str, int]:
        """Listen on host:port. reuse_port: every worker of a `--workers` group binds the same
        port with SO_REUSEPORT and the kernel spreads new connections among them (sharedport.py
        says why this rather than one inherited socket)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self),
            host,
            port,
            backlog=4096,
            reuse_address=True,
            reuse_port=reuse_port,
        )
        for sock in self._server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._tick = loop.call_later(1.0, self._on_tick)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    def _on_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick = loop.call_later(1.0, self._on_tick)
        now = time.monotonic()
        self.clock.refresh(now)
        for conn in list(self.connections):
            conn.check_timeouts(now, self.idle_timeout, self.request_timeout)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> int:
        """Finish in-flight requests, close every connection; returns how many were cut off."""
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            for conn in list(self.connections):
                conn.shutdown()
        forced = len(self.connections)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._tick is not None:
            self._tick.cancel()
        if self._server is not None:
            await self._server.wait_closed()
        return forced


# Why a bind fails, for the errors people meet, and what to do about it.
_BIND_FAILURES = {
    errno.EADDRINUSE: (
        "address already in use: another process listens on that port (an incrementer still "
        "running?); stop it, or choose another --port"
    ),
    errno.EADDRNOTAVAIL: "no interface of this host has that address; check --host",
    errno.EACCES: "permission denied (ports below 1024 need privileges); choose another --port",
}


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """The one sentence for a failed bind, whoever binds: a process serving alone, or the
    supervisor of a `--workers` group reserving the port."""
    shown = f"[{host}]" if ":" in host else host
    if isinstance(exc, socket.gaierror):
        why = f"cannot resolve host {host!r} ({exc.strerror}); check --host"
    else:
        why = _BIND_FAILURES.get(exc.errno or 0) or exc.strerror or str(exc)
    return f"cannot listen on {shown}:{port}: {why}"
