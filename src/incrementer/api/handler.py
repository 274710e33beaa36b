"""Routes: which handler answers a request. Handlers return response bytes (or an awaitable)."""

from __future__ import annotations

import asyncio
import math
import time
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from incrementer.api.pages import StatusPage
from incrementer.auth.keyring import ClientLimiter, KeyRing, TokenBucket
from incrementer.auth.source import KeySource
from incrementer.delivery.durability import AckGate
from incrementer.delivery.flush import Flusher
from incrementer.delivery.keyed_batches import (
    REPLAYED,
    IdempotentIntake,
    Lookup,
    Outcome,
    WalUnavailable,
)
from incrementer.http import responses
from incrementer.http.protocol import FastPath, Handler, HttpConnection, Result
from incrementer.ingest.intake import Intake, Overloaded
from incrementer.ingest.validate import BadRequest, Validator
from incrementer.metrics import Metrics
from incrementer.store.base import BackendError, Store

if TYPE_CHECKING:
    from incrementer.process.group import Member

JSON = b"application/json"
FORM = b"application/x-www-form-urlencoded"
RETRY_AFTER = b"Retry-After: 1\r\n"
REPLAYED_HEADER = b"Idempotent-Replayed: true\r\n"
WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="incrementer"\r\n'
COUNTERS = b"/counters/"
HEX_DIGITS = b"0123456789abcdefABCDEF"
READ_ATTEMPTS = 5
READ_TIMEOUT = 5.0  # a read waiting on a dead database answers 503 rather than hanging


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
    "increment": (202, 400, 401, 405, 415, 429, 503),
    "increments": (202, 400, 401, 405, 415, 429, 503),
    "counters": (200, 400, 401, 404, 405, 429, 503),
    "metrics": (200, 401, 405, 429),
    "healthz": (200, 405),
    "readyz": (200, 405, 503),
    "openapi": (200, 405),
    "status": (200, 405),
    "unknown": (404,),
    "invalid": (400, 408, 413, 414, 417, 431),
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
    "empty_batch",
    "batch_too_large",
    # the routes, the guards, the buffer and the WAL
    "unsupported_media_type",
    "unauthorized",
    "rate_limited",
    "overloaded",
    "wal_unavailable",
)
NOT_FOUND = BadRequest("not_found", "No such route.", 404)
UNAUTHORIZED = BadRequest(
    "unauthorized", "A valid API key is required: Authorization: Bearer <key>.", 401
)
RATE_LIMITED = BadRequest("rate_limited", "Rate limit exceeded; slow down.", 429)
BAD_ESCAPE = BadRequest(
    "invalid_key",
    "The key is not valid percent-encoding: every % starts a two-digit hex escape (%25 for %).",
)
WAL_UNAVAILABLE = BadRequest(
    "wal_unavailable",
    "The write-ahead log could not be written, so nothing was recorded; retry shortly.",
    503,
)


def media_type(content_type: bytes) -> bytes:
    return content_type.split(b";", 1)[0].strip().lower()


