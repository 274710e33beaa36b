"""The answering half of a connection: answers leave strictly in request order.

A request whose handler answers at once is answered at once. One whose handler is asynchronous
(a read) becomes the head of the pipeline, and the requests read after it wait in `queue` until
it is answered. Whatever ends the connection (a request that cannot be parsed, a timeout, the
client's end of input) is its last word: said, and the connection closed, only after every
request read before it is answered. `100 Continue` likewise goes out only when its request is
the one being served.

Answers are not written straight to the socket. They are queued (`out`, one chunk per answer, in
request order) and handed to the Gate, which releases them once the WAL frame covering this
event-loop tick is as durable as the configured mode promises (delivery/durability.py's AckGate
is the one the service uses); pipelined answers leave in one write.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable
from typing import cast

from incrementer.http import responses
from incrementer.http.reader import RequestReader
from incrementer.http.request import Request, without_body

log = logging.getLogger("incrementer.http")

# Requests parsed while an async handler runs wait here; past this many, stop reading the socket.
MAX_QUEUED = 64

# A handler returns the response bytes, or an awaitable of them for routes that need the database.
Result = bytes | Awaitable[bytes]


class Gate:
    """When answers may leave. A connection registers with hold() in the tick it queues its first
    answer; the gate then either lets the tick's answers go (release_output) or takes them
    (take_output) and gives each list back through exactly one release(), once what they
    acknowledge is durable. The connection counts what was taken and not given back, to know
    whether it still owes answers.

    A base class named here, below the layer that implements it (the delivery layer's AckGate),
    so http/ imports nothing above it and the compiled connection calls the gate through the
    method table."""

    def hold(self, conn: Pipeline) -> None:
        raise NotImplementedError


class Pipeline(RequestReader):
    """What a connection owes its client, in order. The connection (protocol.py) subclasses it,
    as this subclasses the reading half: one compiled object, its calls straight through the
    method table."""

    __slots__ = (
        "closing",
        "continue_wanted",
        "draining",
        "gate",
        "held",
        "last_word",
        "out",
        "queue",
        "reading_paused",
        "task",
        "transport",
        "unreleased",
        "writing_paused",
    )

    def __init__(self, clock: responses.Clock, gate: Gate, max_body: int, max_header: int) -> None:
        super().__init__(clock, max_body, max_header)
        self.gate = gate
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes | None] = []  # None marks "close after what precedes"
        self.held = False  # registered with the gate for this tick
        self.unreleased = 0  # outputs the gate has taken and not yet released (wal-fsync)
        self.closing = False  # read no more requests: the connection ends after their answers
        self.draining = False  # shutting down: close after the answer in progress
        self.task: asyncio.Future[bytes] | None = None  # the head of the pipeline, when async
        self.queue: deque[Request] = deque()  # requests read behind the head, in order
        self.last_word: bytes | None = None  # said once the queue is answered (b"": nothing)
        self.continue_wanted = False  # the request being read waits for 100 Continue
        self.reading_paused = False
        self.writing_paused = False

    def run_handler(self, request: Request) -> Result:
        """The app's answer to one request."""
        raise NotImplementedError

    # answering, in order

    def answer(self, request: Request) -> None:
        """A complete request: answered now, or queued behind the ones still unanswered."""
        if self.task is None and not self.queue:
            self._dispatch(request)
            return
        self.queue.append(request)
        self.continue_wanted = False  # its body came without waiting for 100 Continue
        if not request.keep_alive:
            self.closing = True  # nothing after it will be answered: stop reading
            self._pause_reading()
        elif len(self.queue) >= MAX_QUEUED:
            self._pause_reading()

    def _dispatch(self, request: Request) -> None:
        try:
            result = self.run_handler(request)
        except Exception as exc:
            self.internal_error(exc, f"{request.method!r} {request.url!r}", request.head)
            return
        if type(result) is bytes:
            self.emit(_as_sent(result, request))
            if not request.keep_alive or self.draining:
                self.close_after()
            return
        self.task = asyncio.ensure_future(cast(Awaitable[bytes], result))
        self.task.add_done_callback(lambda task: self._async_done(task, request))

    def _async_done(self, task: asyncio.Future[bytes], request: Request) -> None:
        self.task = None
        if task.cancelled():
            return  # the connection was lost
        exc = task.exception()
        if exc is not None:
            self.internal_error(exc, "an async handler", request.head)
            return
        self.emit(_as_sent(task.result(), request))
        if not request.keep_alive or self.draining:
            self.close_after()
            return
        self._serve_queued()

    def _serve_queued(self) -> None:
        """The head of the pipeline is answered: answer the requests behind it, in order, until
        one is asynchronous again or none is left."""
        queue = self.queue
        while queue and self.task is None:
            self._dispatch(queue.popleft())
        if self.task is not None:
            return
        # Every request read so far is answered.
        if self.last_word is not None:
            self.end(self.last_word)
            return
        if self.continue_wanted:
            self.continue_wanted = False
            self.emit(responses.CONTINUE)
        if not self.writing_paused:
            self._resume_reading()

    def expect_continue(self) -> None:
        """100 Continue now if this request is the one being served, else once every request
        before it is answered (its client waits for it before sending the body)."""
        if self.task is not None or self.queue:
            self.continue_wanted = True
        else:
            self.emit(responses.CONTINUE)

    def internal_error(self, exc: BaseException, what: str, head: bool = False) -> None:
        """A bug of ours: logged with its traceback, a 500 for the client, the connection closed
        (its state is unknown); the process keeps serving everyone else."""
        log.error("internal error handling %s", what, exc_info=exc)
        response = responses.error(
            self.clock, 500, "internal_error", "The server failed to handle this request.", True
        )
        self.emit(without_body(response) if head else response)
        self.close_after()

    # the end of the connection

    def end(self, last_word: bytes = b"") -> None:
        """Read no further. Once every request read so far is answered, say `last_word` (an
        error, or nothing) and close."""
        if self.task is not None or self.queue:
            self.closing = True
            self._pause_reading()
            self.last_word = last_word
            return
        if last_word:
            self.emit(last_word)
        self.close_after()

    def close_after(self) -> None:
        """Close once what is queued for the gate is written; nothing read later is answered."""
        self.closing = True
        self.queue.clear()
        self.last_word = None
        self.continue_wanted = False
        self._pause_reading()
        self.emit(None)

    # output, through the gate

    def emit(self, data: bytes | None) -> None:
        """Queue an answer (None: close after what precedes) for the gate to release."""
        self.out.append(data)
        if not self.held:
            self.held = True
            self.gate.hold(self)

    def release_output(self) -> None:
        """Called by the gate when what was queued this tick may leave at once."""
        self._write(self._take())

    def take_output(self) -> list[bytes | None]:
        """Called by the gate at the end of a tick: the answers queued since the last take,
        in request order, one chunk each; each list comes back through release()."""
        self.unreleased += 1
        return self._take()

    def release(self, out: list[bytes | None]) -> None:
        """Write answers taken by take_output(); a None marker closes the connection after
        them."""
        self.unreleased -= 1
        self._write(out)

    def _take(self) -> list[bytes | None]:
        out = self.out
        self.out = []
        self.held = False
        return out

    def _write(self, out: list[bytes | None]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if len(out) == 1 and out[0] is not None:
            transport.write(out[0])
            return
        data = b"".join(chunk for chunk in out if chunk is not None)
        if data:
            transport.write(data)
        if None in out:
            transport.close()

    # reading, paused while answers are owed or the client does not read them

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if not self.queue:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closing and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()


def _as_sent(response: bytes, request: Request) -> bytes:
    """A handler's response as its request gets it: without the body for HEAD, with
    `Connection: keep-alive` for an HTTP/1.0 client keeping the connection."""
    if request.announce:
        response = responses.kept_alive(response)
    return without_body(response) if request.head else response
