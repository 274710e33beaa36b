"""The port a `--workers` group shares: reserved by the supervisor, joined by every worker.

Each worker binds host:port with SO_REUSEPORT (http/server.py, `reuse_port`) and the kernel hashes
each new connection to one of their listening sockets. The alternative, one socket bound by the
supervisor and inherited (gunicorn's and uvicorn's way), leaves the spread to whichever event loop
wakes first, and libuv accepts every pending connection in one go: bench/spread.py measured the
busiest of 2 workers at 62-77% of the requests of 32 wrk connections (one round 91% of the
connections) and the busiest of 3 at 84%, against 54-58% and 58% with SO_REUSEPORT (52-55% and
40% through nginx).

The supervisor binds the port first without SO_REUSEPORT, which fails if anything listens there
(a stray worker of an earlier group included), then sets the option on that socket, which never
listens, and keeps it: the port stays reserved (and `--port 0` resolved) while workers come and
go. The costs: connections still in a dying worker's accept queue are reset (Linux 5.14+ can
migrate them: net.ipv4.tcp_migrate_req), a worker whose loop is stuck keeps its share of new
connections, and any process of the same user could join the port.
"""

from __future__ import annotations

import socket

from incrementer.http.server import cannot_listen


class PortTaken(Exception):
    """The host does not resolve, or something already listens on the port."""


def reserve(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind host:port (every address it resolves to, as asyncio would) without SO_REUSEPORT,
    then allow it so the workers can join. The sockets never listen; keep them open for the life
    of the group. Returns them and the port (resolved if it was 0)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortTaken(cannot_listen(host, port, exc)) from None
    reserved: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            reserved.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds
            try:
                sock.bind((address[0], port, *address[2:]))
            except OSError as exc:
                raise PortTaken(cannot_listen(host, port, exc)) from None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in reserved:
            sock.close()
        raise
    return reserved, port
