"""A TCP proxy in front of one or more servers that breaks connections on purpose: after the
request reached the server (the client cannot know whether it counted, and must retry blindly),
or before. It runs on its own threads, so sync and async tests (and servers in the test's own
event loop) can all sit behind it."""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
from collections.abc import Iterator


class ChaosProxy:
    def __init__(self, upstreams: list[str], seed: int = 0) -> None:
        """upstreams: server URLs (http://host:port); each connection goes to one at random."""
        self.upstreams = list(upstreams)
        self.drop_after = 0.0
        """Probability that a response is not passed on: the connection is reset instead."""
        self.drop_before = 0.0
        """Probability that a request is not passed on: the connection is reset instead."""
        self.refusing = False
        """Reset every connection at once (the service is unreachable)."""
        self.dropped_after = 0
        self.dropped_before = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def set_upstreams(self, upstreams: list[str]) -> None:
        with self._lock:
            self.upstreams = list(upstreams)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def _chance(self, probability: float) -> bool:
        with self._lock:
            return self._rng.random() < probability

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            target = self._rng.choice(self.upstreams) if self.upstreams else ""
        host, _, port = target.removeprefix("http://").rpartition(":")
        if self.refusing or not target:
            _reset(client)
            return
        try:
            upstream = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        try:
            self._pipe(client, upstream)
        finally:
            _reset(client)
            upstream.close()

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        while not self._closed:
            readable, _, _ = select.select([client, upstream], [], [], 1.0)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if sock is client:
                    if self.refusing or self._chance(self.drop_before):
                        self.dropped_before += 1
                        return
                    upstream.sendall(data)
                else:
                    if self.refusing or self._chance(self.drop_after):
                        self.dropped_after += 1
                        return
                    client.sendall(data)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a crashed peer or a middlebox would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.contextmanager
def chaos_proxy(upstreams: list[str], seed: int = 0) -> Iterator[ChaosProxy]:
    proxy = ChaosProxy(upstreams, seed)
    try:
        yield proxy
    finally:
        proxy.close()
