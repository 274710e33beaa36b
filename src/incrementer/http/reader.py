"""The reading half of a connection: httptools callbacks that assemble one request at a time.

What a request is reduced to while it is parsed (the few headers kept, the body, sizes against
the limits) and the refusals that can be decided while reading (414, 431, 413, 417, a missing or
second Host, a second Authorization, even after an empty one). Where a complete request becomes
an answer, on_message_complete, is the connection's (protocol.py); the order in which answers
leave is the pipeline's (pipeline.py).
"""

from __future__ import annotations

import asyncio
import re

import httptools

from incrementer.http import responses
from incrementer.http.request import HEADER_ATTRS, Reject


class RequestReader(asyncio.Protocol):
    """Fields of the request being parsed; the pipeline (pipeline.py), and through it the
    connection (protocol.py), subclass it."""

    __slots__ = (
        "authorization",
        "authorization_sent",
        "body",
        "body_bytes",
        "clock",
        "connection",
        "content_length",
        "content_type",
        "expect",
        "header_bytes",
        "host",
        "idempotency_key",
        "max_body",
        "max_body_digits",
        "max_header",
        "parser",
        "parts",
        "request_started",
        "trailing",
        "url",
    )

    def __init__(self, clock: responses.Clock, max_body: int, max_header: int) -> None:
        self.clock = clock
        self.max_body = max_body
        self.max_body_digits = len(str(max_body))
        self.max_header = max_header
        self.parser = httptools.HttpRequestParser(self)
        self.on_message_begin()
        self.request_started = 0.0

    def expect_continue(self) -> None:
        """The request's headers ask for `100 Continue` before its body is sent."""
        raise NotImplementedError

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.content_type = b""
        self.content_length = b""
        self.authorization = b""
        self.authorization_sent = False  # an empty first field counts: a second is refused
        self.connection = b""
        self.expect = b""
        self.host: bytes | None = None  # None: no Host field (yet)
        self.idempotency_key: bytes | None = None  # None: none sent (b"": sent empty)
        self.body = b""
        self.parts: list[bytes] | None = None
        self.body_bytes = 0
        self.header_bytes = 0
        self.trailing = False
        self.request_started = self.clock.now

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)
        if self.header_bytes > self.max_header:
            raise Reject(414, "uri_too_long", f"Request line exceeds {self.max_header} bytes.")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self.header_bytes + len(name) + len(value) + 4
        self.header_bytes = size
        if size > self.max_header:
            raise Reject(431, "headers_too_large", f"Headers exceed {self.max_header} bytes.")
        if self.trailing:
            # llhttp reports a chunked body's trailer fields here too, after the body. They
            # count toward the limit, and are never used: routing, authentication, the rate
            # limit and the content type are settled by the header section alone.
            return
        # Every increment carries these, in these spellings from most clients: plain
        # comparisons find them faster than the table (~0.25 us a request, measured).
        if name == b"Content-Type":
            self.content_type = value
            return
        if name == b"Host":
            if self.host is not None:
                raise _second_host()
            self.host = value
            return
        if name == b"Content-Length":
            self.content_length = value
            return
        if name == b"Authorization":
            if self.authorization_sent:
                raise _second_authorization()
            self.authorization_sent = True
            self.authorization = value
            return
        attr = HEADER_ATTRS.get(name)
        if attr is None:  # a spelling not in the table: look it up case-insensitively
            attr = HEADER_ATTRS.get(name.lower())
            if attr is None:
                return
        if attr == "host" and self.host is not None:
            raise _second_host()
        if attr == "authorization":
            if self.authorization_sent:
                raise _second_authorization()
            self.authorization_sent = True
        if attr:
            if attr == "idempotency_key" and self.idempotency_key is not None:
                raise Reject(
                    400,
                    "duplicate_idempotency_key",
                    "A request may carry only one Idempotency-Key header.",
                )
            setattr(self, attr, value)

    def on_headers_complete(self) -> None:
        self.trailing = True  # fields reported from here on are trailers
        if not self.host and self.parser.get_http_version() == "1.1":
            raise Reject(400, "missing_host", "HTTP/1.1 requests must carry a Host header.")
        # llhttp has validated Content-Length; refusing here saves reading an oversized body.
        # Most bodies have fewer digits than the limit: no int() for them.
        length = self.content_length
        if len(length) >= self.max_body_digits and int(length) > self.max_body:
            raise Reject(413, "body_too_large", f"Body exceeds {self.max_body} bytes.")
        if self.expect:
            if self.expect.lower() != b"100-continue":
                raise Reject(417, "expectation_failed", "Only 'Expect: 100-continue' is supported.")
            if self.parser.get_http_version() != "1.0":  # RFC 9110 10.1.1: 1.0 never waits for it
                self.expect_continue()

    def on_body(self, body: bytes) -> None:
        size = self.body_bytes + len(body)
        if size > self.max_body:
            raise Reject(413, "body_too_large", f"Body exceeds {self.max_body} bytes.")
        self.body_bytes = size
        if not self.body:
            self.body = body  # the usual case: one piece, kept without copying
        elif self.parts is None:
            self.parts = [self.body, body]  # chunked or split across reads: joined once, at end
        else:
            self.parts.append(body)


def _second_host() -> Reject:
    # RFC 9112 section 3.2: two Host fields could name two different targets (one seen by a
    # proxy in front, the other by us), so the request is refused whole.
    return Reject(400, "duplicate_host", "A request may carry only one Host header.")


def _second_authorization() -> Reject:
    # Two credentials: which one a proxy in front checked or logged, and which one we would, is
    # anyone's guess, so neither is used.
    return Reject(
        400, "duplicate_authorization", "A request may carry only one Authorization header."
    )


# A request line (RFC 9112 3) whose method is a token (RFC 9110 5.6.2), where a line starts.
_REQUEST_LINE = re.compile(
    rb"(?:\A|\n)([!#$%&'*+.^_`|~0-9A-Za-z-]+) [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\r?\n"
)


def unknown_method(data: bytes) -> Reject:
    """The refusal of a request llhttp stopped at its method (data: the bytes being read). A
    well-formed request line whose method llhttp does not know (FOO, BREW) asks for a method this
    server does not implement: 501 (RFC 9110 15.6.2). Anything else there is not HTTP: 400.
    Only this error path pays for finding the request line among the bytes read."""
    found = _REQUEST_LINE.findall(data)
    if found:
        method = found[-1]
        try:
            httptools.HttpRequestParser(object()).feed_data(method + b" / HTTP/1.1\r\n")
        except httptools.HttpParserInvalidMethodError:
            shown = method[:40].decode("ascii")
            return Reject(
                501,
                "method_not_implemented",
                f"Method {shown!r} is not implemented: this server answers GET, HEAD and POST.",
            )
        except httptools.HttpParserError:
            pass
    return Reject(400, "malformed_http", "Malformed HTTP request: invalid method.")