class App(Handler):
    def __init__(
        self,
        validator: Validator,
        intake: Intake,
        flusher: Flusher,
        store: Store,
        gate: AckGate,
        metrics: Metrics,
        node_id: str,
        lag_bound: float,
        idempotent: IdempotentIntake,
        keyring: KeyRing | None = None,
        limiter: ClientLimiter | None = None,
        key_source: KeySource | None = None,
    ) -> None:
        self.validator = validator
        self.idempotent = idempotent
        self.intake = intake
        self.flusher = flusher
        self.store = store
        self.gate = gate
        self.metrics = metrics
        self.node_id = node_id
        self.lag_bound = lag_bound
        self.keyring = keyring
        self.limiter = limiter
        self.key_source = key_source
        self.guarded = keyring is not None or limiter is not None
        self.group: Member | None = None
        """Set in a worker of a `--workers` group: /readyz then answers for every worker."""
        self.openapi = resources.files("incrementer.api").joinpath("openapi.json").read_bytes()
        self.status_page = StatusPage.load()
        metrics.declare(
            [(route, status) for route, codes in ROUTE_STATUSES.items() for status in codes],
            REJECT_REASONS,
        )

    def fast_path(self) -> FastPath:
        """POST /increment with a JSON body: answered 202 by the connection itself when
        fast_accept takes it; anything else, and whatever it declines, goes through handle()."""
        return FastPath(b"POST", b"/increment", JSON)

    def fast_accept(self, conn: HttpConnection, body: bytes) -> bool:
        """True: the increment was taken and the connection answers 202. False: nothing was
        changed or spent, and handle() answers instead (and says what was wrong).

        With guards on, only a key already in the keyring's cache (handle() authenticates and
        caches on first sight) or a client IP that already has a bucket goes this way; a token
        taken for a body that then fails is given back, so handle() charges it exactly once.
        """
        bucket: TokenBucket | None = None
        if self.guarded:
            if self.keyring is not None:
                principal = self.keyring.cache.get(conn.authorization)
                if principal is None:
                    return False
                bucket = principal.bucket
            else:
                bucket = self.limiter.buckets.get(conn.peer) if self.limiter is not None else None
                if bucket is None:
                    return False
            if bucket is not None and bucket.take(time.monotonic()):
                return False  # refused: nothing spent; handle() answers 429
        if self.intake.accept_json(body):
            self.metrics.accepted_requests += 1
            return True
        if bucket is not None:
            bucket.refund()
        return False

    def handle(
        self,
        conn: HttpConnection,
        method: bytes,
        url: bytes,
        content_type: bytes,
        authorization: bytes,
        idempotency_key: bytes | None,
        body: bytes,
        keep_alive: bool,
    ) -> Result:
        return self.dispatch(
            conn, method, url, content_type, authorization, idempotency_key, body, keep_alive, True
        )

    def dispatch(
        self,
        conn: HttpConnection,
        method: bytes,
        url: bytes,
        content_type: bytes,
        authorization: bytes,
        idempotency_key: bytes | None,
        body: bytes,
        keep_alive: bool,
        look_up: bool,
    ) -> Result:
        """handle(), once the request's API key is known (look_up False: it was looked up)."""
        path = url.split(b"?", 1)[0]
        if path[:1] != b"/":
            path = _origin_form(path)
        if path.startswith(COUNTERS):
            route, allowed, protected = "counters", b"GET", True
        else:
            found = ROUTES.get(path)
            if found is None:
                return self.fail(conn, "unknown", NOT_FOUND, keep_alive)
            route, allowed, protected = found
        if method != allowed:
            # The pipeline answers HEAD as GET without the body, so every GET route takes it.
            methods = b"GET, HEAD" if allowed == b"GET" else allowed
            wrong = BadRequest("method_not_allowed", f"Use {methods.decode()} for this route.", 405)
            return self.fail(conn, route, wrong, keep_alive, b"Allow: " + methods + b"\r\n")
        if look_up and (protected or route == "readyz") and self.key_source is not None:
            key_id = self.key_source.wanted(authorization)
            if key_id is not None:
                return self._after_lookup(
                    key_id,
                    conn,
                    method,
                    url,
                    content_type,
                    authorization,
                    idempotency_key,
                    body,
                    keep_alive,
                )
        if protected and self.guarded:
            denied = self.guard(conn, authorization, route, keep_alive)
            if denied is not None:
                return denied
        if route == "increment":
            return self.increment(conn, content_type, body, keep_alive, idempotency_key)
        if route == "increments":
            return self.increments(conn, content_type, body, keep_alive, idempotency_key)
        if route == "counters":
            return self.counter(conn, path[len(COUNTERS) :], keep_alive)
        if route == "healthz":
            return self.ok(conn, "healthz", {"status": "ok"}, keep_alive)
        if route == "readyz":
            return self.readyz(conn, authorization, keep_alive)
        if route == "metrics":
            return self.prometheus(conn, keep_alive)
        if route == "status":
            return self.status(conn, keep_alive)
        return self.document(conn, keep_alive)

    async def _after_lookup(
        self,
        key_id: bytes,
        conn: HttpConnection,
        method: bytes,
        url: bytes,
        content_type: bytes,
        authorization: bytes,
        idempotency_key: bytes | None,
        body: bytes,
        keep_alive: bool,
    ) -> bytes:
        """A key the keyring does not know yet: ask the database (KeySource bounds how often),
        then answer as if it had been known all along."""
        assert self.key_source is not None
        await self.key_source.look_up(key_id)
        result = self.dispatch(
            conn,
            method,
            url,
            content_type,
            authorization,
            idempotency_key,
            body,
            keep_alive,
            False,
        )
        return result if isinstance(result, bytes) else await result

    def guard(
        self, conn: HttpConnection, authorization: bytes, route: str, keep_alive: bool
    ) -> bytes | None:
        """401 without a valid key (when keys are required), 429 over the rate limit."""
        bucket = None
        now = time.monotonic()
        if self.keyring is not None:
            principal = self.keyring.authenticate(authorization)
            if principal is None:
                self.metrics.count_rejected("unauthorized")
                return self.fail(conn, route, UNAUTHORIZED, keep_alive, WWW_AUTHENTICATE)
            bucket = principal.bucket
        elif self.limiter is not None:
            bucket = self.limiter.bucket(conn.peer, now)
        if bucket is not None:
            wait = bucket.take(now)
            if wait:
                self.metrics.count_rejected("rate_limited")
                retry_after = b"Retry-After: %d\r\n" % math.ceil(wait)
                return self.fail(conn, route, RATE_LIMITED, keep_alive, retry_after)
        return None

    def fail(
        self,
        conn: HttpConnection,
        route: str,
        exc: BadRequest,
        keep_alive: bool,
        headers: bytes = b"",
    ) -> bytes:
        self.metrics.count_request(route, exc.status)
        return responses.error(
            conn.clock, exc.status, exc.code, exc.detail, not keep_alive, headers
        )

    def ok(self, conn: HttpConnection, route: str, payload: object, keep_alive: bool) -> bytes:
        self.metrics.count_request(route, 200)
        return responses.json(conn.clock, 200, payload, not keep_alive)

    # ingest

    def increment(
        self,
        conn: HttpConnection,
        content_type: bytes,
        body: bytes,
        keep_alive: bool,
        idempotency_key: bytes | None = None,
    ) -> Result:
        try:
            kind = media_type(content_type)
            if kind == JSON:
                item = self.validator.json_one(body)
            elif kind == FORM:
                item = self.validator.form_one(body)
            else:
                raise _unsupported(
                    content_type, "application/json or application/x-www-form-urlencoded"
                )
            if idempotency_key is not None:  # a batch of one
                outcome = self.idempotent.take(idempotency_key, [item])
                return self.keyed(conn, "increment", outcome, keep_alive)
            self.intake.accept(item)
        except BadRequest as exc:
            self.metrics.count_rejected(exc.code)
            return self.fail(conn, "increment", exc, keep_alive)
        except Overloaded:
            return self.shed(conn, "increment", keep_alive)
        self.metrics.accepted_requests += 1
        return conn.clock.accepted if keep_alive else conn.clock.accepted_close

    def increments(
        self,
        conn: HttpConnection,
        content_type: bytes,
        body: bytes,
        keep_alive: bool,
        idempotency_key: bytes | None = None,
    ) -> Result:
        try:
            if media_type(content_type) != JSON:
                raise _unsupported(content_type, "application/json")
            items = self.validator.json_many(body)
            if idempotency_key is not None:
                outcome = self.idempotent.take(idempotency_key, items)
                return self.keyed(conn, "increments", outcome, keep_alive)
            self.intake.accept_many(items)
        except BadRequest as exc:
            self.metrics.count_rejected(exc.code)
            return self.fail(conn, "increments", exc, keep_alive)
        except Overloaded:
            return self.shed(conn, "increments", keep_alive)
        self.metrics.count_request("increments", 202)
        return conn.clock.accepted if keep_alive else conn.clock.accepted_close

    def keyed(self, conn: HttpConnection, route: str, outcome: Outcome, keep_alive: bool) -> Result:
        """The answer to a request with an Idempotency-Key, now or once the database has been
        asked (idempotent.py)."""
        if isinstance(outcome, int):
            return self.keyed_answer(conn, route, outcome, keep_alive)
        return self._keyed_later(conn, route, outcome, keep_alive)

    async def _keyed_later(
        self, conn: HttpConnection, route: str, lookup: Lookup, keep_alive: bool
    ) -> bytes:
        try:
            done = await self.idempotent.look_up(lookup)
        except BadRequest as exc:
            self.metrics.count_rejected(exc.code)
            return self.fail(conn, route, exc, keep_alive)
        except Overloaded:
            return self.shed(conn, route, keep_alive)
        except WalUnavailable:
            self.metrics.count_rejected("wal_unavailable")
            return self.fail(conn, route, WAL_UNAVAILABLE, keep_alive, RETRY_AFTER)
        return self.keyed_answer(conn, route, done, keep_alive)

    def keyed_answer(
        self, conn: HttpConnection, route: str, outcome: int, keep_alive: bool
    ) -> bytes:
        self.metrics.count_request(route, 202)
        if outcome == REPLAYED:
            return responses.build(conn.clock, 202, close=not keep_alive, headers=REPLAYED_HEADER)
        return conn.clock.accepted if keep_alive else conn.clock.accepted_close

    def shed(self, conn: HttpConnection, route: str, keep_alive: bool) -> bytes:
        self.metrics.count_rejected("overloaded")
        return self.fail(
            conn,
            route,
            BadRequest(
                "overloaded",
                "Too many distinct keys are waiting to be flushed; retry shortly.",
                503,
            ),
            keep_alive,
            RETRY_AFTER,
        )

    # reads

    def counter(self, conn: HttpConnection, raw_key: bytes, keep_alive: bool) -> Result:
        if not _well_encoded(raw_key):
            return self.fail(conn, "counters", BAD_ESCAPE, keep_alive)
        try:
            key = unquote_to_bytes(raw_key).decode("utf-8")
            self.validator.check(key, 1)
        except UnicodeDecodeError:
            return self.fail(
                conn,
                "counters",
                BadRequest("invalid_key", "The key is not valid percent-encoded UTF-8."),
                keep_alive,
            )
        except BadRequest as exc:
            return self.fail(conn, "counters", exc, keep_alive)
        return self._read(conn, key, keep_alive)

    async def _read(self, conn: HttpConnection, key: str, keep_alive: bool) -> bytes:
        for _ in range(READ_ATTEMPTS):
            commits = self.flusher.commits
            try:
                snapshot = await asyncio.wait_for(self.store.read(key, self.node_id), READ_TIMEOUT)
            except (BackendError, TimeoutError) as exc:
                return self.fail(
                    conn,
                    "counters",
                    BadRequest(
                        "database_unavailable",
                        f"The database cannot be read: {exc or 'timed out'}",
                        503,
                    ),
                    keep_alive,
                    RETRY_AFTER,
                )
            # A batch that committed during the read may or may not be in the snapshot: re-read.
            if self.flusher.commits == commits:
                break
        value, overflow, pending = self.flusher.project(
            key, snapshot.applied_seq, snapshot.value or 0
        )
        overflow += snapshot.overflow
        if snapshot.value is None and not pending and not overflow:
            return self.fail(
                conn, "counters", BadRequest("not_found", "No such counter.", 404), keep_alive
            )
        payload: dict[str, object] = {"key": key, "value": value}
        if overflow:
            payload["overflow"] = str(overflow)  # may exceed 64 bits: exact decimal text
        return self.ok(conn, "counters", payload, keep_alive)

    # operations

    def problems(self, now: float) -> list[tuple[str, float]]:
        """Why this process is not ready: (code, since when on the monotonic clock)."""
        flusher, gate = self.flusher, self.gate
        found: list[tuple[str, float]] = []
        if flusher.db_error is not None:
            found.append(("database_unavailable", flusher.db_failing_since))
        lag = flusher.oldest_pending_age(now)
        if lag > self.lag_bound:
            found.append(("lag_above_bound", now - lag))
        if gate.failure:
            found.append((gate.failure, gate.failed_since))
        return found

    def ready(self, now: float) -> bool:
        """The verdict /readyz gives (for the whole group in a `--workers` group), as a bool."""
        if self.problems(now):
            return False
        group = self.group
        return group is None or not any(peer.reasons for peer in group.peers(now))

    def readyz(self, conn: HttpConnection, authorization: bytes, keep_alive: bool) -> bytes:
        """Codes and ages for anyone (a load balancer); the why (database errors, which may name
        hosts, and overflowed key names) only for a caller with a valid API key, so never when
        keys are off: the log has it all.

        In a `--workers` group the answer is the group's: a load balancer reaches whichever
        worker the kernel picks, and must get the same verdict from each. Every reason then
        names its worker; lag is the worst and pending keys the sum (the other workers' as
        they published them, at most a quarter of a second ago)."""
        flusher, gate = self.flusher, self.gate
        now = time.monotonic()
        lag = flusher.oldest_pending_age(now)
        pending = flusher.pending_keys()
        reasons = [_reason(code, now - since) for code, since in self.problems(now)]
        group = self.group
        if group is not None:
            for reason in reasons:
                reason["worker"] = group.index
            for peer in group.peers(now):
                reasons += peer.reasons
                lag = max(lag, peer.lag)
                pending += peer.pending_keys
        payload: dict[str, object] = {
            "status": "not_ready" if reasons else "ready",
            "reasons": reasons,
            "lag_seconds": round(lag, 3),
            "lag_bound_seconds": self.lag_bound,
            "pending_keys": pending,
            "overflowed_keys": len(flusher.overflowed),
        }
        if group is not None:
            payload["worker"] = group.index
        if self.keyring is not None and self.keyring.authenticate(authorization) is not None:
            payload["details"] = {
                "database_error": flusher.db_error,
                "wal_error": gate.failure_detail or None,
                "overflowed_keys": {k: str(v) for k, v in flusher.overflowed.items()},
            }
        status = 503 if reasons else 200
        self.metrics.count_request("readyz", status)
        return responses.json(conn.clock, status, payload, not keep_alive)

    def prometheus(self, conn: HttpConnection, keep_alive: bool) -> bytes:
        self.metrics.count_request("metrics", 200)
        return responses.build(
            conn.clock,
            200,
            self.metrics.render(),
            b"text/plain; version=0.0.4; charset=utf-8",
            not keep_alive,
        )

    def status(self, conn: HttpConnection, keep_alive: bool) -> bytes:
        self.metrics.count_request("status", 200)
        page = self.status_page
        return responses.build(
            conn.clock, 200, page.body, page.content_type, not keep_alive, page.headers
        )

    def document(self, conn: HttpConnection, keep_alive: bool) -> bytes:
        self.metrics.count_request("openapi", 200)
        return responses.build(conn.clock, 200, self.openapi, JSON, not keep_alive)


def _reason(code: str, seconds: float) -> dict[str, object]:
    return {"code": code, "for_seconds": round(seconds, 3)}


def _unsupported(content_type: bytes, accepted: str) -> BadRequest:
    shown = content_type.decode("latin-1")[:100] or "(none)"
    return BadRequest(
        "unsupported_media_type",
        f"Content-Type {shown!r} is not supported by this route; send {accepted}.",
        415,
    )


def _well_encoded(raw: bytes) -> bool:
    """Every % starts a two-digit hex escape (RFC 3986 2.1); unquote would keep a stray one."""
    start = raw.find(b"%")
    while start >= 0:
        escape = raw[start + 1 : start + 3]
        if len(escape) != 2 or not all(c in HEX_DIGITS for c in escape):
            return False
        start = raw.find(b"%", start + 3)
    return True


def _origin_form(target: bytes) -> bytes:
    """`http://host/path` (absolute-form, RFC 9112 3.2.2) -> `/path`; anything else unchanged."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return target
    return b"/" + rest.partition(b"/")[2]
