"""`serve --workers N`: one supervisor and N worker processes answering on one host and port.

The supervisor owns processes and knows nothing about requests (gunicorn's arbiter is the model).
In order: lock the data dir, reserve the port, migrate once, drain what a larger group or a lone
process left in the data dirs no worker of this group will use (node/retire.py), start N workers, then
loop: reap a worker that exits, restart it (at once the first time, with a growing delay while
it keeps dying soon after its start), kill one whose event loop has been stuck for
--worker-timeout (the watchdog; it is then restarted like any dead worker), and on SIGTERM or
SIGINT send every worker SIGTERM and wait for their drains. A second signal kills the workers
(their WALs keep what they accepted). Beside the loop, a thread holds the group's shared
rate-limit buckets (budget_channel.py), unless they are in Redis.

Each worker is a fresh interpreter (`python -m incrementer.process.worker`, no state inherited from this
process) running the Service a lone process runs, on its own data dir `<data-dir>/worker-<i>`,
so its own node id, lock and WAL: the exactly-once ledger needs nothing new, and a restarted
worker replays its WAL before it listens. Workers die with the supervisor (worker.py). The
workers share the port with SO_REUSEPORT (sharedport.py says why, as measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from incrementer.config import EXIT_GRACE, Settings
from incrementer.node import retire
from incrementer.node.datadir import DataDir
from incrementer.process import rundir, sharedport
from incrementer.process.budget_channel import BudgetServer
from incrementer.process.metrics_files import Publisher
from incrementer.process.slots import WorkerSlot, how
from incrementer.store import open_store
from incrementer.store.migrate import migrate
from incrementer.urls import database_identity, redact_url

log = logging.getLogger("incrementer.supervisor")

KILL_GRACE = 2.0  # past a worker's own shutdown ceiling, it is killed
WATCH_EVERY = 1.0  # how often the watchdog reads the workers' heartbeats


class CannotStart(Exception):
    """The group cannot start: the port is taken, or a worker failed to start (its own log line
    says why)."""


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = DataDir(settings.data_dir)
        self.run_dir = settings.data_dir / "run"
        self.workers = [WorkerSlot(i) for i in range(settings.workers)]
        self.restarts = 0
        self.url = ""
        self._reserved: list[socket.socket] = []
        self._signals: list[int] = []
        self._selector = selectors.DefaultSelector()
        self._wakeup_r = self._wakeup_w = -1
        self._metrics: Publisher | None = None
        self._budgets: BudgetServer | None = None
        self._all_ready_once = False
        self._stopping = False

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status: 0 when every worker drained cleanly,
        1 when one did not (its WAL keeps the rest). Raises CannotStart (or the DataDirError,
        BackendError... of the drain at start) when the group cannot start; no worker is left."""
        self.data_dir.lock()
        try:
            with self._capture_signals():
                try:
                    self._prepare()
                    self._spawn_all()
                    return self._loop()
                except BaseException:
                    if any(w.proc is not None for w in self.workers):
                        self._stop_workers(force=True)
                    raise
        finally:
            for sock in self._reserved:
                sock.close()
            if self._metrics is not None:
                self._metrics.close()
            self.data_dir.close()

    # start

    def _prepare(self) -> None:
        s = self.settings
        try:  # first: a port in use is found before the database is touched
            self._reserved, port = sharedport.reserve(s.host, s.port)
        except sharedport.PortTaken as exc:
            raise CannotStart(str(exc)) from None
        asyncio.run(self._migrate_and_retire())
        shown = f"[{s.host}]" if ":" in s.host else s.host
        self.url = f"http://{shown}:{port}"
        self.settings = replace(s, port=port)
        rundir.reset(self.run_dir)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SupervisorCollector(self))
        self._metrics = Publisher(registry, rundir.metrics_dir(self.run_dir), "supervisor", {})
        self._metrics.publish()
        if not s.rate_limit_store:
            self._budgets = BudgetServer()
            self._budgets.start()

    async def _migrate_and_retire(self) -> None:
        """Once for the group, before any worker starts: migrations (so N workers do not queue
        on yoyo's lock), and the drain of every node dir this group will not serve from."""
        s = self.settings
        if s.migrate:
            applied = await asyncio.to_thread(migrate, s.database_url)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        store = open_store(s.database_url)
        await store.open()
        try:
            database = database_identity(s.database_url)
            for node in await retire.retire(
                self.data_dir,
                store,
                keep_workers=s.workers,
                database=database,
                granularities=s.granularities,
            ):
                if node.frames or (node.node_id and not node.was_retired):
                    log.info("retired %s", node.describe())
        finally:
            await store.close()

    def _spawn_all(self) -> None:
        log.info(
            "starting %d workers on %s (database %s)",
            len(self.workers),
            self.url,
            redact_url(self.settings.database_url),
        )
        for worker in self.workers:
            self._spawn(worker)

    def _spawn(self, worker: WorkerSlot) -> None:
        worker.generation += 1
        worker.restart_at = None
        worker.ready = False
        worker.killed_stuck = False
        notify_r, notify_w = os.pipe()
        budgets = self._budgets.connect() if self._budgets is not None else None
        budget_fd = budgets.fileno() if budgets is not None else -1
        settings = replace(
            self.settings,
            data_dir=retire.worker_dir(self.settings.data_dir, worker.index),
            migrate=False,
            workers=1,
        )
        spec = {
            "index": worker.index,
            "ident": worker.ident,
            "supervisor": os.getpid(),
            "run_dir": str(self.run_dir),
            "notify_fd": notify_w,
            "budget_fd": budget_fd,
            "workers": len(self.workers),
            "settings": {
                f.name: str(v) if isinstance(v := getattr(settings, f.name), Path) else v
                for f in fields(settings)
            },
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "incrementer.process.worker"],
                stdin=subprocess.PIPE,
                pass_fds=(notify_w,) if budgets is None else (notify_w, budget_fd),
            )
        finally:
            os.close(notify_w)
            if budgets is not None:
                budgets.close()
        assert proc.stdin is not None
        with proc.stdin:
            proc.stdin.write(json.dumps(spec).encode())
        worker.proc, worker.notify, worker.started = proc, notify_r, time.monotonic()
        self._selector.register(notify_r, selectors.EVENT_READ, worker)

    # run

    def _loop(self) -> int:
        while True:
            due = self._next_restart_in()
            self._wait(WATCH_EVERY if due is None else min(due, WATCH_EVERY))
            for signum in self._take_signals():
                if signum == signal.SIGCHLD:
                    continue
                log.info(
                    "received %s, draining %d workers (send again to force exit)",
                    signal.Signals(signum).name,
                    len(self.workers),
                )
                return self._stop_workers(force=False)
            self._reap()
            self._watch()
            now = time.monotonic()
            for worker in self.workers:
                if worker.restart_at is not None and worker.restart_at <= now:
                    self._spawn(worker)

    def _watch(self) -> None:
        """Kill a serving worker whose event loop has not published for --worker-timeout (it
        takes its share of new connections and answers none); the reaper restarts it, and the
        new worker replays its WAL, so nothing it acknowledged is lost."""
        limit = self.settings.worker_timeout
        now = time.time()
        for worker in self.workers:
            proc = worker.proc
            if proc is None or not worker.ready or worker.killed_stuck:
                continue
            beat = max(rundir.heartbeat(self.run_dir, worker.index) or 0.0, worker.ready_at)
            if now - beat <= limit:
                continue
            log.error(
                "worker %d (pid %d) has not answered for %.0f s (--worker-timeout %g): killing it",
                worker.index,
                proc.pid,
                now - beat,
                limit,
            )
            worker.killed_stuck = True
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _wait(self, timeout: float | None) -> None:
        """Until a signal (the wakeup fd), a worker's word, or the timeout."""
        for key, _ in self._selector.select(timeout):
            if key.fd == self._wakeup_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wakeup_r, 4096)
            else:
                self._on_notify(key.data)

    def _next_restart_in(self) -> float | None:
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _on_notify(self, worker: WorkerSlot) -> None:
        try:
            data = os.read(worker.notify, 64)
        except OSError:
            data = b""
        if data.startswith(b"ready") and not self._stopping:
            worker.ready = True
            worker.ready_at = time.time()
            if self._all_ready_once and worker.proc is not None:
                log.info("worker %d serving again (pid %d)", worker.index, worker.proc.pid)
            elif all(w.ready for w in self.workers):
                self._all_ready_once = True
                log.info(
                    "listening on %s with %d workers (pids %s)",
                    self.url,
                    len(self.workers),
                    ", ".join(str(w.proc.pid) for w in self.workers if w.proc is not None),
                )
                log.info("status page: %s/status", self.url)
            self._publish()
        self._close_notify(worker)

    def _close_notify(self, worker: WorkerSlot) -> None:
        if worker.notify >= 0:
            self._selector.unregister(worker.notify)
            os.close(worker.notify)
            worker.notify = -1

    def _reap(self) -> None:
        for worker in self.workers:
            proc = worker.proc
            if proc is None or proc.poll() is None:
                continue
            self._exited(worker, proc)

    def _exited(self, worker: WorkerSlot, proc: subprocess.Popen[bytes]) -> None:
        """A worker died while the group serves: restart it (a restarted worker replays its
        WAL before it listens), at once unless it keeps dying soon after its start."""
        self._close_notify(worker)
        rundir.forget(self.run_dir, worker.ident, worker.index)
        worker.proc = None
        code = proc.returncode
        lived = time.monotonic() - worker.started
        if not self._all_ready_once and (not worker.ready or code == 2):
            raise CannotStart(f"worker {worker.index} exited with status {code} while starting")
        delay = worker.restart_delay(lived)
        worker.restart_at = time.monotonic() + delay
        self.restarts += 1
        log.warning(
            "worker %d (pid %d) %s after %.1f s; restarting it%s",
            worker.index,
            proc.pid,
            how(code),
            lived,
            f" in {delay:g} s (it keeps dying)" if delay else "",
        )
        self._publish()

    # stop

    def _stop_workers(self, force: bool) -> int:
        """SIGTERM every worker and wait for their drains (each within its own
        --shutdown-timeout, plus the grace after which it exits regardless); kill what is left
        after that, or at once on another SIGTERM/SIGINT. force: SIGKILL from the start.
        Returns 0 if every worker drained cleanly."""
        self._stopping = True
        for worker in self.workers:
            worker.restart_at = None
            if worker.proc is not None and worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGKILL if force else signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + EXIT_GRACE + KILL_GRACE
        status = 0
        while live := [w for w in self.workers if w.proc is not None]:
            for worker in live:
                proc = worker.proc
                assert proc is not None
                code = proc.poll()
                if code is None:
                    continue
                if code != 0:
                    status = 1
                    if not force:
                        log.error("worker %d (pid %d) %s", worker.index, proc.pid, how(code))
                self._close_notify(worker)
                rundir.forget(self.run_dir, worker.ident, worker.index)
                worker.proc = None
            again = [sig for sig in self._take_signals() if sig != signal.SIGCHLD]
            late = time.monotonic() > deadline
            if (again or late) and not force:
                if again:
                    name = signal.Signals(again[0]).name
                    log.warning("received %s again, killing the workers", name)
                else:
                    log.error("workers still running past the shutdown deadline; killing them")
                force, status = True, 1
                for worker in self.workers:
                    if worker.proc is not None:
                        with contextlib.suppress(ProcessLookupError):
                            worker.proc.kill()
            self._wait(0.1)  # woken early by SIGCHLD
        log.info(
            "stopped %d workers (%d restarts)%s",
            len(self.workers),
            self.restarts,
            "" if status == 0 else "; not every worker drained cleanly",
        )
        return status

    # signals and metrics

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        """Handlers only record the signal; the loop wakes on the wakeup fd and acts."""
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ)
        previous_fd = signal.set_wakeup_fd(self._wakeup_w)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_fd)
            self._selector.close()
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _take_signals(self) -> list[int]:
        taken, self._signals = self._signals, []
        return taken

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.publish()


class _SupervisorCollector:
    """The supervisor's own figures, published into the group's metrics."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        s = self.supervisor
        yield GaugeMetricFamily(
            "incrementer_workers",
            "Worker processes serving (--workers), as counted by the supervisor.",
            value=sum(1 for w in s.workers if w.proc is not None and w.ready),
        )
        yield CounterMetricFamily(
            "incrementer_worker_restarts",
            "Workers the supervisor restarted after they died.",
            value=s.restarts,
        )
