"""The lifecycle, in one place: lock, migrate, open, replay, bind, run, drain, final flush, close.

The same lifecycle runs in a process serving alone and in each worker of a `--workers` group
(process/supervisor.py starts those); a worker differs only in what its `member` adds: the port
is shared with SO_REUSEPORT, metrics and readiness are published for the group, the supervisor is
told once it listens, and a repeated signal does not cut its drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from incrementer import build
from incrementer.api.handler import App
from incrementer.api.increments import Increments
from incrementer.api.listing import Listing
from incrementer.api.pages import Pages
from incrementer.api.query import Periods
from incrementer.api.readiness import Peers, Readiness
from incrementer.api.reads import Reads
from incrementer.api.series import Series
from incrementer.auth.budgets import BudgetStore
from incrementer.auth.keyring import ClientLimiter, KeyRing, Sharing
from incrementer.auth.reconcile import Reconciler
from incrementer.auth.redis_budgets import RedisBudgets
from incrementer.auth.source import KeySource
from incrementer.config import EXIT_GRACE, Settings
from incrementer.delivery.durability import AckGate
from incrementer.delivery.flush import Flusher
from incrementer.delivery.keyed_batches import KeyedBatches
from incrementer.delivery.retention import BucketSweeper
from incrementer.http import HttpServer, Limits
from incrementer.http.server import cannot_listen
from incrementer.ingest.buffer import CoalescingBuffer
from incrementer.ingest.idempotency import Ledger
from incrementer.ingest.intake import Intake
from incrementer.ingest.replay import replay_frame
from incrementer.ingest.sequence import MemorySequence
from incrementer.ingest.validate import Validator
from incrementer.ingest.wal import WriteAheadLog
from incrementer.metrics import Metrics
from incrementer.node import retire
from incrementer.node.datadir import DataDir, claim_database
from incrementer.store import open_store
from incrementer.store.base import BackendError
from incrementer.store.migrate import migrate
from incrementer.urls import database_identity, redact_url

log = logging.getLogger("incrementer")


class GroupMember(Peers, Protocol):
    """A worker's place in its `--workers` group (process/member.py's Member): the service calls
    it at these points of its lifecycle, and readiness asks it about the other workers."""

    def join(self, metrics: Metrics, readiness: Readiness, stop: Callable[[], None]) -> None:
        """Publish this process's figures for the group; stop() drains this worker."""

    async def run(self) -> None:
        """Publish periodically until cancelled."""

    def ready(self) -> None:
        """Listening: tell the supervisor."""

    def leave(self) -> None:
        """The final publish, after the final flush."""

    def budgets(self) -> BudgetStore:
        """The group's shared rate-limit buckets (the supervisor holds them)."""

    @property
    def workers(self) -> int:
        """How many workers the group has."""


