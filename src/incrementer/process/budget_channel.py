"""A `--workers` group's shared rate-limit buckets: held by the supervisor, reconciled with each
worker over a socket pair made when the supervisor starts it (no path another process could
connect to; the worker's end is passed like its "ready" pipe).

Why the supervisor holds them, rather than memory-mapped slots the workers write and all read:
the slots would hold what each worker let through, not a bucket's level, so a worker that a
client's connections move to, or one restarted, could not know how much of the burst is left
and would start from a full one; the supervisor keeps the level across both. Both ways one
exchange every --rate-limit-sync covers all of a worker's active limits, and a worker never waits
on it to answer a request; the supervisor's share of the work is a dict lookup and a little
arithmetic per limit and exchange, on a thread of its own, while its main loop keeps watching
processes. Frames are a 4-byte length and a msgpack body: [number, member, [[name, taken, rate,
burst], ...]] one way, [number, processes, [level, ...]] back. The same exchange goes to Redis for a fleet
(auth/redis_budgets.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence

import msgspec

from incrementer.auth.budgets import BudgetStore, BudgetStoreError, BudgetTable, Shared, Usage

log = logging.getLogger("incrementer.supervisor")

LENGTH = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
Request = tuple[int, str, list[tuple[str, int, float, float]]]


class BudgetServer:
    """The supervisor's end: a thread running an event loop that answers every worker's
    exchanges from one BudgetTable."""

    def __init__(self) -> None:
        self.table = BudgetTable()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._channels: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        threading.Thread(target=self._run, name="budgets", daemon=True).start()
        self._started.wait()

    def connect(self) -> socket.socket:
        """A new worker's end of a socket pair whose other end this server answers (called
        from the supervisor's main thread, for each worker it starts)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._adopt, ours)
        return theirs

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._started.set()
        loop.run_forever()

    def _adopt(self, sock: socket.socket) -> None:
        task = asyncio.ensure_future(self._serve(sock))
        self._channels.add(task)
        task.add_done_callback(self._channels.discard)

    async def _serve(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        decoder = msgspec.msgpack.Decoder(Request)
        try:
            while True:
                number, member, usage = decoder.decode(await _read_frame(reader))
                shared = self.table.exchange(
                    member, [Usage(*item) for item in usage], time.monotonic()
                )
                answer = (number, shared.processes, shared.levels)
                writer.write(_frame(msgspec.msgpack.encode(answer)))
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, msgspec.DecodeError, ValueError):
            pass  # the worker is gone (or sent garbage, which only a bug would)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class SupervisorBudgets(BudgetStore):
    """A worker's end: its half of the socket pair, for the worker's life. Each request carries a
    number its answer repeats, and answers are cut from a buffer of our own, so an exchange cut
    off by its timeout leaves nothing out of step: its late answer is read and dropped."""

    def __init__(self, fd: int, workers: int) -> None:
        self.where = "the supervisor"
        self.processes = workers
        self._sock: socket.socket | None = socket.socket(fileno=fd)
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._decoder = msgspec.msgpack.Decoder(tuple[int, int, list[float]])
        self._buffer = bytearray()
        self._sent = 0

    async def exchange(self, member: str, usage: Sequence[Usage]) -> Shared:
        self._sent += 1
        request = (self._sent, member, [(u.name, u.taken, u.rate, u.burst) for u in usage])
        try:
            reader, writer = await self._open()
            writer.write(_frame(msgspec.msgpack.encode(request)))
            await writer.drain()
            while True:
                number, processes, levels = self._decoder.decode(await self._answer(reader))
                if number == self._sent:
                    return Shared(processes, levels)
        except (OSError, msgspec.DecodeError, ValueError) as exc:
            raise BudgetStoreError(f"{type(exc).__name__}: {exc}") from exc

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._stream is None:
            if self._sock is None:
                raise OSError("the channel to the supervisor is closed")
            sock, self._sock = self._sock, None
            self._stream = await asyncio.open_unix_connection(sock=sock)
        return self._stream

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        buffer = self._buffer
        while True:
            if len(buffer) >= LENGTH.size:
                (length,) = LENGTH.unpack_from(buffer)
                if len(buffer) >= LENGTH.size + length:
                    body = bytes(buffer[LENGTH.size : LENGTH.size + length])
                    del buffer[: LENGTH.size + length]
                    return body
            chunk = await reader.read(65536)
            if not chunk:
                raise OSError("the supervisor closed the channel")
            buffer += chunk

    async def close(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes")
    return await reader.readexactly(length)
