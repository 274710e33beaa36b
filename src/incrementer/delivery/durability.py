"""When a response may leave: the acknowledgement policy of each --durability mode.

Connections queue their responses during an event-loop tick and register with the gate. At the end
of the tick the gate makes the tick's WAL frame as durable as the mode promises, then releases them:

- memory:    release at once (the increment is only in the buffer).
- wal:       one write() of the tick's frame, then release; an fsync every --fsync-interval.
- wal-fsync: one write(), then one fdatasync in a worker thread for all the ticks written since the
             last one began (a group commit); responses wait for the fsync that covers them, ticks
             keep coalescing meanwhile.

When the disk fails, a 202 still never lies and nothing unlogged is ever applied:

- write() fails (ENOSPC, EIO): the tick's increments were never logged, so they are taken back
  out of the buffer and each of their 202s becomes a 503 `wal_unavailable` with Retry-After; every
  other response of the tick (reads, health, errors) leaves unchanged. Every later tick tries
  again, and while the failure lasts a probe write once a second lets readiness recover by itself
  even with no traffic.
- fdatasync fails: the pages it covered may be lost even if a retry reports success (PostgreSQL's
  "fsyncgate"), so the segment is abandoned (never synced or appended to again; the next frame
  starts a new one) and what was written to it is made durable by the database instead: responses
  waiting on it (wal-fsync) leave as 202 once the flush covering their seq has committed. In mode
  wal those 202s had already left, as that mode promises survival of a process crash only; the
  same commit makes them durable.

`failure` names the failure for /readyz until a write (or fsync, or probe) succeeds again;
`incrementer_wal_failures_total{operation}` counts them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from incrementer.config import Durability
from incrementer.http import responses
from incrementer.http.pipeline import Gate
from incrementer.http.pipeline import Pipeline as Held
from incrementer.ingest.intake import Intake
from incrementer.ingest.sequence import SequencedLog
from incrementer.metrics import Metrics

log = logging.getLogger("incrementer.durability")

WRITE_FAILED: Final = "wal_write_failed"
FSYNC_FAILED: Final = "wal_fsync_failed"
PROBE_EVERY: Final = 1.0
_ACCEPTED: Final = b"HTTP/1.1 202 "
_CONNECTION: Final = b"\r\nConnection: "
_RETRY_AFTER: Final = b"Retry-After: 1\r\n"
_ACCEPTED_BATCHES: Final = ("increments", 202)

Output = list[bytes | None]
# Answers taken from their connections, each waiting for one fsync.
Waiting = list[tuple[Held, Output]]


class AckGate(Gate):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        wal: SequencedLog,
        intake: Intake,
        mode: Durability,
        fsync_interval: float,
        metrics: Metrics,
        committed_seq: int,
    ) -> None:
        self._loop = loop
        self._wal = wal
        self._intake = intake
        self._mode = mode
        self._fsync_interval = fsync_interval
        self._metrics = metrics
        self._held: list[Held] = []
        self._scheduled = False
        self._waiting: Waiting = []  # written, waiting for the next fsync (wal-fsync)
        self._syncing = False
        self._blocked: dict[Held, tuple[int, list[Output]]] = {}
        """Connections whose responses wait for the commit of a seq (after a failed fsync),
        with every later output of theirs queued behind, in order; each output taken from a
        connection goes back to it through exactly one release()."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-fsync")
        self._timer: asyncio.TimerHandle | None = None
        self._probe: asyncio.TimerHandle | None = None
        self._probing = False  # pragma: no mutate
        self._refused = 0
        # What the metrics counted as accepted up to the last commit: the difference at a
        # failed write is what that write's 202s had counted.
        self._singles_mark = 0
        self._batches_mark = 0
        self.committed_seq = committed_seq
        """The highest seq the database has applied for this node."""
        self.failure = ""  # pragma: no mutate
        """WRITE_FAILED or FSYNC_FAILED while the WAL is failing, else empty: readyz reports it."""
        self.failure_detail = ""
        self.failed_since = 0.0

    def start(self) -> None:
        if self._mode == "wal":
            self._timer = self._loop.call_later(self._fsync_interval, self._periodic_sync)

    def hold(self, conn: Held) -> None:
        self._held.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._commit)

    def commit_now(self) -> None:
        """Run this tick's commit now. The flusher calls it before a cut, so every increment in
        the batch it cuts has been written, and every 202 still held is for an unwritten one."""
        if self._scheduled:
            self._commit()

    def log_now(self) -> bool:
        """Run this tick's commit now, for increments appended by an asynchronous handler (an
        idempotent batch, taken in after a database lookup), whose answer is emitted only later:
        False if the write failed and they were taken back. Its answer then leaves through a
        later commit, behind what this one wrote (and, in wal-fsync, its fsync)."""
        if self._commit():
            return True
        self._refused += 1
        return False

    def _commit(self) -> bool:
        self._scheduled = False
        held = self._held
        self._held = []
        if self._mode == "memory":
            # Nothing is written, but a tick still ends the time its increments were counted
            # at (time buckets): the next tick's first increment stamps the time anew.
            self._wal.frame_ms = 0
        else:
            try:
                written = self._wal.write()
            except OSError as exc:
                self._write_failed(exc, held)
                self._mark_accepted()
                return False
            self._mark_accepted()
            if written and self.failure == WRITE_FAILED:
                self._recovered("a write succeeded")
        if self._mode != "wal-fsync":
            for conn in held:
                conn.release_output()
            return True
        self._waiting.extend((conn, conn.take_output()) for conn in held)
        if not self._syncing:
            self._start_sync()
        return True

    def _write_failed(self, exc: OSError, held: list[Held]) -> None:
        entries, batch_keys = self._wal.discard_unwritten()
        self._intake.retract(entries, batch_keys)
        refused = 0
        for conn in held:
            out = conn.take_output()
            for index, chunk in enumerate(out):
                if chunk is not None and chunk.startswith(_ACCEPTED):
                    out[index] = _unlogged(conn.clock, chunk)
                    refused += 1
            if self._mode == "wal-fsync":
                self._waiting.append((conn, out))  # behind this connection's earlier responses
            else:
                conn.release(out)
        if self._waiting and not self._syncing:
            self._start_sync()
        metrics = self._metrics
        metrics.wal_failures["write"] += 1
        metrics.unaccept(
            metrics.accepted_requests - self._singles_mark,
            metrics.requests.get(_ACCEPTED_BATCHES, 0) - self._batches_mark,
            len(entries),
        )
        self._refused += refused
        self._fail(WRITE_FAILED, f"WAL write failed: {exc}", f"{refused} requests refused with 503")

    def _mark_accepted(self) -> None:
        metrics = self._metrics
        self._singles_mark = metrics.accepted_requests
        self._batches_mark = metrics.requests.get(_ACCEPTED_BATCHES, 0)

    def _start_sync(self) -> None:
        synced = self._waiting
        self._waiting = []
        self._syncing = True
        started = time.perf_counter()
        future = self._loop.run_in_executor(self._executor, self._wal.sync)
        future.add_done_callback(lambda f: self._synced(f, synced, started))

    def _synced(self, future: asyncio.Future[None], synced: Waiting, started: float) -> None:
        self._syncing = False
        self._metrics.fsync_seconds.observe(time.perf_counter() - started)
        exc = future.exception()
        if exc is None:
            if self.failure == FSYNC_FAILED:
                self._recovered("an fsync succeeded")
            self._release(synced)
        else:
            self._sync_failed(exc, synced)
        if self._waiting:
            self._start_sync()

    def _release(self, synced: Waiting) -> None:
        blocked = self._blocked
        for conn, out in synced:
            if blocked and conn in blocked:
                blocked[conn][1].append(out)  # order: behind its responses waiting for a commit
            else:
                conn.release(out)

    def _sync_failed(self, exc: BaseException, synced: Waiting) -> None:
        covered = self._wal.abandon_segment()
        # Ticks written while this fsync ran went to the abandoned segment too: they wait as well.
        waiting = synced + self._waiting
        self._waiting = []
        blocked = self._blocked
        for conn, out in waiting:
            if conn in blocked:
                seq, earlier = blocked[conn]
                blocked[conn] = (max(seq, covered), [*earlier, out])
            else:
                blocked[conn] = (covered, [out])
        self._metrics.wal_failures["fsync"] += 1
        self._fail(
            FSYNC_FAILED,
            f"WAL fsync failed: {exc}",
            f"segment abandoned; {len(waiting)} connections wait for the database commit of "
            f"seq {covered} instead",
        )
        self.committed(self.committed_seq)

    def committed(self, seq: int) -> None:
        """The database applied this node's batches up to seq: what waited for it may leave."""
        if seq > self.committed_seq:
            self.committed_seq = seq
        if not self._blocked:
            return
        for conn, (needed, outs) in list(self._blocked.items()):
            if needed <= self.committed_seq:
                del self._blocked[conn]
                for out in outs:
                    conn.release(out)

    def _periodic_sync(self) -> None:
        """Mode wal: the same fsync as wal-fsync's, with no responses waiting on it."""
        self._timer = self._loop.call_later(self._fsync_interval, self._periodic_sync)
        if not self._syncing and self._wal.synced_bytes < self._wal.written_bytes:
            self._start_sync()

    # failure and recovery

    def _fail(self, code: str, detail: str, consequence: str) -> None:
        if not self.failure:
            self.failed_since = time.monotonic()
            log.error("%s; %s; probing once a second until it succeeds", detail, consequence)
        self.failure = code
        self.failure_detail = detail
        if self._probe is None and not self._probing:
            self._probe = self._loop.call_later(PROBE_EVERY, self._start_probe)

    def _start_probe(self) -> None:
        self._probe = None
        if not self.failure:
            return
        self._probing = True
        future = self._loop.run_in_executor(self._executor, self._wal.probe)  # pragma: no mutate
        future.add_done_callback(self._probed)

    def _probed(self, future: asyncio.Future[None]) -> None:
        self._probing = False  # pragma: no mutate
        if future.exception() is None:
            if self.failure:
                self._recovered("a probe write succeeded")
        elif self.failure:
            self._probe = self._loop.call_later(PROBE_EVERY, self._start_probe)

    def _recovered(self, how: str) -> None:
        log.warning(
            "WAL healthy again (%s) after %.1f s of %s; %d requests were refused meanwhile",
            how,
            time.monotonic() - self.failed_since,
            self.failure,
            self._refused,
        )
        self.failure = ""  # pragma: no mutate
        self.failure_detail = ""
        self._refused = 0
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    async def close(self, deadline: float) -> bool:
        """Release what is held (final write + sync), stop the timers. False if the disk did not
        finish by deadline (monotonic) or failed: the WAL then keeps what it could write."""
        for timer in (self._timer, self._probe):
            if timer is not None:
                timer.cancel()
        self._timer = self._probe = None
        while self._scheduled or self._syncing or self._waiting or self._probing:
            if time.monotonic() >= deadline:
                self._executor.shutdown(wait=False)
                return False
            await asyncio.sleep(0.001)
        for conn, (_, outs) in self._blocked.items():
            for out in outs:
                conn.release(out)  # their connections are closed by now (drain): a no-op write
        self._blocked.clear()
        ok = True
        if self._mode != "memory":
            sync = self._loop.run_in_executor(self._executor, self._wal.sync)
            try:
                await asyncio.wait_for(sync, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                log.error("the final WAL fsync did not finish before the shutdown deadline")
                ok = False
            except OSError as exc:
                log.error("the final WAL fsync failed: %s", exc)
                ok = False
        self._executor.shutdown(wait=ok)
        return ok


def _unlogged(clock: responses.Clock, accepted: bytes) -> bytes:
    """The 503 that replaces a 202 whose increments could not be logged, keeping its
    Connection header (close, or keep-alive for HTTP/1.0)."""
    start = accepted.find(_CONNECTION)  # pragma: no mutate
    keep = b"" if start < 0 else accepted[start + 2 : accepted.index(b"\r\n", start + 2) + 2]
    return responses.error(
        clock,
        503,
        "wal_unavailable",
        "The write-ahead log could not be written, so nothing was recorded; retry shortly.",
        headers=_RETRY_AFTER + keep,
    )
