"""What a request is reduced to while it is parsed: the headers kept, and how to refuse it."""

from __future__ import annotations

# Header name -> the attribute that keeps its value ("" = not needed). Usual spellings are listed
# so the hot path finds them without lowercasing; others fall back to name.lower().
_WANTED = {
    b"content-type": "content_type",
    b"content-length": "content_length",
    b"authorization": "authorization",
    b"expect": "expect",
    b"host": "host",
    b"connection": "connection",
    b"idempotency-key": "idempotency_key",
}
_IGNORED = (
    b"user-agent",
    b"accept",
    b"accept-encoding",
    b"transfer-encoding",
    b"keep-alive",
    b"cache-control",
    b"accept-language",
    b"x-forwarded-for",
)
HEADER_ATTRS: dict[bytes, str] = {}
for _name, _attr in (*_WANTED.items(), *((n, "") for n in _IGNORED)):
    HEADER_ATTRS[_name] = HEADER_ATTRS[_name.title()] = HEADER_ATTRS[_name.upper()] = _attr


class Reject(Exception):
    """Raised inside parser callbacks to answer with an error and close the connection."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def without_body(response: bytes) -> bytes:
    """A HEAD answer: the GET response's status and headers (Content-Length included), no body."""
    return response[: response.index(b"\r\n\r\n") + 4]
