"""POST /increment and POST /increments, when the connection's fast path did not answer: forms,
batches, Idempotency-Key, and every refusal with its reason (the fast path is handler.py's)."""

from __future__ import annotations

import math

from incrementer.api.routes import FORM, JSON, RETRY_AFTER, fail, media_type, unsupported
from incrementer.delivery.keyed_batches import (
    REPLAYED,
    KeyedBatches,
    Lookup,
    Outcome,
    TooManyKeys,
    WalUnavailable,
)
from incrementer.http import HttpConnection, Request, Result, responses
from incrementer.ingest.intake import Intake, Overloaded
from incrementer.ingest.validate import BadRequest, Validator
from incrementer.metrics import Metrics

REPLAYED_HEADER = b"Idempotent-Replayed: true\r\n"
WAL_UNAVAILABLE = BadRequest(
    "wal_unavailable",
    "The write-ahead log could not be written, so nothing was recorded; retry shortly.",
    503,
)
OVERLOADED = BadRequest(
    "overloaded", "Too many distinct keys are waiting to be flushed; retry shortly.", 503
)


class Increments:
    def __init__(
        self, validator: Validator, intake: Intake, keyed: KeyedBatches, metrics: Metrics
    ) -> None:
        self.validator = validator
        self.intake = intake
        self.keyed = keyed
        self.metrics = metrics

    def one(self, conn: HttpConnection, request: Request, principal: str) -> Result:
        """POST /increment: a JSON object or a form. `principal`: whose Idempotency-Key the
        request's is (`key:NAME` or `ip:ADDRESS`)."""
        keep_alive = request.keep_alive
        try:
            kind = media_type(request.content_type)
            at_ms = 0
            if kind == JSON:
                item, at_ms = self.validator.json_one(request.body)
            elif kind == FORM:
                item = self.validator.form_one(request.body)
            else:
                raise unsupported(
                    request.content_type,
                    "application/json or application/x-www-form-urlencoded",
                    request.body,
                )
            if request.idempotency_key is not None:  # a batch of one
                times = [at_ms] if at_ms else None
                outcome = self.keyed.take(principal, request.idempotency_key, [item], times)
                return self._keyed(conn, "increment", outcome, keep_alive)
            self.intake.accept(item, at_ms)
        except BadRequest as exc:
            self.metrics.count_rejected(exc.code)
            return fail(self.metrics, conn, "increment", exc, keep_alive)
        except Overloaded:
            return self._shed(conn, "increment", keep_alive)
        except TooManyKeys as exc:
            return self._too_many(conn, "increment", exc, keep_alive)
        self.metrics.accepted_requests += 1
        return conn.clock.accepted if keep_alive else conn.clock.accepted_close

    def many(self, conn: HttpConnection, request: Request, principal: str) -> Result:
        """POST /increments: a JSON array, all or nothing. `principal` as for one()."""
        keep_alive = request.keep_alive
        try:
            if media_type(request.content_type) != JSON:
                raise unsupported(request.content_type, "application/json", request.body)
            items, times = self.validator.json_many(request.body)
            if request.idempotency_key is not None:
                outcome = self.keyed.take(principal, request.idempotency_key, items, times or None)
                return self._keyed(conn, "increments", outcome, keep_alive)
            self.intake.accept_many(items, times or None)
        except BadRequest as exc:
            self.metrics.count_rejected(exc.code)
            return fail(self.metrics, conn, "increments", exc, keep_alive)
        except Overloaded:
            return self._shed(conn, "increments", keep_alive)
        except TooManyKeys as exc:
            return self._too_many(conn, "increments", exc, keep_alive)
        self.metrics.count_request("increments", 202)
        return conn.clock.accepted if keep_alive else conn.clock.accepted_close

    def _keyed(
        self, conn: HttpConnection, route: str, outcome: Outcome, keep_alive: bool
    ) -> Result:
        """The answer to a request with an Idempotency-Key, now or once the database has been
        asked (delivery/keyed_batches.py)."""
        if isinstance(outcome, int):
            return self._keyed_answer(conn, route, outcome, keep_alive)
        return self._keyed_later(conn, route, outcome, keep_alive)

    async def _keyed_later(
        self, conn: HttpConnection, route: str, lookup: Lookup, keep_alive: bool
    ) -> bytes:
        try:
            done = await self.keyed.look_up(lookup)
        except BadRequest as exc:
            self.metrics.count_rejected(exc.code)
            return fail(self.metrics, conn, route, exc, keep_alive)
        except Overloaded:
            return self._shed(conn, route, keep_alive)
        except TooManyKeys as exc:
            return self._too_many(conn, route, exc, keep_alive)
        except WalUnavailable:
            self.metrics.count_rejected("wal_unavailable")
            return fail(self.metrics, conn, route, WAL_UNAVAILABLE, keep_alive, RETRY_AFTER)
        return self._keyed_answer(conn, route, done, keep_alive)

    def _keyed_answer(
        self, conn: HttpConnection, route: str, outcome: int, keep_alive: bool
    ) -> bytes:
        self.metrics.count_request(route, 202)
        if outcome == REPLAYED:
            return responses.build(conn.clock, 202, close=not keep_alive, headers=REPLAYED_HEADER)
        return conn.clock.accepted if keep_alive else conn.clock.accepted_close

    def _too_many(
        self, conn: HttpConnection, route: str, exc: TooManyKeys, keep_alive: bool
    ) -> bytes:
        refusal = exc.refusal
        self.metrics.count_rejected(refusal.code)
        wait = b"Retry-After: %d\r\n" % max(1, math.ceil(exc.wait))
        return fail(self.metrics, conn, route, refusal, keep_alive, wait)

    def _shed(self, conn: HttpConnection, route: str, keep_alive: bool) -> bytes:
        self.metrics.count_rejected("overloaded")
        return fail(self.metrics, conn, route, OVERLOADED, keep_alive, RETRY_AFTER)
