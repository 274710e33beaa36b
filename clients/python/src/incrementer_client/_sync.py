"""Client: incr() from any thread returns at once; a background thread sends the batches."""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from time import monotonic
from types import TracebackType

import httpx

from incrementer_client._batching import (
    Batch,
    ClientStats,
    Delivery,
    Pending,
    Refused,
    WhenFull,
    at_seconds,
    check_options,
    failure,
    full,
    read_answer,
)
from incrementer_client._endpoint import http_options
from incrementer_client._reading import (
    Series,
    Time,
    many_answer,
    many_request,
    series_answer,
    series_request,
)

log = logging.getLogger("incrementer_client")
CLOSE_GRACE = 0.05  # seconds past the close deadline for the thread to drop what is left


class Client:
    """Counts for an incrementer server, sent in batches that each count exactly once.

    `incr(key, value)` adds to a local sum and returns at once, from any thread. A background
    thread sends what is pending to `POST /increments` every `flush_interval` seconds, or as soon
    as `max_batch` keys are pending, each batch under its own Idempotency-Key; a batch whose
    answer does not arrive (a timeout, a broken connection, 503, 429, any 5xx) is sent again,
    the same bytes under the same key, after a backoff (at least the server's Retry-After), so
    the server applies it once however many attempts reached it. A batch still failing after
    `retry_for` seconds is dropped and logged: keep that well inside the server's
    --idempotency-window (24 h by default), past which a retry would count again.

    Memory is bounded: past `max_pending` distinct keys (pending plus being sent), a new key
    makes incr() raise Full, or wait for room with `when_full="block"`. `flush()` waits until
    what was counted before it is acknowledged; `close()` (and leaving a `with` block) flushes,
    then stops the thread. A client that is never closed is closed at interpreter exit, waiting
    at most `close_at_exit` seconds.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        flush_interval: float = 0.1,
        max_batch: int = 1000,
        max_pending: int = 1_000_000,
        when_full: WhenFull = "raise",
        timeout: float | None = 10.0,
        retry_for: float = 3600.0,
        max_key_bytes: int = 256,
        allow_negative: bool = False,
        max_body_bytes: int = 1_000_000,
        close_at_exit: float | None = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        check_options(flush_interval, when_full)
        self._pending = Pending(
            max_pending, max_batch, max_body_bytes, max_key_bytes, allow_negative
        )
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._block = when_full == "block"
        self._delivery = Delivery(retry_for)
        # incr() takes the lock itself (a C-level context manager); waiting goes through cond.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._cut_wanted = False
        self._cuts = 0
        self._delivered = 0  # cuts whose batches are all answered for good
        self._in_flight = 0  # incr() calls cut and not yet answered for good
        self._closed = False
        self._stop_at = float("inf")
        self._stopping = threading.Event()  # set at the close deadline: backoffs end early
        self._finished = False  # the sending thread is done with the connections
        self._abandoned = False  # close() gave up waiting for the sending thread
        self._timeout = timeout
        self._http = httpx.Client(transport=transport, **http_options(url, api_key, timeout))
        self._thread = threading.Thread(target=self._run, name="incrementer-client", daemon=True)
        self._thread.start()
        self._exit_hook: Callable[[], None] | None = None
        if close_at_exit is not None:
            self._exit_hook = _close_at_exit(weakref.ref(self), close_at_exit)
            atexit.register(self._exit_hook)

    # the caller's side

    def incr(self, key: str, value: int = 1, at: Time | None = None) -> None:
        """Add value to the counter key. Returns at once; never waits on the network (only, with
        when_full="block", for room). `at`: when it happened (an aware datetime or seconds since
        the epoch), for a server that counts per time bucket: it must lie within the server's
        --bucket-past (1 h) when it arrives, or the server refuses it (logged, dropped).
        TypeError/ValueError for a key or value the server would refuse, Full when max_pending
        keys are held and key is new."""
        stamp = 0 if at is None else at_seconds(at)
        with self._lock:
            pending = self._pending
            while True:
                if self._closed:
                    raise RuntimeError("the client is closed")
                if pending.add(key, value, stamp):
                    break
                if not self._block:
                    raise full(pending, self._http.base_url, self._delivery.last_error)
                self._wake()
                self._cond.wait()
            if len(pending.deltas) >= self._max_batch and not self._cut_wanted:
                self._wake()

    def flush(self, timeout: float | None = None) -> None:
        """Send what is pending now and wait until everything counted before this call is
        acknowledged. TimeoutError past timeout (it is still being retried); Refused if the
        server refused some of it for good (dropped)."""
        deadline = float("inf") if timeout is None else monotonic() + timeout
        with self._cond:
            refused = self._delivery.dropped_batches
            target = self._cuts + 1
            self._wake()
            while self._delivered < target and self._thread.is_alive():
                left = deadline - monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self._unanswered()} increments not acknowledged after {timeout} s; "
                        f"still retrying (last error: {self._delivery.last_error or 'none'})"
                    )
                self._cond.wait(min(left, 3600.0))
            if self._delivery.dropped_batches > refused:
                raise Refused(self._delivery.refusal)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the thread and close connections. Past timeout, what is still
        unacknowledged is dropped and logged, a request still in flight included: close returns
        at the deadline without waiting out its read timeout. Never raises for what the server
        refused (the log and stats say)."""
        deadline = float("inf") if timeout is None else monotonic() + timeout
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stop_at = deadline
            self._wake()
        timer = None
        if timeout is not None:
            timer = threading.Timer(max(0.0, timeout), self._stopping.set)
            timer.daemon = True
            timer.start()
        self._thread.join(None if timeout is None else max(0.0, timeout) + CLOSE_GRACE)
        if timer is not None:
            timer.cancel()
        with self._cond:
            abandoned = self._abandoned = not self._finished
            if abandoned:  # a request still in flight: the thread closes the connections
                self._delivery.abandon(self._unanswered())
                self._pending.cut()
                self._in_flight = 0
        if not abandoned:
            self._http.close()
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)

    def series(
        self,
        key: str,
        granularity: str,
        start: Time | None = None,
        end: Time | None = None,
    ) -> Series:
        """key's counts per `granularity` bucket (minute, hour, day: one the server keeps) from
        start to end (by default, the server's: the last hour, day or 30 days to now). Waits
        for the answer; ReadError if the server refuses, httpx's errors if it cannot be
        reached. Counts not yet sent by this client are not in it: flush() first."""
        path, params = series_request(key, granularity, start, end)
        response = self._http.get(path, params=params)
        return series_answer(response.status_code, response.content)

    def read_many(
        self,
        keys: list[str],
        granularity: str | None = None,
        start: Time | None = None,
        end: Time | None = None,
    ) -> dict[str, int]:
        """Each key's total in one request; with a granularity, each key's count from start to
        end instead (a quota check: `read_many(keys, "day")` is today's counts). See series."""
        path, params = many_request(keys, granularity, start, end)
        response = self._http.get(path, params=params)
        return many_answer(response.status_code, response.content)

    @property
    def stats(self) -> ClientStats:
        with self._cond:
            stats = ClientStats(**vars(self._delivery.stats))
            stats.pending = self._unanswered()
            return stats

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wake(self) -> None:
        self._cut_wanted = True
        self._cond.notify_all()

    def _unanswered(self) -> int:
        return self._pending.calls + self._in_flight

    # the sending thread

    def _run(self) -> None:
        while True:
            with self._cond:
                wait_until = monotonic() + self._flush_interval
                while not self._cut_wanted and not self._closed:
                    left = wait_until - monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._cut_wanted = False
                batches = self._pending.cut()
                self._cuts += 1
                cut = self._cuts
                self._in_flight = sum(b.calls for b in batches)
                last = self._closed and not batches
            for batch in batches:
                self._deliver(batch)
                with self._cond:
                    self._pending.answered(batch)
                    self._cond.notify_all()  # room for blocked incr() calls
            with self._cond:
                self._delivered = cut
                self._cond.notify_all()
                if last or self._abandoned:
                    self._finished = True
                    abandoned = self._abandoned
                    break
        if abandoned:  # close() returned without closing the connections: done here
            self._http.close()

    def _deliver(self, batch: Batch) -> None:
        """Until the server answers for good: acknowledged, or refused (then dropped, after
        halving a batch refused whole to save the increments it can)."""
        work = [batch]
        while work:
            part = work.pop()
            work.extend(reversed(self._attempts(part)))

    def _attempts(self, batch: Batch) -> list[Batch]:
        """Send one batch until it is answered for good; the batches to send instead of it."""
        batch.first_attempt = batch.first_attempt or monotonic()
        attempt = 0
        while True:
            attempt += 1
            with self._cond:
                if self._abandoned:
                    return []
                pause = self._delivery.pause(monotonic())
            if pause:  # the server's rate limit said to wait (its RateLimit field)
                self._stopping.wait(pause)
            timeout = self._delivery.attempt_timeout(self._timeout, self._stop_at, monotonic())
            try:
                response = self._http.post(
                    "/increments",
                    content=batch.body,
                    headers={"Idempotency-Key": batch.key},
                    timeout=timeout,  # once closing, no attempt outlasts the close deadline
                )
                answer = read_answer(
                    response.status_code, response.headers, response.content, len(batch.items)
                )
            except httpx.TransportError as exc:  # connect, read, write, timeout, protocol
                answer = failure(exc)
            except Exception as exc:  # a bug: logged, and the batch kept and retried
                log.exception("unexpected error sending batch %s", batch.key)
                answer = failure(exc)
            with self._cond:
                if self._abandoned:  # close() has counted it already
                    return []
                step = self._delivery.step(batch, answer, attempt, monotonic(), self._stop_at)
                if step == []:  # answered for good: acknowledged or dropped
                    self._in_flight -= batch.calls
            if isinstance(step, list):
                return step
            self._stopping.wait(step)


def _close_at_exit(ref: weakref.ref[Client], timeout: float) -> Callable[[], None]:
    def close() -> None:
        client = ref()
        if client is not None:
            client.close(timeout)

    return close
