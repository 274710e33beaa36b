"""Responses as bytes. The hot ones are pre-built and refreshed once a second with the Date."""

from __future__ import annotations

from email.utils import formatdate
from http import HTTPStatus

import msgspec

_encode = msgspec.json.encode


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()


_STATUS_LINES = {s.value: _status_line(s.value) for s in HTTPStatus if s.value >= 200}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
SERVER = b"Server: incrementer\r\n"
KEEP_ALIVE = b"Connection: keep-alive\r\n"


class Clock:
    """Coarse wall and monotonic time plus the Date header, refreshed by the server once a second."""

    __slots__ = (
        "accepted",
        "accepted_close",
        "accepted_head",
        "accepted_keep_alive",
        "date",
        "now",
    )

    def __init__(self, now: float) -> None:
        self.refresh(now)

    def refresh(self, now: float) -> None:
        self.now = now
        self.date = b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
        self.accepted = build(self, 202)
        self.accepted_close = build(self, 202, close=True)
        self.accepted_keep_alive = build(self, 202, headers=KEEP_ALIVE)  # for HTTP/1.0 clients
        self.accepted_head = _STATUS_LINES[202] + SERVER + self.date  # a 202 with fields of its own


def build(
    clock: Clock,
    status: int,
    body: bytes = b"",
    content_type: bytes = b"",
    close: bool = False,
    headers: bytes = b"",
) -> bytes:
    head = [_STATUS_LINES[status], SERVER, clock.date, headers]
    if content_type:
        head.append(b"Content-Type: " + content_type + b"\r\n")
    head.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


EMPTY_KEPT = b"Content-Length: 0\r\n\r\n"
EMPTY_CLOSED = b"Content-Length: 0\r\nConnection: close\r\n\r\n"


def accepted(clock: Clock, fields: bytes, close: bool, http10: bool) -> bytes:
    """A 202 with header lines of the handler's own (a rate limit's fields), which no
    pre-built one has: the pre-built head and tail around them, as build() would make it."""
    if http10:
        fields += KEEP_ALIVE
    return clock.accepted_head + fields + (EMPTY_CLOSED if close else EMPTY_KEPT)


def with_fields(response: bytes, fields: bytes) -> bytes:
    """The response with `fields` (complete header lines) after its status line."""
    line_end = response.index(b"\r\n") + 2
    return response[:line_end] + fields + response[line_end:]


def kept_alive(response: bytes) -> bytes:
    """The response with `Connection: keep-alive`: an HTTP/1.0 client that asked to keep the
    connection reuses it only when told so, and otherwise waits for the close."""
    return with_fields(response, KEEP_ALIVE)


def json(
    clock: Clock, status: int, payload: object, close: bool = False, headers: bytes = b""
) -> bytes:
    return build(clock, status, _encode(payload), b"application/json", close, headers)


def error(
    clock: Clock, status: int, code: str, detail: str, close: bool = False, headers: bytes = b""
) -> bytes:
    return json(clock, status, {"error": code, "detail": detail}, close, headers)