class Service:
    def __init__(self, settings: Settings, member: GroupMember | None = None) -> None:
        self.settings = settings
        self.member = member
        self.metrics = Metrics()
        self.data_dir = DataDir(settings.data_dir)
        self.store = open_store(settings.database_url, timeout=settings.database_timeout)
        self.buffer = CoalescingBuffer()
        granularities = settings.granularities
        self.finest = granularities[0] if granularities else 0
        """The finest kept time bucket in seconds; 0 with --buckets off."""
        # In a --workers group each worker allows its share of every client's new keys.
        workers = 1 if member is None else member.workers
        per_client = settings.idempotency_keys_per_client
        self.ledger = Ledger(
            settings.idempotency_window,
            per_client=per_client and max(1, per_client // workers),
        )
        self.wal: WriteAheadLog | MemorySequence | None = None
        self.flusher: Flusher | None = None
        self.server: HttpServer | None = None
        self.gate: AckGate | None = None
        self.key_source: KeySource | None = None
        self.reconciler: Reconciler | None = None
        self.url = ""
        self._flush_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self.clean = True
        """False when the stop left deltas unflushed (in the WAL) or the disk failed."""

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        self.data_dir.open()
        node_id = self.data_dir.node_id
        if s.migrate:
            applied = await asyncio.to_thread(migrate, s.database_url)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        await self.store.open()
        if self.member is None:
            await self._retire_worker_dirs()
        applied_seq = await self.store.applied_seq(node_id)
        identity = database_identity(s.database_url)
        await asyncio.to_thread(claim_database, self.data_dir, identity, applied_seq)
        wal = await self._open_wal(applied_seq)
        validator = Validator(s.max_key_bytes, s.allow_negative, s.max_batch_items, s.bucket_past)
        intake = Intake(
            self.buffer,
            wal,
            validator,
            s.max_pending_keys,
            self.metrics,
            self.ledger,
            self.finest,
            s.client_key_share,
        )
        self.gate = AckGate(
            loop, wal, intake, s.durability, s.fsync_interval, self.metrics, applied_seq
        )
        self.flusher = Flusher(
            self.buffer,
            wal,
            self.gate,
            self.store,
            intake,
            node_id,
            s.flush_interval,
            s.flush_interval_max,
            s.flush_max_keys,
            self.metrics,
            s.granularities,
            database_timeout=s.database_timeout,
        )
        keyring, limiter, self.key_source = await self._guards()
        keyed = KeyedBatches(intake, self.gate, self.store, self.flusher, self.metrics)
        readiness = Readiness(
            self.flusher,
            self.gate,
            s.lag_bound,
            self.metrics,
            keyring,
            self.member,
            self.reconciler,
        )
        worker = None if self.member is None else self.member.index
        kept = Periods(s.granularities, s.retention, s.max_series_points)
        read_parts = (validator, self.store, self.flusher, node_id, self.metrics, kept)
        app = App(
            intake,
            Increments(validator, intake, keyed, self.metrics),
            Reads(*read_parts, s.max_read_keys, worker),
            readiness,
            Pages(self.metrics),
            self.metrics,
            keyring,
            limiter,
            self.key_source,
            Series(*read_parts, s.max_read_keys, worker),
            Listing(*read_parts, s.max_read_keys, worker),
        )
        self._background.append(asyncio.create_task(self._sweep_idempotency_keys()))
        if s.granularities:
            sweeper = BucketSweeper(self.store, s.retention, self.metrics)
            self._background.append(asyncio.create_task(sweeper.run()))
        limits = Limits(
            s.max_body_bytes,
            s.max_header_bytes,
            s.max_connections,
            s.idle_timeout,
            s.request_timeout,
            s.connections_per_ip,
        )
        self.server = HttpServer(app, self.gate, limits)
        self.metrics.build_info = {"version": build.version(), "build": build.name()}
        self._register_gauges(readiness)
        if self.member is not None:
            self.member.join(self.metrics, readiness, self.request_stop)
            self._background.append(asyncio.create_task(self.member.run(), name="member"))
        self._flush_task = asyncio.create_task(self.flusher.run(), name="flusher")
        self.gate.start()
        reuse_port = self.member is not None
        try:
            host, port = await self.server.start(s.host, s.port, reuse_port=reuse_port)
        except OSError as exc:  # a name that does not resolve, an address not ours, a port taken
            raise OSError(cannot_listen(s.host, s.port, exc)) from exc
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        log.info(
            "listening on %s (node %s, durability %s, database %s, %s)",
            self.url,
            node_id,
            s.durability,
            redact_url(s.database_url),
            "hot path compiled" if build.compiled() else "pure Python",
        )
        if self.member is not None:
            self.member.ready()
        else:
            log.info("status page: %s/status", self.url)

    async def _retire_worker_dirs(self) -> None:
        """A process serving alone from a data dir a `--workers` group used: what the workers
        left in their WALs is applied (node/retire.py) before this node serves, so shrinking the
        group to one process strands nothing."""
        database = database_identity(self.settings.database_url)
        granularities = self.settings.granularities
        for node in await retire.retire(
            self.data_dir,
            self.store,
            0,
            include_top=False,
            database=database,
            granularities=granularities,
        ):
            if node.frames or not node.was_retired:
                log.info("retired %s", node.describe())

    async def _guards(self) -> tuple[KeyRing | None, ClientLimiter | None, KeySource | None]:
        s = self.settings
        if not s.auth_required:
            log.info("auth off: %s", "loopback bind" if s.loopback else "--insecure-no-auth")
            if s.rate_limit > 0:
                limiter = ClientLimiter(s.rate_limit, s.default_burst, await self._sharing())
                self._background.append(asyncio.create_task(self._prune(limiter)))
                return None, limiter, None
            return None, None, None
        keyring = KeyRing(s.rate_limit, s.default_burst, await self._sharing())
        source = KeySource(keyring, self.store, s.auth_refresh, s.auth_lookup_rate)
        if await source.load():
            log.info("auth required: %d active API keys", len(keyring.by_id))
        else:
            log.warning(
                "auth required but no API keys exist yet: requests get 401 until one is "
                "created with `incrementer keys create NAME` (it works on its first request)"
            )
        self._background.append(asyncio.create_task(source.refresh_forever()))
        return keyring, None, source

    async def _sharing(self) -> Sharing | None:
        """The rate limits' sharing with the other processes of the fleet (Redis) or the group
        (the supervisor), None for a process alone."""
        s = self.settings
        store: BudgetStore
        if s.rate_limit_store:
            store, member = RedisBudgets(s.rate_limit_store, s.rate_limit_sync * 20), ""
        elif self.member is not None:
            store, member = self.member.budgets(), f"worker-{self.member.index}"
        else:
            return None
        fail_open = s.rate_limit_store_down == "open"
        self.reconciler = await Reconciler.started(
            store, s.rate_limit_sync, fail_open, self.metrics, member
        )
        self._background.append(asyncio.create_task(self.reconciler.run(), name="limits"))
        return self.reconciler.sharing

    async def _prune(self, limiter: ClientLimiter) -> None:
        while True:
            await asyncio.sleep(60)
            limiter.prune(time.monotonic())

    async def _sweep_idempotency_keys(self) -> None:
        """Forget idempotency keys older than the window, here and in the database (every
        instance sweeps; a key swept twice is simply gone)."""
        window = self.settings.idempotency_window
        failing = False
        while True:
            await asyncio.sleep(min(SWEEP_EVERY, window / 4))
            self.ledger.expire(time.monotonic())
            try:
                swept = await self.store.sweep_idempotency_keys(window)
            except BackendError as exc:
                if not failing:
                    log.warning("cannot sweep expired idempotency keys, will retry: %s", exc)
                failing = True
                continue
            failing = False
            self.metrics.idempotency_keys_swept += swept

    async def _open_wal(self, applied_seq: int) -> WriteAheadLog | MemorySequence:
        wal: WriteAheadLog | MemorySequence
        if self.settings.durability == "memory":
            wal = MemorySequence()
        else:
            wal = await asyncio.to_thread(WriteAheadLog.open, self.data_dir.wal_path)
            frames = increments = 0
            finest = self.finest
            for frame in wal.replay_frames(applied_seq):
                frames += 1
                increments += len(frame.entries)
                for keyed in replay_frame(self.buffer, frame, finest):
                    self.ledger.hold(keyed.key, keyed.digest)
            if frames:
                log.info(
                    "replayed %d increments in %d WAL frames after seq %d",
                    increments,
                    frames,
                    applied_seq,
                )
        wal.advance_to(applied_seq)
        self.wal = wal
        return wal

    def _register_gauges(self, readiness: Readiness) -> None:
        flusher, metrics = self.flusher, self.metrics
        assert flusher is not None and self.server is not None
        server = self.server
        metrics.gauge(
            "incrementer_pending_keys",
            "Distinct keys not yet flushed.",
            lambda: flusher.pending_keys(),
        )
        metrics.gauge(
            "incrementer_oldest_pending_seconds",
            "Age of the oldest unflushed increment.",
            lambda: flusher.oldest_pending_age(time.monotonic()),
        )
        metrics.gauge(
            "incrementer_flush_interval_seconds",
            "The current flush interval (--flush-interval, stretched while flushes are slow).",
            lambda: flusher.interval,
        )
        metrics.gauge(
            "incrementer_ready",
            "1 when /readyz answers 200, 0 when it answers 503 (it says why); a group's verdict.",
            lambda: 1.0 if readiness.ready(time.monotonic()) else 0.0,
        )
        metrics.gauge(
            "incrementer_open_connections",
            "Open HTTP connections.",
            lambda: len(server.connections),
        )
        # Rates need the time between two scrapes by the server's clock: a browser tab in the
        # background, or throttled, runs its timers late, and its own clock would say so.
        metrics.gauge(
            "incrementer_clock_seconds",
            "This host's monotonic clock when the scrape was taken, in seconds from an arbitrary "
            "start (the same for every process on the host): the time between two scrapes.",
            time.monotonic,
        )
        wal = self.wal
        if isinstance(wal, WriteAheadLog):
            metrics.gauge(
                "incrementer_wal_bytes", "Bytes in WAL segments on disk.", lambda: wal.bytes_on_disk
            )

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Drain: stop accepting, answer in-flight requests, final flush, close everything.

        --shutdown-timeout is one budget for all of it: past the deadline, what is not flushed
        stays in the WAL for replay at the next start, and `clean` says so.
        """
        s = self.settings
        started = time.monotonic()
        deadline = started + s.shutdown_timeout
        if self.server is not None:
            self.server.stop_accepting()
            forced = await self.server.drain(max(0.0, deadline - time.monotonic()))
            if forced:
                log.warning("closed %d connections that did not finish in time", forced)
        for task in self._background:
            task.cancel()
        if self._background:  # let them close what they hold (the rate-limit store's client)
            await asyncio.wait(self._background, timeout=1.0)
        if self.gate is not None and not await self.gate.close(deadline):
            self.clean = False
        if self.flusher is not None and self._flush_task is not None:
            self.flusher.stop(deadline)
            if not await _finish(self._flush_task, deadline):
                log.error(
                    "shutdown deadline (%g s) passed during the final flush: %s",
                    s.shutdown_timeout,
                    self.flusher.db_error or "the database did not answer",
                )
            self._report_unflushed()
        if self.wal is not None:
            await _bounded(asyncio.to_thread(self.wal.close), deadline, "closing the WAL")
        await self.store.close(max(0.0, deadline - time.monotonic()))
        self.data_dir.close()
        if self.member is not None:
            self.member.leave()
        if not self.url:
            return  # start-up failed; the caller reports why
        log.info(
            "stopped after draining for %.2f s: %d increments accepted, %d flushes",
            time.monotonic() - started,
            self.metrics.accepted_increments,
            self.metrics.flushes,
        )

    def _report_unflushed(self) -> None:
        assert self.flusher is not None and self.gate is not None
        left = self.flusher.pending_keys()
        if not left:
            return
        self.clean = False
        if self.settings.durability == "memory":
            log.error(
                "final flush failed: %d keys not persisted and LOST (durability memory)", left
            )
            return
        log.error(
            "final flush failed: %d keys not persisted; their increments stay in the WAL "
            "(%s, frames after seq %d) and are replayed at the next start, nothing is lost",
            left,
            self.data_dir.wal_path,
            self.gate.committed_seq,
        )

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then drain; the process exits by the shutdown deadline even
        if something hangs (a frozen disk, a database that accepts and never answers)."""
        # A worker gets the supervisor's SIGTERM and often the same signal from a terminal or a
        # service manager too: only its supervisor may cut a worker's drain short (SIGKILL).
        with capture_signals(self.request_stop, repeat_forces_exit=self.member is None):
            try:
                await self.start()
                await self.wait()
            finally:
                _exit_after(self.settings.shutdown_timeout + EXIT_GRACE)
                await self.stop()


# How often expired idempotency keys are swept, at most (a quarter of the window when shorter).
SWEEP_EVERY = 60.0


async def _finish(task: asyncio.Task[None], deadline: float) -> bool:
    """Wait for task until deadline; then cancel it (its state stays consistent: the flusher
    keeps its batch) and give it a moment to unwind. False if the deadline passed."""
    done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
    if done:
        return True
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    return False


async def _bounded(work: Awaitable[None], deadline: float, what: str) -> None:
    try:
        await asyncio.wait_for(work, max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        log.error("%s did not finish before the shutdown deadline", what)
    except OSError as exc:
        log.error("%s failed: %s", what, exc)


def _exit_after(seconds: float) -> None:
    """The hard ceiling of a shutdown: a daemon thread that ends the process."""

    def expire() -> None:
        log.error("shutdown still not finished %.0f s after it began; exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


@contextlib.contextmanager
def capture_signals(on_first: object, repeat_forces_exit: bool = True) -> Iterator[None]:
    """First SIGINT/SIGTERM drains gracefully; a second one exits at once (if
    repeat_forces_exit; else it is only logged)."""
    loop = asyncio.get_running_loop()
    received = 0
    assert callable(on_first)

    def handler(signum: int) -> None:
        nonlocal received
        received += 1
        if received == 1:
            log.info(
                "received %s, draining (send again to force exit)", signal.Signals(signum).name
            )
            on_first()
        elif repeat_forces_exit:
            log.warning("received %s again, exiting now", signal.Signals(signum).name)
            os._exit(1)
        else:
            log.info("received %s again, still draining", signal.Signals(signum).name)

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
