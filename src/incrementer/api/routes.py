"""The route table, what each route may answer, and the answers every route gives alike.

Routes are found by exact path (`/counters/{key}` and `/counters/{key}/series` by their prefix
and suffix; GET /counters is `list`, `top` or `read_many` by its query); every answer is counted in
/metrics under its route and status, and each status a route can give is exported at 0 from the
start (Metrics.declare), as is each reason an increment can be refused for.
"""

from __future__ import annotations

from incrementer.http import HttpConnection, responses
from incrementer.ingest.validate import BadRequest, looks_like_json
from incrementer.metrics import Metrics

JSON = b"application/json"
FORM = b"application/x-www-form-urlencoded"
RETRY_AFTER = b"Retry-After: 1\r\n"
WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="incrementer"\r\n'
COUNTERS = b"/counters/"
COUNTERS_ROOT = b"/counters"
SERIES = b"/series"

# path -> (route name for metrics, allowed method, needs a key when auth is on)
ROUTES = {
    b"/increment": ("increment", b"POST", True),
    b"/increments": ("increments", b"POST", True),
    b"/metrics": ("metrics", b"GET", True),
    b"/healthz": ("healthz", b"GET", False),
    b"/readyz": ("readyz", b"GET", False),
    b"/openapi.json": ("openapi", b"GET", False),
    # The page holds no figures: its script reads /metrics with the key the user types in it.
    b"/status": ("status", b"GET", False),
}
# Every status each route answers with ("invalid": requests the HTTP layer refuses before any
# route, "unknown": paths with no route) and every reason an increment is refused for: /metrics
# exports each at 0 from the start (Metrics.declare).
ROUTE_STATUSES = {
    "increment": (202, 400, 401, 403, 405, 415, 422, 429, 503),
    "increments": (202, 400, 401, 403, 405, 415, 422, 429, 503),
    "counters": (200, 400, 401, 403, 404, 405, 429, 503),
    "series": (200, 400, 401, 403, 405, 429, 503),
    "list": (200, 400, 401, 403, 405, 429, 503),
    "top": (200, 400, 401, 403, 405, 422, 429, 503),
    "read_many": (200, 400, 401, 403, 405, 429, 503),
    "metrics": (200, 401, 403, 405, 429),
    "healthz": (200, 405),
    "readyz": (200, 405, 503),
    "openapi": (200, 405),
    "status": (200, 405),
    "unknown": (404,),
    "invalid": (400, 408, 413, 414, 417, 431, 501),
}
REJECT_REASONS = (
    # ingest/validate.py
    "malformed_json",
    "malformed_form",
    "invalid_body",
    "missing_field",
    "unknown_field",
    "duplicate_field",
    "invalid_key",
    "key_too_long",
    "invalid_value",
    "value_out_of_range",
    "invalid_at",
    "at_out_of_range",
    "empty_batch",
    "batch_too_large",
    # the routes, the guards, the buffer and the WAL
    "unsupported_media_type",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "overloaded",
    "wal_unavailable",
)
NOT_FOUND = BadRequest("not_found", "No such route.", 404)
UNAUTHORIZED = BadRequest(
    "unauthorized", "A valid API key is required: Authorization: Bearer <key>.", 401
)
RATE_LIMITED = BadRequest("rate_limited", "Rate limit exceeded; slow down.", 429)


def fail(
    metrics: Metrics,
    conn: HttpConnection,
    route: str,
    exc: BadRequest,
    keep_alive: bool,
    headers: bytes = b"",
) -> bytes:
    """The JSON error answer for exc (its status, code and detail), counted under route."""
    metrics.count_request(route, exc.status)
    return responses.error(conn.clock, exc.status, exc.code, exc.detail, not keep_alive, headers)


def ok(
    metrics: Metrics, conn: HttpConnection, route: str, payload: object, keep_alive: bool
) -> bytes:
    """200 with payload as JSON, counted under route."""
    metrics.count_request(route, 200)
    return responses.json(conn.clock, 200, payload, not keep_alive)


def media_type(content_type: bytes) -> bytes:
    return content_type.split(b";", 1)[0].strip().lower()


def unsupported(content_type: bytes, accepted: str, body: bytes = b"") -> BadRequest:
    shown = content_type.decode("latin-1")[:100] or "(none)"
    hint = ""
    if looks_like_json(body) and media_type(content_type) != JSON:
        hint = " The body looks like JSON: send it with Content-Type: application/json."
    return BadRequest(
        "unsupported_media_type",
        f"Content-Type {shown!r} is not supported by this route; send {accepted}.{hint}",
        415,
    )


def origin_form(target: bytes) -> bytes:
    """`http://host/path` (absolute-form, RFC 9112 3.2.2) -> `/path`; anything else unchanged."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return target
    return b"/" + rest.partition(b"/")[2]
