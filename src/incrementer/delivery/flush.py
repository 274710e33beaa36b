"""The flush loop: cut the buffer at a WAL seq, apply the batch exactly once, retry until it lands.

One batch is in flight at a time; increments arriving meanwhile keep coalescing in the buffer. A
failed batch is retried unchanged (same seq, same deltas), so a commit whose acknowledgement was lost
is recognised by the store and skipped rather than applied twice. The idempotent batches it carries
are settled in the same transaction (store/base.py); the commit tells the ledger which keys the
database now holds.

A watchdog bounds how long a flush in flight may go unanswered before anyone hears of it: after
--database-timeout it says so (log, /readyz `database_unresponsive`) while the flush goes on
waiting for the connection's own limits (store/pglink.py) to end it. Between retries the backoff
stays short, so the first retry after a network heals lands within about a second.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from incrementer import faults
from incrementer.delivery.durability import AckGate
from incrementer.ingest.buffer import Batch, CoalescingBuffer
from incrementer.ingest.intake import Intake
from incrementer.ingest.sequence import SequencedLog
from incrementer.metrics import Metrics
from incrementer.store.base import (
    INT64_MAX,
    INT64_MIN,
    ApplyResult,
    BackendError,
    Store,
    Window,
    unscoped,
)
from incrementer.store.buckets import Buckets

log = logging.getLogger("incrementer.flush")

POLL = 0.01  # how often triggers are checked: cheap, and bounds the reaction time to 10 ms
# The interval after a flush is at least this many times as long as that flush took (within
# --flush-interval .. --flush-interval-max): the database spends at most about a sixteenth of the
# time in flushes, and one that needs longer per flush gets fewer, bigger ones, in which more
# increments coalesce into each row it writes. Hot keys flush in a few milliseconds and keep
# --flush-interval. At 45,000 requests/s over 3,162 keys, PostgreSQL on the same two cores, 4
# here meant ten flushes a second of 2,400 rows, 12 ms apiece, and a p99 of 2-3 ms; 16 means
# about four of 3,000 rows, half the rows written, and a p99 under 0.8 ms, for a persistence lag
# of ~0.5 s (docs/performance.md, "The flush interval, stretched further").
STRETCH = 16.0
PING_EVERY = 1.0  # when idle, how often the database is pinged so readyz stays truthful
# A retry is one connection attempt: cheap for the database, and a longer pause would be added
# whole to the time the service takes to notice a healed network.
MAX_BACKOFF = 0.25
UNAVAILABLE = "database_unavailable"
UNRESPONSIVE = "database_unresponsive"
OVERFLOW_REPORT_LIMIT = 100


class Flusher:
    def __init__(
        self,
        buffer: CoalescingBuffer,
        wal: SequencedLog,
        gate: AckGate,
        store: Store,
        intake: Intake,
        node_id: str,
        flush_interval: float,
        flush_interval_max: float,
        flush_max_keys: int,
        metrics: Metrics,
        granularities: tuple[int, ...] = (),
        database_timeout: float = 3.0,
    ) -> None:
        self.buffer = buffer
        self.granularities = granularities
        """The kept bucket lengths (--buckets), ascending; () with time buckets off."""
        self.wal = wal
        self.gate = gate
        self.store = store
        self.intake = intake
        self.node_id = node_id
        self.flush_interval = flush_interval
        self.flush_interval_max = max(flush_interval, flush_interval_max)
        self.interval = flush_interval
        """The current interval: flush_interval, stretched while flushes are slow."""
        self.flush_max_keys = flush_max_keys
        self.metrics = metrics
        self.database_timeout = database_timeout
        """How long a flush or ping may go unanswered before the database counts as failing."""
        self.inflight: Batch | None = None
        self.commits = 0
        self.db_error: str | None = None
        """Why the last flush or ping failed, while the database is failing."""
        self.db_code = UNAVAILABLE
        """/readyz's code while db_error is set: UNRESPONSIVE while a flush waits unanswered."""
        self.db_failing_since = 0.0
        self.overflowed: dict[str, int] = {}
        self._stopping = False
        self._deadline = float("inf")
        self._last_contact = time.monotonic()

    # state read by the HTTP side

    def project(self, key: str, applied_seq: int, value: int) -> tuple[int, int, bool]:
        """(value, overflow, pending) of key once this node's unflushed deltas land, given the
        persisted value from a snapshot that saw applied_seq. Each pending delta is added or
        set aside for overflow by the rule the stores apply at flush (the in-flight batch first,
        then the buffer), so a read tells the same truth before and after the flush."""
        overflow = 0
        pending = False
        inflight = self.inflight
        parts = [inflight.deltas] if inflight is not None and inflight.seq > applied_seq else []
        parts.append(self.buffer.deltas)
        for deltas in parts:
            delta = deltas.get(key)
            if delta is None:
                continue
            pending = True
            if INT64_MIN <= delta <= INT64_MAX and INT64_MIN <= value + delta <= INT64_MAX:
                value += delta
            else:
                overflow += delta
        return value, overflow, pending

    def project_buckets(
        self, key: str, window: Window, applied_seq: int, value: int
    ) -> dict[int, int]:
        """start -> this node's unflushed delta of key in each bucket of the window that has
        one, given a snapshot that saw applied_seq and the key's persisted value: what the
        flush will add to those buckets. A part (the batch in flight, then the buffer) whose
        total delta for the key the flush would set aside for overflow adds to no bucket, as in
        the stores."""
        found: dict[int, int] = {}
        length = window.length
        inflight = self.inflight
        parts = [inflight] if inflight is not None and inflight.seq > applied_seq else []
        for deltas, buckets in [(p.deltas, p.buckets) for p in parts] + [
            (self.buffer.deltas, self.buffer.buckets)
        ]:
            delta = deltas.get(key)
            if delta is None:
                continue
            if not (INT64_MIN <= delta <= INT64_MAX and INT64_MIN <= value + delta <= INT64_MAX):
                continue
            value += delta
            for finest, per_key in buckets.items():
                counted = per_key.get(key)
                start = finest - finest % length
                if counted and window.start <= start < window.end:
                    found[start] = found.get(start, 0) + counted
        return found

    def oldest_pending_age(self, now: float) -> float:
        oldest = self.inflight.oldest if self.inflight is not None else now
        if self.buffer.deltas:
            oldest = min(oldest, self.buffer.oldest)
        return now - oldest

    def pending_keys(self) -> int:
        return len(self.buffer) + (len(self.inflight.deltas) if self.inflight else 0)

    # the loop

    async def run(self) -> None:
        while True:
            if self.inflight is not None:
                if not await self._apply(self.inflight):
                    return  # shutdown deadline passed with the database still failing
                continue
            buffer = self.buffer
            if buffer.deltas and (
                self._stopping
                or len(buffer) >= self.flush_max_keys
                or time.monotonic() - buffer.oldest >= self.interval
            ):
                self._cut()
                continue
            if self._stopping:
                return
            if time.monotonic() - self._last_contact >= PING_EVERY:
                await self._ping()
            await asyncio.sleep(POLL)

    def _cut(self) -> None:
        # Write this tick's frame first (and answer its requests): the batch then holds only
        # logged increments, and a write that fails takes its increments back out of the buffer.
        self.gate.commit_now()
        if not self.buffer.deltas:
            return
        seq = self.wal.seal()
        self.inflight = self.buffer.swap(seq)
        self.intake.key_budget = (
            self.intake.max_pending_keys - len(self.inflight.deltas) - self.inflight.held
        )

    async def _apply(self, batch: Batch) -> bool:
        backoff = 0.05
        failures = 0
        while True:
            started = time.monotonic()
            try:
                result = await self._watched(batch)
            except BackendError as exc:
                failures += 1
                self._failed(str(exc), failures)
            except Exception as exc:  # a bug of ours: keep the batch, say so loudly, keep serving
                failures += 1
                log.exception("internal error applying batch seq=%d", batch.seq)
                self._failed(f"internal error: {exc!r}", failures)
            else:
                self._committed(batch, result.applied, result.overflowed, started)
                if batch.keyed:
                    self._settled(batch, result)
                return True
            if time.monotonic() + backoff > self._deadline:
                return False
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _watched(self, batch: Batch) -> ApplyResult:
        """apply_batch, saying so once it has gone --database-timeout without an answer."""
        buckets = Buckets(self.granularities, batch.buckets) if batch.buckets else None
        flush = asyncio.ensure_future(
            self.store.apply_batch(self.node_id, batch.seq, batch.deltas, batch.keyed, buckets)
        )
        try:
            done, _ = await asyncio.wait((flush,), timeout=self.database_timeout)
            if not done and self.db_error is None:
                reason = (
                    f"no answer to the flush of batch seq={batch.seq} within "
                    f"{self.database_timeout:g} s (--database-timeout); still waiting"
                )
                log.warning("database unresponsive: %s", reason)
                self._database_failed(reason, UNRESPONSIVE)
            return await flush
        except asyncio.CancelledError:
            # Cancelled as it would have been without the watchdog: the store's cleanup closes
            # the connection before this returns; the batch stays in flight for the next start.
            flush.cancel()
            await asyncio.wait((flush,))
            raise

    def _failed(self, reason: str, failures: int) -> None:
        self.metrics.flush_failures += 1
        self._database_failed(reason)
        # First failure and then every 20th: an outage is visible without flooding the log.
        if failures == 1 or failures % 20 == 0:
            log.warning("flush failed (attempt %d), retrying with backoff: %s", failures, reason)

    def _committed(
        self, batch: Batch, applied: bool, overflowed: dict[str, int], started: float
    ) -> None:
        now = time.monotonic()
        if self.db_error is not None:
            log.info("database reachable again, flushing resumed")
        self.db_error = None
        self._last_contact = now
        self.inflight = None
        self.commits += 1
        self.gate.committed(batch.seq)
        self.intake.key_budget = self.intake.max_pending_keys - self.buffer.held
        metrics = self.metrics
        if applied:
            self.interval = stretched(self.flush_interval, self.flush_interval_max, now - started)
            metrics.flushes += 1
            metrics.flushed_keys += len(batch.deltas) - len(overflowed)
            metrics.flush_seconds.observe(now - started)
            metrics.flush_keys.observe(len(batch.deltas))
            metrics.lag_seconds.observe(now - batch.oldest)
        else:
            metrics.skipped_batches += 1
            log.info("batch seq=%d was already applied; skipped (exactly-once)", batch.seq)
        if overflowed:
            metrics.overflowed_keys += len(overflowed)
            for key, delta in overflowed.items():
                log.error(
                    "counter %r would overflow 64 bits; delta %d kept in counter_overflows "
                    "(batch seq=%d), other keys unaffected",
                    key,
                    delta,
                    batch.seq,
                )
                if key in self.overflowed or len(self.overflowed) < OVERFLOW_REPORT_LIMIT:
                    self.overflowed[key] = self.overflowed.get(key, 0) + delta
        faults.after_commit(self.commits)
        try:
            self.wal.recycle(batch.seq)
        except OSError as exc:  # the segments stay; replay skips them and a later flush retries
            log.warning("could not recycle WAL segments up to seq %d: %s", batch.seq, exc)

    def _settled(self, batch: Batch, result: ApplyResult) -> None:
        """The database now holds every key of the batch's idempotent batches: with their digest,
        or (a duplicate) with the digest of the copy applied before, elsewhere or earlier."""
        ledger = self.intake.ledger
        if not result.applied:
            # Committed before, its answer lost: which digests that commit kept is unknown here,
            # so the next retry of these keys asks the database.
            for keyed in batch.keyed:
                ledger.forget(keyed.key)
            return
        duplicates = result.duplicates
        now = time.monotonic()
        counts = self.metrics.idempotent_settled
        for keyed in batch.keyed:
            stored = duplicates.get(keyed.key)
            if stored is None:
                counts["applied"] += 1
                ledger.settle(keyed.key, keyed.digest, now)
                continue
            ledger.settle(keyed.key, stored, now)
            if stored == keyed.digest:
                counts["duplicate"] += 1  # a retry that reached two instances before a flush
                continue
            counts["conflict"] += 1
            principal, key = unscoped(keyed.key)
            log.warning(
                "idempotency key %r was applied before with another body; this batch of %d "
                "keys (accepted while the first was unflushed elsewhere) was not applied "
                "(sent by %r)",
                key,
                len(keyed.deltas),
                principal,
            )

    async def _ping(self) -> None:
        self._last_contact = time.monotonic()
        try:
            await asyncio.wait_for(self.store.ping(), self.database_timeout)
        except TimeoutError:
            reason = f"no answer to a ping within {self.database_timeout:g} s (--database-timeout)"
            if self.db_error is None:
                log.warning("database unresponsive: %s", reason)
            self._database_failed(reason, UNRESPONSIVE)
        except BackendError as exc:
            if self.db_error is None:
                log.warning("database unreachable: %s", exc)
            self._database_failed(str(exc))
        except Exception as exc:
            log.exception("internal error pinging the database")
            self._database_failed(f"internal error: {exc!r}")
        else:
            if self.db_error is not None:
                log.info("database reachable again")
            self.db_error = None

    def _database_failed(self, reason: str, code: str = UNAVAILABLE) -> None:
        if self.db_error is None:
            self.db_failing_since = time.monotonic()
        self.db_error = reason
        self.db_code = code

    def stop(self, deadline: float) -> None:
        """Flush what is pending, then return from run(); give up retrying at deadline."""
        self._stopping = True
        self._deadline = deadline


def stretched(base: float, ceiling: float, took: float) -> float:
    """The interval before the next flush, given that the last one took `took` seconds."""
    return min(ceiling, max(base, STRETCH * took))
