"""One HTTP/1.1 connection: keep-alive, pipelining in order, the fast path, timeouts.

Answers leave strictly in request order. A request whose handler answers at once is answered at
once; one whose handler is asynchronous (a read) becomes the head of the pipeline, and requests
read after it wait in `queue` until it is answered. Whatever ends the connection (a request that
cannot be parsed, a timeout, the client's end of input) is the connection's last word: said,
and the connection closed, only after every request read before it is answered. `100 Continue`
likewise goes out only when its request is the one being served.

Responses are not written straight to the socket. They are queued on the connection (`out`, one
chunk per response, in request order) and handed to the AckGate, which releases them once the WAL
frame covering this event-loop tick is as durable as the configured mode promises. Pipelined
responses therefore leave in one write.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, NamedTuple, cast

import httptools

from incrementer.http import responses
from incrementer.http.reader import RequestReader
from incrementer.http.request import Reject, without_body

if TYPE_CHECKING:
    from incrementer.http.server import HttpServer

log = logging.getLogger("incrementer.http")

# Requests parsed while an async handler runs wait here; past this many, stop reading the socket.
MAX_QUEUED = 64


# A handler returns the response bytes, or an awaitable of them for routes that need the database.
Result = bytes | Awaitable[bytes]
# method, URL, content type, authorization, body, keep-alive, announce keep-alive (HTTP/1.0)
Queued = tuple[bytes, bytes, bytes, bytes, bytes, bool, bool]


class FastPath(NamedTuple):
    """One exact request shape (method, URL, content type, body in one piece, nothing queued
    before it) the connection answers by itself: 202 Accepted when the handler's fast_accept
    returns True. False means nothing happened; the request then goes to handle() like any
    other, which answers it (and says what was wrong)."""

    method: bytes
    url: bytes
    content_type: bytes


class Handler:
    """What a connection calls; the app subclasses it. A base class rather than a Protocol, so
    the compiled connection (setup.py) calls it through the method table."""

    def fast_path(self) -> FastPath:
        """The one request shape the connections answer themselves."""
        raise NotImplementedError

    def fast_accept(self, conn: HttpConnection, body: bytes) -> bool:
        """A request of the fast path's shape: True if taken (the connection answers 202),
        False if nothing was changed or spent (handle() answers instead)."""
        raise NotImplementedError

    def handle(
        self,
        conn: HttpConnection,
        method: bytes,
        url: bytes,
        content_type: bytes,
        authorization: bytes,
        body: bytes,
        keep_alive: bool,
    ) -> Result:
        """Any other request: the response, or an awaitable of it."""
        raise NotImplementedError


class HttpConnection(RequestReader):
    """One connection: reads requests (RequestReader), answers them in order through the gate."""

    __slots__ = (
        "closing",
        "continue_wanted",
        "draining",
        "fast_method",
        "fast_type",
        "fast_url",
        "handler",
        "held",
        "last_active",
        "last_word",
        "out",
        "peer",
        "queue",
        "reading_paused",
        "server",
        "silent",
        "task",
        "transport",
        "unreleased",
        "writing_paused",
    )

    def __init__(self, server: HttpServer) -> None:
        super().__init__(server.clock, server.max_body_bytes, server.max_header_bytes)
        self.server = server
        self.handler = server.handler
        self.fast_method, self.fast_url, self.fast_type = server.fast_path
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.out: list[bytes | None] = []  # None marks "close after what precedes"
        self.held = False
        self.unreleased = 0  # outputs the gate has taken and not yet released (wal-fsync)
        self.closing = False  # read no more requests: the connection ends after their answers
        self.draining = False
        self.task: asyncio.Future[bytes] | None = None  # the head of the pipeline, when async
        self.queue: deque[Queued] = deque()  # requests read behind the head, in order
        self.last_word: bytes | None = None  # said once the queue is answered (b"": nothing)
        self.continue_wanted = False  # the request being read waits for 100 Continue
        self.reading_paused = False
        self.writing_paused = False
        self.last_active = self.clock.now
        self.silent = True  # not a byte received yet

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = self.transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        # The first request is timed like any other, from the accept: a connection that never
        # sends a byte is closed after --request-timeout, not held for --idle-timeout.
        self.request_started = self.clock.now
        server = self.server
        connections = server.connections
        if len(connections) >= server.max_connections and not _close_longest_idle(connections):
            server.metrics.rejected_connections += 1
            self.transport.write(
                responses.error(
                    self.clock,
                    503,
                    "too_many_connections",
                    "The server is at its connection limit.",
                    close=True,
                    headers=b"Retry-After: 1\r\n",
                )
            )
            self.transport.close()
            self.closing = True
            return
        connections[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.pop(self, None)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = self.clock.now
        self.silent = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # not a subclass of HttpParserError
            # llhttp stops at an upgrade. A complete request was answered normally (ignoring
            # Upgrade is allowed); what follows is not HTTP, so the connection ends either way.
            if self.closing:
                return
            if self.request_started:
                self._fail(400, "upgrade_unsupported", "Protocol upgrades are not supported.")
            else:
                self._end()
        except httptools.HttpParserError as exc:
            if self.closing:
                return  # bytes after a request that closes the connection: ignored
            # httptools may wrap an exception raised in a callback: find our Reject behind it.
            cause = exc if isinstance(exc, Reject) else exc.__cause__ or exc.__context__
            if isinstance(cause, Reject):
                self._fail(cause.status, cause.code, cause.detail)
            else:
                self._fail(400, "malformed_http", f"Malformed HTTP request: {exc}")
        except Reject as exc:
            if not self.closing:
                self._fail(exc.status, exc.code, exc.detail)

    def eof_received(self) -> bool:
        """The client will send nothing more (a half-close): the requests it completed are still
        answered, in order, then the connection closes; a request it cut short is not."""
        if not self.closing:
            self._end()
        return True  # keep the transport open for the answers still owed

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if not self.queue:
            self._resume_reading()

    # the request is complete: answer it

    def on_message_complete(self) -> None:
        self.request_started = 0.0
        if self.closing:
            return  # pipelined after a request that closes the connection: never answered
        parser = self.parser
        if (
            self.url == self.fast_url
            and self.content_type == self.fast_type
            and self.parts is None
            and self.task is None
            and not self.queue
            and parser.get_method() == self.fast_method
        ):
            try:
                taken = self.handler.fast_accept(self, self.body)
            except Exception as exc:
                self._internal_error(exc, f"the fast path ({self.url!r})")
                return
            if taken:
                if parser.should_keep_alive():
                    if self.connection and self._http10():
                        self._emit(self.clock.accepted_keep_alive)
                    else:
                        self._emit(self.clock.accepted)
                    if self.draining:
                        self._close_after()
                else:
                    self._emit(self.clock.accepted_close)
                    self._close_after()
                return
            # Declined: nothing happened, the general path below answers.
        body = self.body if self.parts is None else b"".join(self.parts)
        keep_alive: bool = parser.should_keep_alive()
        announce = keep_alive and self.connection != b"" and self._http10()
        if self.task is not None or self.queue:
            self.queue.append(
                (
                    parser.get_method(),
                    self.url,
                    self.content_type,
                    self.authorization,
                    body,
                    keep_alive,
                    announce,
                )
            )
            self.continue_wanted = False  # its body came without waiting for 100 Continue
            if not keep_alive:
                self.closing = True  # nothing after it will be answered: stop reading
                self._pause_reading()
            elif len(self.queue) >= MAX_QUEUED:
                self._pause_reading()
            return
        self._dispatch(
            parser.get_method(),
            self.url,
            self.content_type,
            self.authorization,
            body,
            keep_alive,
            announce,
        )

    def _http10(self) -> bool:
        """An HTTP/1.0 request. Asked only of those with a Connection field, as every HTTP/1.0
        request kept alive has (`Connection: keep-alive`): its client reuses the connection
        only when the answer says so, and otherwise waits for the close."""
        return self.parser.get_http_version() == "1.0"

    # dispatch and output

    def _dispatch(
        self,
        method: bytes,
        url: bytes,
        content_type: bytes,
        authorization: bytes,
        body: bytes,
        keep_alive: bool,
        announce: bool,
    ) -> None:
        head = method == b"HEAD"
        if head:
            method = b"GET"  # same headers as GET, no body
        try:
            result = self.handler.handle(
                self, method, url, content_type, authorization, body, keep_alive
            )
        except Exception as exc:
            self._internal_error(exc, f"{method!r} {url!r}", head)
            return
        if type(result) is bytes:
            self._emit(_as_sent(result, head, announce))
            if not keep_alive or self.draining:
                self._close_after()
            return
        self.task = asyncio.ensure_future(cast(Awaitable[bytes], result))
        self.task.add_done_callback(lambda task: self._async_done(task, keep_alive, head, announce))

    def _async_done(
        self, task: asyncio.Future[bytes], keep_alive: bool, head: bool, announce: bool
    ) -> None:
        self.task = None
        if task.cancelled():
            return  # the connection was lost
        exc = task.exception()
        if exc is not None:
            self._internal_error(exc, "an async handler", head)
            return
        self._emit(_as_sent(task.result(), head, announce))
        if not keep_alive or self.draining:
            self._close_after()
            return
        self._serve_queued()

    def _serve_queued(self) -> None:
        """The head of the pipeline is answered: answer the requests behind it, in order, until
        one is asynchronous again or none is left."""
        queue = self.queue
        while queue and self.task is None:
            self._dispatch(*queue.popleft())
        if self.task is not None:
            return
        # Every request read so far is answered.
        if self.last_word is not None:
            self._end(self.last_word)
            return
        if self.continue_wanted:
            self.continue_wanted = False
            self._emit(responses.CONTINUE)
        if not self.writing_paused:
            self._resume_reading()

    def _internal_error(self, exc: BaseException, what: str, head: bool = False) -> None:
        """A bug of ours: logged with its traceback, a 500 for the client, the connection closed
        (its state is unknown); the process keeps serving everyone else."""
        log.error("internal error handling %s", what, exc_info=exc)
        response = responses.error(
            self.clock, 500, "internal_error", "The server failed to handle this request.", True
        )
        self._emit(without_body(response) if head else response)
        self._close_after()

    def _emit(self, data: bytes | None) -> None:
        """Queue a response (None: close after what precedes) for the gate to release."""
        self.out.append(data)
        if not self.held:
            self.held = True
            self.server.gate.hold(self)

    def _close_after(self) -> None:
        """Close once what is queued for the gate is written; nothing read later is answered."""
        self.closing = True
        self.queue.clear()
        self.last_word = None
        self.continue_wanted = False
        self._pause_reading()
        self._emit(None)

    def _end(self, last_word: bytes = b"") -> None:
        """Read no further. Once every request read so far is answered, say `last_word` (an
        error, or nothing) and close."""
        if self.task is not None or self.queue:
            self.closing = True
            self._pause_reading()
            self.last_word = last_word
            return
        if last_word:
            self._emit(last_word)
        self._close_after()

    def _fail(self, status: int, code: str, detail: str) -> None:
        """The request being read is refused and ends the connection, after the answers owed
        to the requests before it."""
        self.server.metrics.count_request("invalid", status)
        self._end(responses.error(self.clock, status, code, detail, close=True))

    def expect_continue(self) -> None:
        """100 Continue now if this request is the one being served, else once every request
        before it is answered (its client waits for it before sending the body)."""
        if self.task is not None or self.queue:
            self.continue_wanted = True
        else:
            self._emit(responses.CONTINUE)

    def release_output(self) -> None:
        """Called by the AckGate when what was queued this tick may leave at once."""
        self._write(self._take())

    def take_output(self) -> list[bytes | None]:
        """Called by the AckGate at the end of a tick: the responses queued since the last
        take, in request order, one chunk each; each list comes back through release()."""
        self.unreleased += 1
        return self._take()

    def release(self, out: list[bytes | None]) -> None:
        """Write responses taken by take_output(); a None marker closes the connection after
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

    def abort(self) -> None:
        """The WAL write failed: these responses cannot be promised, so the client gets none."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closing and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    # lifecycle, driven by the server

    def check_timeouts(self, now: float, idle_timeout: float, request_timeout: float) -> None:
        if self.closing:
            return
        if self.request_started and now - self.request_started > request_timeout:
            if self.silent:
                self._close_now()  # nothing was asked (a browser's preconnect): nothing to answer
            else:
                self._fail(408, "request_timeout", "The request was not completed in time.")
        elif self.idle and now - self.last_active > idle_timeout:
            self._close_now()

    def shutdown(self) -> None:
        """Stop taking requests: close now if idle, else after the response in progress."""
        if self.closing:
            return
        if self.idle:
            self._close_now()
        elif self.request_started or self.task is not None:
            self.draining = True  # the request in progress gets its answer, then we close
            self.queue.clear()
            self._pause_reading()
        else:
            self._close_after()

    def _close_now(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        """Waiting for a request: none being received (not a byte of it yet), handled or
        answered."""
        return (
            (self.silent or not self.request_started)
            and self.task is None
            and not self.out
            and not self.unreleased
        )

    @property
    def reusable(self) -> bool:
        """Idle, with every answer written out: closing it loses no request and no answer."""
        transport = self.transport
        return (
            self.idle
            and not self.closing
            and transport is not None
            and not transport.get_write_buffer_size()
        )


def _close_longest_idle(connections: dict[HttpConnection, None]) -> bool:
    """At --max-connections, make room for a new connection by closing the one idle the longest
    (as nginx reuses idle keep-alive connections). False when no connection is idle."""
    oldest: HttpConnection | None = None
    for conn in connections:  # in accept order: among equals, the earliest accepted goes
        if conn.reusable and (oldest is None or conn.last_active < oldest.last_active):
            oldest = conn
    if oldest is None:
        return False
    del connections[oldest]
    oldest._close_now()
    return True


def _as_sent(response: bytes, head: bool, announce: bool) -> bytes:
    """A handler's response as its request gets it: without the body for HEAD, with
    `Connection: keep-alive` for an HTTP/1.0 client keeping the connection."""
    if announce:
        response = responses.kept_alive(response)
    return without_body(response) if head else response
