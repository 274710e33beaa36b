"""One HTTP/1.1 connection: the fast path, keep-alive, limits on connections and their time.

A connection stacks two halves as base classes (one compiled object, its calls straight through
the method table): reading requests (reader.py, the httptools callbacks) and answering them in
order (pipeline.py, through the gate). This module joins them: the socket's callbacks, the
moment a request is complete (on_message_complete: the fast path, else the app's handler), and
the connection's lifecycle (timeouts, the connection limit, shutdown).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, NamedTuple, cast

import httptools

from incrementer.http import responses
from incrementer.http.pipeline import Gate, Pipeline, Result
from incrementer.http.reader import unknown_method
from incrementer.http.request import Reject, Request

if TYPE_CHECKING:
    from incrementer.http.server import HttpServer

__all__ = ["FastPath", "Gate", "Handler", "HttpConnection", "Request", "Result", "room_maker"]


class FastPath(NamedTuple):
    """One exact request shape (method, URL, content type, body in one piece, nothing queued
    before it, no Idempotency-Key) the connection answers by itself: 202 Accepted when the handler's fast_accept
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

    def handle(self, conn: HttpConnection, request: Request) -> Result:
        """Any other request: the response, or an awaitable of it."""
        raise NotImplementedError

    def refused(self, status: int) -> None:
        """The connection refused a request before any route could see it (400 malformed, 408,
        413, 414, 417, 431): for the handler's own accounting."""
        raise NotImplementedError

    def refused_connection(self) -> None:
        """A connection was turned away at --max-connections (503) with no idle one to close."""
        raise NotImplementedError


class HttpConnection(Pipeline):
    """One connection: reads requests (RequestReader), answers them in order (Pipeline)."""

    __slots__ = (
        "accepted_fields",
        "fast_method",
        "fast_type",
        "fast_url",
        "first_request",
        "handler",
        "last_active",
        "peer",
        "server",
        "silent",
    )

    def __init__(self, server: HttpServer) -> None:
        super().__init__(server.clock, server.gate, server.max_body_bytes, server.max_header_bytes)
        self.server = server
        self.handler = server.handler
        self.fast_method, self.fast_url, self.fast_type = server.fast_path
        self.accepted_fields = b""
        """Header lines the handler's fast_accept adds to the 202 it takes (its rate limit's
        fields); empty for most, which get the pre-built 202."""
        self.peer = ""
        self.last_active = self.clock.now
        self.silent = True  # not a byte received yet
        self.first_request = True  # no request completed on it yet

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = self.transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        # The first request is timed like any other, from the accept: a connection that never
        # sends a byte is closed after --request-timeout, not held for --idle-timeout.
        self.request_started = self.clock.now
        refusal = self.server.admit(self)
        if refusal:
            self.handler.refused_connection()
            self.transport.write(
                responses.error(
                    self.clock,
                    503,
                    "too_many_connections",
                    refusal,
                    close=True,
                    headers=b"Retry-After: 1\r\n",
                )
            )
            self.transport.close()
            self.closing = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.release(self)
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
                self.end()
        except httptools.HttpParserInvalidMethodError:  # before its base class, HttpParserError
            if not self.closing:
                refusal = unknown_method(data)
                self._fail(refusal.status, refusal.code, refusal.detail)
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
            self.end()
        return True  # keep the transport open for the answers still owed

    # the request is complete: answer it

    def on_message_complete(self) -> None:
        self.request_started = 0.0
        self.first_request = False
        if self.closing:
            return  # pipelined after a request that closes the connection: never answered
        parser = self.parser
        if (
            self.url == self.fast_url
            and self.content_type == self.fast_type
            and self.parts is None
            and self.task is None
            and not self.queue
            and self.idempotency_key is None
            and parser.get_method() == self.fast_method
        ):
            try:
                taken = self.handler.fast_accept(self, self.body)
            except Exception as exc:
                self.internal_error(exc, f"the fast path ({self.url!r})")
                return
            if taken:
                fields = self.accepted_fields
                if parser.should_keep_alive():
                    http10 = self.connection != b"" and self._http10()
                    if fields:
                        self.accepted_fields = b""
                        self.emit(responses.accepted(self.clock, fields, False, http10))
                    elif http10:
                        self.emit(self.clock.accepted_keep_alive)
                    else:
                        self.emit(self.clock.accepted)
                    if self.draining:
                        self.close_after()
                else:
                    if fields:
                        self.accepted_fields = b""
                        self.emit(responses.accepted(self.clock, fields, True, False))
                    else:
                        self.emit(self.clock.accepted_close)
                    self.close_after()
                return
            # Declined: nothing happened, the general path below answers.
        keep_alive: bool = parser.should_keep_alive()
        self.answer(
            Request(
                parser.get_method(),
                self.url,
                self.content_type,
                self.authorization,
                self.idempotency_key,
                self.body if self.parts is None else b"".join(self.parts),
                keep_alive,
                keep_alive and self.connection != b"" and self._http10(),
            )
        )

    def _http10(self) -> bool:
        """An HTTP/1.0 request. Asked only of those with a Connection field, as every HTTP/1.0
        request kept alive has (`Connection: keep-alive`): its client reuses the connection
        only when the answer says so, and otherwise waits for the close."""
        return self.parser.get_http_version() == "1.0"

    def run_handler(self, request: Request) -> Result:
        return self.handler.handle(self, request)

    def _fail(self, status: int, code: str, detail: str) -> None:
        """The request being read is refused and ends the connection, after the answers owed
        to the requests before it."""
        self.handler.refused(status)
        self.end(responses.error(self.clock, status, code, detail, close=True))

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
        """Stop taking requests: close now if idle, else after the answer in progress."""
        if self.closing:
            return
        if self.idle:
            self._close_now()
        elif self.request_started or self.task is not None:
            self.draining = True  # the request in progress gets its answer, then we close
            self.queue.clear()
            self._pause_reading()
        else:
            self.close_after()

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

    @property
    def sending_first_request(self) -> bool:
        """Has sent part of its first request and not the rest: nothing was answered on it and
        nothing is owed, so closing it under pressure breaks no exchange the server began (a
        client sending this slowly is most likely holding the slot on purpose)."""
        return self.first_request and not self.silent and not self.closing

    def reclaim(self) -> None:
        """Closed by the server to make room for a new connection (server.admit)."""
        self._close_now()


def room_maker(connections: dict[HttpConnection, None], peer: str) -> HttpConnection | None:
    """The connection to close for a new one (of `peer`'s, or of anyone's when it is ""): the
    one idle the longest, else the one sending its first request since the earliest; None when
    every one is busy. A scan in accept order (ties go to the earliest accepted), compiled with
    this module, as it runs at every accept while a limit is reached."""
    idle: HttpConnection | None = None
    unfinished: HttpConnection | None = None
    for conn in connections:
        if peer and conn.peer != peer:
            continue
        if conn.reusable:
            if idle is None or conn.last_active < idle.last_active:
                idle = conn
        elif unfinished is None and conn.sending_first_request:
            unfinished = conn
    return idle if idle is not None else unfinished
