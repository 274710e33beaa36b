"""A TCP proxy that delays every byte it passes by a random latency (200 ms +- 50 by default), in
both directions, keeping their order: what the tc netem qdisc would do, which this kernel lacks.
It runs on its own threads (socketserver), in the network namespace of the thread that creates
it."""

from __future__ import annotations

import contextlib
import queue
import random
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

Chunks = queue.Queue[tuple[float, bytes]]


class DelayProxy(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, target_port: int, delay: float = 0.2, jitter: float = 0.05) -> None:
        super().__init__(("127.0.0.1", 0), _Link)
        self.target = ("127.0.0.1", target_port)
        self.delay = delay
        self.jitter = jitter
        self.port = int(self.server_address[1])
        self.delayed = 0
        """Chunks passed on late, both directions."""
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self.serve_forever, args=(0.1,), daemon=True).start()

    def latency(self) -> float:
        with self._lock:
            self.delayed += 1
            return self.delay + self._rng.uniform(-self.jitter, self.jitter)

    def track(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets += sockets

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        with self._lock:
            for sock in self._sockets:
                sock.close()


class _Link(socketserver.BaseRequestHandler):
    """One client connection: its bytes to the target and the target's back, each late."""

    server: DelayProxy

    def handle(self) -> None:
        client: socket.socket = self.request
        try:
            upstream = socket.create_connection(self.server.target, timeout=5)
        except OSError:
            return
        upstream.settimeout(None)
        self.server.track(client, upstream)
        back: Chunks = queue.Queue()
        threading.Thread(target=self._read, args=(upstream, back), daemon=True).start()
        threading.Thread(target=_write, args=(client, upstream, back), daemon=True).start()
        forth: Chunks = queue.Queue()
        threading.Thread(target=_write, args=(upstream, client, forth), daemon=True).start()
        self._read(client, forth)

    def _read(self, source: socket.socket, chunks: Chunks) -> None:
        due = 0.0
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            # Never earlier than the chunk before: a random latency must not reorder the stream.
            due = max(due, time.monotonic() + self.server.latency())
            chunks.put((due, data))
            if not data:
                return


def _write(sink: socket.socket, source: socket.socket, chunks: Chunks) -> None:
    while True:
        due, data = chunks.get()
        time.sleep(max(0.0, due - time.monotonic()))
        try:
            if not data:
                sink.shutdown(socket.SHUT_WR)
                return
            sink.sendall(data)
        except OSError:
            source.close()
            sink.close()
            return


@contextlib.contextmanager
def delayed(target_port: int, delay: float = 0.2, jitter: float = 0.05) -> Iterator[DelayProxy]:
    proxy = DelayProxy(target_port, delay, jitter)
    try:
        yield proxy
    finally:
        proxy.close()
