"""The lifecycle, in one place: lock, migrate, open, replay, bind, run, drain, final flush, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator

from incrementer import build
from incrementer.app import App
from incrementer.auth import ClientLimiter, KeyRing
from incrementer.config import Settings
from incrementer.datadir import DataDir
from incrementer.durability import AckGate
from incrementer.flush import Flusher
from incrementer.http.server import HttpServer
from incrementer.ingest.buffer import CoalescingBuffer
from incrementer.ingest.intake import Intake
from incrementer.ingest.sequence import MemorySequence
from incrementer.ingest.validate import Validator
from incrementer.ingest.wal import WriteAheadLog
from incrementer.metrics import Metrics
from incrementer.store import open_store, redact_url
from incrementer.store.base import BackendError
from incrementer.store.migrate import migrate

log = logging.getLogger("incrementer")


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.data_dir = DataDir(settings.data_dir)
        self.store = open_store(settings.database_url)
        self.buffer = CoalescingBuffer()
        self.wal: WriteAheadLog | MemorySequence | None = None
        self.flusher: Flusher | None = None
        self.server: HttpServer | None = None
        self.gate: AckGate | None = None
        self.url = ""
        self._flush_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

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
        wal = await self._open_wal(node_id)
        validator = Validator(s.max_key_bytes, s.allow_negative, s.max_batch_items)
        intake = Intake(self.buffer, wal, validator, s.max_pending_keys, self.metrics)
        self.flusher = Flusher(
            self.buffer,
            wal,
            self.store,
            intake,
            node_id,
            s.flush_interval,
            s.flush_interval_max,
            s.flush_max_keys,
            self.metrics,
        )
        self.gate = AckGate(loop, wal, s.durability, s.fsync_interval, self.metrics)
        keyring, limiter = await self._guards()
        app = App(
            validator,
            intake,
            self.flusher,
            self.store,
            self.gate,
            self.metrics,
            node_id,
            s.lag_bound,
            keyring,
            limiter,
        )
        self.server = HttpServer(app, self.gate, s, self.metrics)
        self._register_gauges()
        self._flush_task = asyncio.create_task(self.flusher.run(), name="flusher")
        self.gate.start()
        host, port = await self.server.start(s.host, s.port)
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

    async def _guards(self) -> tuple[KeyRing | None, ClientLimiter | None]:
        s = self.settings
        if not s.auth_required:
            log.info("auth off: %s", "loopback bind" if s.loopback else "--insecure-no-auth")
            if s.rate_limit > 0:
                limiter = ClientLimiter(s.rate_limit, s.default_burst)
                self._background.append(asyncio.create_task(self._prune(limiter)))
                return None, limiter
            return None, None
        keyring = KeyRing(s.rate_limit, s.default_burst)
        keys = await self.store.api_keys()
        keyring.load(keys, time.monotonic())
        if keys:
            log.info("auth required: %d active API keys", len(keys))
        else:
            log.warning(
                "auth required but no API keys exist: every request will get 401; "
                "create one with `incrementer keys create NAME`"
            )
        self._background.append(asyncio.create_task(self._refresh_keys(keyring)))
        return keyring, None

    async def _refresh_keys(self, keyring: KeyRing) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.settings.auth_refresh)
            try:
                keys = await self.store.api_keys()
            except BackendError as exc:
                if not failing:
                    log.warning("cannot reload API keys, keeping the current set: %s", exc)
                failing = True
                continue
            failing = False
            keyring.load(keys, time.monotonic())

    async def _prune(self, limiter: ClientLimiter) -> None:
        while True:
            await asyncio.sleep(60)
            limiter.prune(time.monotonic())

    async def _open_wal(self, node_id: str) -> WriteAheadLog | MemorySequence:
        applied_seq = await self.store.applied_seq(node_id)
        wal: WriteAheadLog | MemorySequence
        if self.settings.durability == "memory":
            wal = MemorySequence()
        else:
            wal = await asyncio.to_thread(WriteAheadLog.open, self.data_dir.wal_path)
            frames = increments = 0
            for _seq, entries in wal.replay(applied_seq):
                frames += 1
                for key, value in entries:
                    self.buffer.add(key, value)
                increments += len(entries)
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

    def _register_gauges(self) -> None:
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
            "incrementer_open_connections",
            "Open HTTP connections.",
            lambda: len(server.connections),
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
        """Drain: stop accepting, answer in-flight requests, final flush, close everything."""
        s = self.settings
        started = time.monotonic()
        if self.server is not None:
            self.server.stop_accepting()
            forced = await self.server.drain(s.shutdown_timeout)
            if forced:
                log.warning("closed %d connections that did not finish in time", forced)
        for task in self._background:
            task.cancel()
        if self.gate is not None:
            await self.gate.close()
        if self.flusher is not None and self._flush_task is not None:
            self.flusher.stop(deadline=time.monotonic() + s.shutdown_timeout)
            await self._flush_task
            left = self.flusher.pending_keys()
            if left:
                where = "kept in the WAL for the next start" if s.durability != "memory" else "LOST"
                log.error("final flush failed: %d keys not persisted, %s", left, where)
        if self.wal is not None:
            await asyncio.to_thread(self.wal.close)
        await self.store.close()
        self.data_dir.close()
        if not self.url:
            return  # start-up failed; the caller reports why
        log.info(
            "stopped after draining for %.2f s: %d increments accepted, %d flushes",
            time.monotonic() - started,
            self.metrics.accepted_increments,
            self.metrics.flushes,
        )

    async def serve(self) -> None:
        with capture_signals(self.request_stop):
            try:
                await self.start()
                await self.wait()
            finally:
                await self.stop()


@contextlib.contextmanager
def capture_signals(on_first: object) -> Iterator[None]:
    """First SIGINT/SIGTERM drains gracefully; a second one exits at once."""
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
        else:
            log.warning("received %s again, exiting now", signal.Signals(signum).name)
            os._exit(1)

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
