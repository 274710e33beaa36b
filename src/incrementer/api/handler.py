"""The application's side of a connection: the fast path, routing, and the guards (API key, rate
limit) in front of every protected route. The one compiled part of api/: every request runs
through it; the routes behind it answer by their own modules (increments.py, reads.py,
series.py, listing.py, readiness.py, pages.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable

from incrementer.api.access import prefix_refused, scope_refused
from incrementer.api.increments import Increments
from incrementer.api.listing import Listing, route_of
from incrementer.api.pages import Pages
from incrementer.api.readiness import Readiness
from incrementer.api.reads import Reads
from incrementer.api.routes import (
    COUNTERS,
    COUNTERS_ROOT,
    JSON,
    NOT_FOUND,
    RATE_LIMITED,
    REJECT_REASONS,
    ROUTE_STATUSES,
    ROUTES,
    SERIES,
    UNAUTHORIZED,
    WWW_AUTHENTICATE,
    fail,
    origin_form,
)
from incrementer.api.series import Series
from incrementer.auth.budgets import charge
from incrementer.auth.keyring import ALL_SCOPES, ClientLimiter, KeyRing, Principal, TokenBucket
from incrementer.auth.source import KeySource
from incrementer.http import FastPath, Handler, HttpConnection, Request, Result, responses
from incrementer.ingest.intake import ACCOUNT, Account, Intake
from incrementer.ingest.validate import BadRequest
from incrementer.metrics import Metrics


class App(Handler):
    def __init__(
        self,
        intake: Intake,
        increments: Increments,
        reads: Reads,
        readiness: Readiness,
        pages: Pages,
        metrics: Metrics,
        keyring: KeyRing | None = None,
        limiter: ClientLimiter | None = None,
        key_source: KeySource | None = None,
        series: Series | None = None,
        listing: Listing | None = None,
    ) -> None:
        self.intake = intake
        self.increments = increments
        self.reads = reads
        self.readiness = readiness
        self.pages = pages
        self.metrics = metrics
        self.keyring = keyring
        self.limiter = limiter
        self.key_source = key_source
        self.series = series
        self.listing = listing
        self.guarded = keyring is not None or limiter is not None
        self.charged: TokenBucket | None = None
        """The bucket guard() just took a token from, for its answer's fields."""
        self.confined: Principal | None = None
        """The key guard() just let through, when it has a prefix to check the request against."""
        self.client = ""
        """Who guard() just let through: the API key's name, or the client IP."""
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
        caches on first sight) that may write anywhere (a key without the write scope, or with a
        prefix, goes through handle(), which checks both), or a client IP that already has a
        bucket goes this way; a token taken for a body that then fails is given back, so handle()
        charges it exactly once.
        """
        bucket: TokenBucket | None = None
        client = conn.peer
        if self.guarded:
            keyring = self.keyring
            if keyring is not None:
                principal = keyring.cache.get(conn.authorization)
                if principal is None or not principal.writes_anywhere:
                    return False
                if keyring.crowded:
                    keyring.used(conn.authorization, principal)
                bucket = principal.bucket
                client = principal.name
            else:
                bucket = self.limiter.buckets.get(conn.peer) if self.limiter is not None else None
                if bucket is None:
                    return False
            if bucket is not None and bucket.take(time.monotonic()):
                return False  # refused: nothing spent; handle() answers 429
        if self.intake.accept_json(body, client):
            self.metrics.accepted_requests += 1
            if bucket is not None:
                conn.accepted_fields = bucket.fields()
            return True
        if bucket is not None:
            bucket.refund()
        return False

    def handle(self, conn: HttpConnection, request: Request) -> Result:
        return self.dispatch(conn, request, True)

    def refused(self, status: int) -> None:
        self.metrics.count_request("invalid", status)

    def refused_connection(self) -> None:
        self.metrics.rejected_connections += 1

    def dispatch(self, conn: HttpConnection, request: Request, look_up: bool) -> Result:
        """handle(), once the request's API key is known (look_up False: it was looked up)."""
        keep_alive = request.keep_alive
        path = request.url.split(b"?", 1)[0]
        if path[:1] != b"/":
            path = origin_form(path)
        if path.startswith(COUNTERS):
            # /counters/{key}/series; a key that ends in /series itself is read as %2Fseries.
            series = path.endswith(SERIES) and len(path) > len(COUNTERS) + len(SERIES)
            route, allowed, protected = "series" if series else "counters", b"GET", True
        elif path == COUNTERS_ROOT:
            route, allowed, protected = route_of(request.url), b"GET", True
        else:
            found = ROUTES.get(path)
            if found is None:
                return fail(self.metrics, conn, "unknown", NOT_FOUND, keep_alive)
            route, allowed, protected = found
        if request.method != allowed:
            # The pipeline answers HEAD as GET without the body, so every GET route takes it.
            methods = b"GET, HEAD" if allowed == b"GET" else allowed
            wrong = BadRequest("method_not_allowed", f"Use {methods.decode()} for this route.", 405)
            allow = b"Allow: " + methods + b"\r\n"
            return fail(self.metrics, conn, route, wrong, keep_alive, allow)
        if look_up and (protected or route == "readyz") and self.key_source is not None:
            key_id = self.key_source.wanted(request.authorization)
            if key_id is not None:
                return self._after_lookup(key_id, conn, request)
        bucket = None
        client = conn.peer
        if protected and self.guarded:
            denied = self.guard(conn, request.authorization, route, keep_alive)
            if denied is not None:
                return denied
            confined = self.confined
            if confined is not None and confined.prefix is not None:
                self.confined = None
                refused = prefix_refused(
                    confined.prefix, route, request, path, self.increments.validator
                )
                if refused is not None:
                    self.charged = None
                    self.metrics.count_rejected("forbidden")
                    return fail(self.metrics, conn, route, refused, keep_alive)
            bucket = self.charged
            client = self.client
            self.charged = None
        if route == "increment" or route == "increments":
            return self._taken(conn, request, route, path, bucket, client)
        if bucket is not None:
            return _with_fields(self.route(conn, request, route, path), bucket.fields())
        return self.route(conn, request, route, path)

    def _taken(
        self,
        conn: HttpConnection,
        request: Request,
        route: str,
        path: bytes,
        bucket: TokenBucket | None,
        client: str,
    ) -> Result:
        """A route that takes increments, on `client`'s account: its new keys count against
        the client's share of the pending keys (ingest/intake.py), and a batch costs its rate
        limit one token per increment taken (guard() took the first)."""
        account = Account(client)
        # Not reset after the route: an answer that waits runs in a task created from this
        # context once handle() returns (the account must still be this request's there).
        ACCOUNT.set(account)
        result = self.route(conn, request, route, path)
        if bucket is None:
            return result
        if isinstance(result, bytes):
            if account.items > 1:
                charge(bucket, account.items - 1)
            return responses.with_fields(result, bucket.fields())
        return _charged_later(result, account, bucket)

    def route(self, conn: HttpConnection, request: Request, route: str, path: bytes) -> Result:
        """The answer of a route, once its guards let the request through."""
        keep_alive = request.keep_alive
        if route == "increment":
            return self.increments.one(conn, request, self.principal(conn, request))
        if route == "increments":
            return self.increments.many(conn, request, self.principal(conn, request))
        if route == "counters":
            return self.reads.counter(conn, path[len(COUNTERS) :], keep_alive)
        if route == "series" and self.series is not None:
            return self.series.series(conn, request, path[len(COUNTERS) : -len(SERIES)])
        if route in ("list", "top", "read_many") and self.listing is not None:
            return self.listing.answer(conn, request, route)
        if route == "readyz":
            return self.readiness.readyz(conn, request.authorization, keep_alive)
        pages = self.pages
        if route == "healthz":
            return pages.healthz(conn, keep_alive)
        if route == "metrics":
            return pages.prometheus(conn, keep_alive)
        if route == "status":
            return pages.status(conn, keep_alive)
        return pages.document(conn, keep_alive)

    def principal(self, conn: HttpConnection, request: Request) -> str:
        """Whose a request's Idempotency-Key is: `key:NAME` (its API key's name) with keys on,
        `ip:ADDRESS` (its client's) with them off; "" for a request without the header."""
        if request.idempotency_key is None:
            return ""
        if self.keyring is not None:
            found = self.keyring.authenticate(request.authorization)  # guard() let it through
            return "key:" + ("" if found is None else found.name)  # no key's name is blank
        return "ip:" + conn.peer

    async def _after_lookup(self, key_id: bytes, conn: HttpConnection, request: Request) -> bytes:
        """A key the keyring does not know yet: ask the database (KeySource bounds how often),
        then answer as if it had been known all along."""
        assert self.key_source is not None
        await self.key_source.look_up(key_id, conn.peer)
        result = self.dispatch(conn, request, False)
        return result if isinstance(result, bytes) else await result

    def guard(
        self, conn: HttpConnection, authorization: bytes, route: str, keep_alive: bool
    ) -> bytes | None:
        """401 without a valid key (when keys are required), 403 for a key without the route's
        scope, 429 over the rate limit (with the limit's fields and Retry-After). Let through,
        the request's bucket is `charged`, so its answer carries the fields too, and a key with
        a prefix is `confined`, for dispatch() to check the request's counters against it."""
        bucket = None
        confined = None
        now = time.monotonic()
        if self.keyring is not None:
            principal = self.keyring.authenticate(authorization)
            if principal is None:
                self.metrics.count_rejected("unauthorized")
                return fail(self.metrics, conn, route, UNAUTHORIZED, keep_alive, WWW_AUTHENTICATE)
            if principal.scopes != ALL_SCOPES:
                refused = scope_refused(route, principal.scopes)
                if refused is not None:
                    self.metrics.count_rejected("forbidden")
                    return fail(self.metrics, conn, route, refused, keep_alive)
            if principal.prefix is not None:
                confined = principal
            bucket = principal.bucket
            self.client = principal.name
        elif self.limiter is not None:
            bucket = self.limiter.bucket(conn.peer, now)
            self.client = conn.peer
        if bucket is not None:
            wait = bucket.take(now)
            if wait:
                self.metrics.count_rejected("rate_limited")
                headers = b"Retry-After: %d\r\n" % math.ceil(wait) + bucket.fields()
                return fail(self.metrics, conn, route, RATE_LIMITED, keep_alive, headers)
        # Set only for a request let through: dispatch() takes both back at once.
        self.charged = bucket
        self.confined = confined
        return None


def _with_fields(result: Result, fields: bytes) -> Result:
    """A route's answer with a rate limit's header fields."""
    if isinstance(result, bytes):
        return responses.with_fields(result, fields)
    return _later_with_fields(result, fields)


async def _later_with_fields(result: Awaitable[bytes], fields: bytes) -> bytes:
    return responses.with_fields(await result, fields)


async def _charged_later(result: Awaitable[bytes], account: Account, bucket: TokenBucket) -> bytes:
    """_taken()'s charge and fields for an answer that waited (an idempotent batch is taken in
    after a database lookup)."""
    answer = await result
    if account.items > 1:
        charge(bucket, account.items - 1)
    return responses.with_fields(answer, bucket.fields())
