"""A TCP proxy that delays every byte it passes by a random latency (200 ms +- 50 by default), in
both directions, keeping their order: what the tc netem qdisc would do, which this kernel lacks.
It runs on its own threads, in the network namespace of the thread that creates it."""

from __future__ import annotations

import contextlib
import queue
import random
import socket
import threading
import time
from collections.abc import Iterator


class DelayProxy:
    def __init__(self, target_port: int, delay: float = 0.2, jitter: float = 0.05) -> None:
        self.target = ("127.0.0.1", target_port)
        self.delay = delay
        self.jitter = jitter
        self.delayed = 0
        """Chunks passed on late, both directions."""
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _latency(self) -> float:
        with self._lock:
            self.delayed += 1
            return self.delay + self._rng.uniform(-self.jitter, self.jitter)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += (client, upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(
                    target=self._read, args=(source, sink, chunks), daemon=True
                ).start()
                threading.Thread(
                    target=self._write, args=(sink, source, chunks), daemon=True
                ).start()

    def _read(
        self, source: socket.socket, sink: socket.socket, chunks: queue.Queue[tuple[float, bytes]]
    ) -> None:
        due = 0.0
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            # Never earlier than the chunk before: a random latency must not reorder the stream.
            due = max(due, time.monotonic() + self._latency())
            chunks.put((due, data))
            if not data:
                return

    def _write(
        self, sink: socket.socket, source: socket.socket, chunks: queue.Queue[tuple[float, bytes]]
    ) -> None:
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
