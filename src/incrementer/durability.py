"""When a response may leave: the acknowledgement policy of each --durability mode.

Connections queue their responses during an event-loop tick and register with the gate. At the end
of the tick the gate makes the tick's WAL frame as durable as the mode promises, then releases them:

- memory:    release at once (the increment is only in the buffer).
- wal:       one write() of the tick's frame, then release; an fsync every --fsync-interval.
- wal-fsync: one write(), then one fdatasync in a worker thread per group of ticks (group commit);
             responses wait for the fsync that covers them, ticks keep coalescing meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from incrementer.config import Durability
from incrementer.ingest.sequence import SequencedLog
from incrementer.metrics import Metrics

if TYPE_CHECKING:
    # The connections the gate holds (release_output, take_output, release, abort). Named by
    # their class, not a Protocol: the compiled gate then calls them through the method table.
    from incrementer.http.protocol import HttpConnection as Held

log = logging.getLogger("incrementer.durability")

Group = list[tuple["Held", list[bytes | None]]]


class AckGate:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        wal: SequencedLog,
        mode: Durability,
        fsync_interval: float,
        metrics: Metrics,
    ) -> None:
        self._loop = loop
        self._wal = wal
        self._mode = mode
        self._fsync_interval = fsync_interval
        self._metrics = metrics
        self._held: list[Held] = []
        self._scheduled = False
        self._waiting: Group = []  # written, waiting for the next fsync (wal-fsync)
        self._syncing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-fsync")
        self._timer: asyncio.TimerHandle | None = None
        self.failed: str | None = None
        """Set when the WAL could not be written or synced: readyz reports it."""

    def start(self) -> None:
        if self._mode == "wal":
            self._timer = self._loop.call_later(self._fsync_interval, self._periodic_sync)

    def hold(self, conn: Held) -> None:
        self._held.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._commit)

    def _commit(self) -> None:
        self._scheduled = False
        held = self._held
        self._held = []
        if self._mode != "memory":
            try:
                self._wal.write()
            except OSError as exc:
                self._wal_failed("write", exc, held)
                return
        if self._mode != "wal-fsync":
            for conn in held:
                conn.release_output()
            return
        self._waiting.extend((conn, conn.take_output()) for conn in held)
        if not self._syncing:
            self._start_sync()

    def _start_sync(self) -> None:
        group = self._waiting
        self._waiting = []
        self._syncing = True
        started = time.perf_counter()
        future = self._loop.run_in_executor(self._executor, self._wal.sync)
        future.add_done_callback(lambda f: self._synced(f, group, started))

    def _synced(self, future: asyncio.Future[None], group: Group, started: float) -> None:
        self._syncing = False
        self._metrics.fsync_seconds.observe(time.perf_counter() - started)
        exc = future.exception()
        if exc is not None:
            self._wal_failed("fsync", exc, [conn for conn, _ in group])
        else:
            for conn, out in group:
                conn.release(out)
        if self._waiting:
            self._start_sync()

    def _periodic_sync(self) -> None:
        """Mode wal: the same fsync as wal-fsync's, with no responses waiting on it."""
        self._timer = self._loop.call_later(self._fsync_interval, self._periodic_sync)
        if not self._syncing and self._wal.synced_bytes < self._wal.written_bytes:
            self._start_sync()

    def _wal_failed(self, what: str, exc: BaseException, conns: list[Held]) -> None:
        # The increments are in the buffer and will still be flushed, but the promise behind a
        # 202 cannot be kept: the clients get no answer (in flight = maybe applied, never lost).
        self.failed = f"WAL {what} failed: {exc}"
        log.error("WAL %s failed, %d connections aborted: %s", what, len(conns), exc)
        for conn in conns:
            conn.take_output()
            conn.abort()

    async def close(self) -> None:
        """Release what is held (final write + sync) and stop the periodic fsync."""
        if self._timer is not None:
            self._timer.cancel()
        while self._scheduled or self._syncing or self._waiting:
            await asyncio.sleep(0.001)
        if self._mode != "memory":
            await self._loop.run_in_executor(self._executor, self._wal.sync)
        self._executor.shutdown(wait=True)
