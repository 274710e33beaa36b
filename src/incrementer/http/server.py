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
from incrementer.http.protocol import Handler, HttpConnection, room_maker

log = logging.getLogger("incrementer.http")


@dataclass(frozen=True)
class Limits:
    """What one connection and one request may take (the --max-* and --*-timeout settings)."""

    max_body_bytes: int
    max_header_bytes: int
    max_connections: int
    idle_timeout: float
    request_timeout: float
    max_connections_per_ip: int = 0
    """Open connections from one client address; 0: no such limit."""


class HttpServer:
    def __init__(self, handler: Handler, gate: Gate, limits: Limits) -> None:
        self.handler = handler
        self.fast_path = handler.fast_path()
        self.gate = gate
        self.clock = responses.Clock(time.monotonic())
        # In accept order (a dict as an ordered set): the longest-idle search breaks ties by it.
        self.connections: dict[HttpConnection, None] = {}
        self.per_peer: dict[str, int] = {}
        """Open connections by client address (those counted in connections)."""
        self.max_body_bytes = limits.max_body_bytes
        self.max_header_bytes = limits.max_header_bytes
        self.max_connections = limits.max_connections
        self.max_connections_per_ip = limits.max_connections_per_ip
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

    def admit(self, conn: HttpConnection) -> str:
        """Count a new connection in, making room if a limit is reached; the reason it is
        refused (the 503's detail) when no room can be made, else "".

        At a client address's limit (--max-connections-per-ip) room is made among that
        address's own connections only; at --max-connections, among all. Either way the
        connection idle the longest goes first (as nginx reuses idle keep-alive connections),
        then the one that has been sending its first request the longest: a connection that
        sends a request's first bytes and never the rest holds its slot for --request-timeout,
        and a few clients doing that on purpose would otherwise lock everyone else out."""
        peer = conn.peer
        per_ip = self.max_connections_per_ip
        if peer and per_ip and self.per_peer.get(peer, 0) >= per_ip:
            if not self._reclaim(peer):
                return "Too many connections from this address."
        elif len(self.connections) >= self.max_connections and not self._reclaim(""):
            return "The server is at its connection limit."
        self.connections[conn] = None
        if peer:
            self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        return ""

    def release(self, conn: HttpConnection) -> None:
        """A connection is closed or being closed: it no longer counts against the limits."""
        if conn not in self.connections:
            return
        del self.connections[conn]
        peer = conn.peer
        left = self.per_peer.get(peer, 0) - 1
        if left > 0:
            self.per_peer[peer] = left
        else:
            self.per_peer.pop(peer, None)

    def _reclaim(self, peer: str) -> bool:
        """Close one connection (of `peer`, or of anyone when it is "") to make room; False
        when none can be closed without breaking an exchange."""
        victim = room_maker(self.connections, peer)
        if victim is None:
            return False
        self.release(victim)
        victim.reclaim()
        return True

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
