"""How generated input reaches the live server: hypothesis settings shared by the fuzz tests, the
prefix of the keys they count, and blocking clients for hypothesis's worker thread."""

from __future__ import annotations

import http.client
import socket

from hypothesis import HealthCheck, Phase, settings
from support import host_port, unique

FUZZ = settings(
    deadline=None,
    derandomize=True,
    # The explain phase replays variations against a server whose state has moved on, and
    # prints the failing example without its arguments.
    phases=[phase for phase in Phase if phase is not Phase.explain],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Keys of valid increments start with this, so they never collide with other tests' keys in the
# session's PostgreSQL database.
PREFIX = unique("fz") + ":"


class Client:
    """http.client on one connection, reopened when the server closes it."""

    def __init__(self, url: str) -> None:
        host, port = host_port(url)
        self.conn = http.client.HTTPConnection(host, port, timeout=10)

    def send(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {} if content_type is None else {"Content-Type": content_type}
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.will_close:
            self.conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def close(self) -> None:
        self.conn.close()


def exchange_raw(url: str, data: bytes) -> tuple[bytes, bool]:
    """Send data, half-close, read until the server closes: (bytes read, closed cleanly)."""
    host, port = host_port(url)
    with socket.create_connection((host, port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server already closed: it has answered or refused
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return bytes(received), False
            if not chunk:
                return bytes(received), True
            received += chunk
