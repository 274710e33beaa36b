"""What a request is reduced to: the headers kept while it is parsed, how to refuse it, and the
Request a handler is given once it is complete."""

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


class Request:
    """A complete request, as a handler sees it (not made for the fast path, which the connection
    answers from its own fields)."""

    __slots__ = (
        "announce",
        "authorization",
        "body",
        "content_type",
        "head",
        "idempotency_key",
        "keep_alive",
        "method",
        "url",
    )

    def __init__(
        self,
        method: bytes,
        url: bytes,
        content_type: bytes,
        authorization: bytes,
        idempotency_key: bytes | None,
        body: bytes,
        keep_alive: bool,
        announce: bool,
    ) -> None:
        self.head = method == b"HEAD"
        self.method = b"GET" if self.head else method  # HEAD is answered as GET, without the body
        self.url = url
        self.content_type = content_type
        self.authorization = authorization
        self.idempotency_key = idempotency_key  # None: no Idempotency-Key header
        self.body = body
        self.keep_alive = keep_alive
        self.announce = announce  # the answer says Connection: keep-alive (an HTTP/1.0 client)


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
