"""AsyncClient: the same model as Client, sending from a task on the caller's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
CLOSE_GRACE = 0.05  # seconds past the close deadline for the task to drop what is left


class AsyncClient:
    """Client's model on asyncio: `await incr(key, value)` returns at once (it waits only for
    room, with when_full="block"), and a task on the loop that first used the client sends the
    batches, each under its own Idempotency-Key, retried with that key until answered for good.
    Use it from that one loop; `await aclose()` (or leave `async with`) before the loop ends.
    The options are Client's."""

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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        check_options(flush_interval, when_full)
        self._pending = Pending(
            max_pending, max_batch, max_body_bytes, max_key_bytes, allow_negative
        )
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._block = when_full == "block"
        self._delivery = Delivery(retry_for)
        self._wakeup = asyncio.Event()  # a cut is wanted
        self._progress = asyncio.Condition()  # a batch was answered, or a cut delivered
        self._stopping = asyncio.Event()  # the close deadline passed: backoffs end early
        self._cut_wanted = False
        self._cuts = 0
        self._delivered = 0
        self._in_flight = 0
        self._closed = False
        self._stop_at = float("inf")
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(transport=transport, **http_options(url, api_key, timeout))

    # the caller's side

    async def incr(self, key: str, value: int = 1, at: Time | None = None) -> None:
        """Add value to the counter key; see Client.incr."""
        stamp = 0 if at is None else at_seconds(at)
        if self._task is None:
            self._start()
        pending = self._pending
        while True:
            if self._closed:
                raise RuntimeError("the client is closed")
            if pending.add(key, value, stamp):
                break
            if not self._block:
                raise full(pending, self._http.base_url, self._delivery.last_error)
            self._wake()
            async with self._progress:
                await self._progress.wait()
        if len(pending.deltas) >= self._max_batch and not self._cut_wanted:
            self._wake()

    async def flush(self, timeout: float | None = None) -> None:
        """See Client.flush."""
        if self._task is None:
            self._start()
        deadline = float("inf") if timeout is None else monotonic() + timeout
        refused = self._delivery.dropped_batches
        target = self._cuts + 1
        self._wake()
        async with self._progress:
            while self._delivered < target and self._task is not None and not self._task.done():
                left = deadline - monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self._unanswered()} increments not acknowledged after {timeout} s; "
                        f"still retrying (last error: {self._delivery.last_error or 'none'})"
                    )
                try:
                    await asyncio.wait_for(self._progress.wait(), min(left, 3600.0))
                except TimeoutError:
                    continue
        if self._delivery.dropped_batches > refused:
            raise Refused(self._delivery.refusal)

    async def aclose(self, timeout: float | None = None) -> None:
        """See Client.close."""
        if self._closed:
            return
        self._closed = True
        self._stop_at = float("inf") if timeout is None else monotonic() + timeout
        self._wake()
        task = self._task
        if task is not None:
            stopper = None
            if timeout is not None:
                stopper = asyncio.get_running_loop().call_later(
                    max(0.0, timeout), self._stopping.set
                )
            wait = None if timeout is None else max(0.0, timeout) + CLOSE_GRACE
            try:
                await asyncio.wait_for(asyncio.shield(task), wait)
            except TimeoutError:  # a request still in flight: cancelled, its increments dropped
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self._delivery.abandon(self._unanswered())
                self._pending.cut()
                self._in_flight = 0
            if stopper is not None:
                stopper.cancel()
        await self._http.aclose()

    async def series(
        self,
        key: str,
        granularity: str,
        start: Time | None = None,
        end: Time | None = None,
    ) -> Series:
        """See Client.series."""
        path, params = series_request(key, granularity, start, end)
        response = await self._http.get(path, params=params)
        return series_answer(response.status_code, response.content)

    async def read_many(
        self,
        keys: list[str],
        granularity: str | None = None,
        start: Time | None = None,
        end: Time | None = None,
    ) -> dict[str, int]:
        """See Client.read_many."""
        path, params = many_request(keys, granularity, start, end)
        response = await self._http.get(path, params=params)
        return many_answer(response.status_code, response.content)

    @property
    def stats(self) -> ClientStats:
        stats = ClientStats(**vars(self._delivery.stats))
        stats.pending = self._unanswered()
        return stats

    async def __aenter__(self) -> AsyncClient:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="incrementer-client"
            )

    def _wake(self) -> None:
        self._cut_wanted = True
        self._wakeup.set()

    def _unanswered(self) -> int:
        return self._pending.calls + self._in_flight

    async def _notify(self) -> None:
        async with self._progress:
            self._progress.notify_all()

    # the sending task

    async def _run(self) -> None:
        while True:
            if not self._cut_wanted and not self._closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._flush_interval)
            self._wakeup.clear()
            self._cut_wanted = False
            batches = self._pending.cut()
            self._cuts += 1
            cut = self._cuts
            self._in_flight = sum(b.calls for b in batches)
            last = self._closed and not batches
            for batch in batches:
                await self._deliver(batch)
                self._pending.answered(batch)
                await self._notify()  # room for blocked incr() calls
            self._delivered = cut
            await self._notify()
            if last:
                return

    async def _deliver(self, batch: Batch) -> None:
        work = [batch]
        while work:
            part = work.pop()
            work.extend(reversed(await self._attempts(part)))

    async def _attempts(self, batch: Batch) -> list[Batch]:
        """Send one batch until it is answered for good; the batches to send instead of it."""
        batch.first_attempt = batch.first_attempt or monotonic()
        attempt = 0
        while True:
            attempt += 1
            pause = self._delivery.pause(monotonic())
            if pause:  # the server's rate limit said to wait (its RateLimit field)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)
            try:
                response = await self._http.post(
                    "/increments",
                    content=batch.body,
                    headers={"Idempotency-Key": batch.key},
                    # once closing, no attempt outlasts the close deadline
                    timeout=self._delivery.attempt_timeout(
                        self._timeout, self._stop_at, monotonic()
                    ),
                )
                answer = read_answer(
                    response.status_code, response.headers, response.content, len(batch.items)
                )
            except httpx.TransportError as exc:  # connect, read, write, timeout, protocol
                answer = failure(exc)
            except Exception as exc:  # a bug: logged, and the batch kept and retried
                log.exception("unexpected error sending batch %s", batch.key)
                answer = failure(exc)
            step = self._delivery.step(batch, answer, attempt, monotonic(), self._stop_at)
            if step == []:  # answered for good: acknowledged or dropped
                self._in_flight -= batch.calls
            if isinstance(step, list):
                return step
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), step)
