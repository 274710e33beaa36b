"""GET /counters: many counters in one request, by name, by prefix, or by rank.

- `?key=a&key=b...` (route `read_many`, up to --max-read-keys keys): each key's total, as GET
  /counters/{key} reads it (persisted plus this process's unflushed delta; a key never counted
  reads 0). With `granularity` (and `from`, `to`: query.Periods.window), each key's count over
  that window instead, its buckets summed: a quota check for many keys in one request.
- `?prefix=P&limit=N&cursor=C` (route `list`): keys under P in key (code point) order, a page
  at a time. The cursor is the last key of the page (with the prefix it belongs to), so a page
  starts strictly after it whatever was inserted meanwhile: a key that existed when the listing
  began is listed exactly once, one inserted after it is listed if it sorts after the page being
  read. Values as a total's read; a key only this process holds unflushed is listed after its
  flush.
- `?prefix=P&order=value&limit=N` (route `top`): the N keys under P with the highest persisted
  values (ties by key). There is no index on value, which would turn every flush's update into
  a non-HOT one on PostgreSQL (measured: docs/performance.md); the keys under the prefix are
  scanned instead, at most TOP_SCAN of them (a broader prefix gets 422). Unflushed deltas,
  this process's included, are left out: they show within a flush interval.
"""

from __future__ import annotations

import base64
import binascii
import time

import msgspec

from incrementer import periods
from incrementer.api.query import (
    ReadRoute,
    Unavailable,
    consistently,
    number,
    parse_query,
    unavailable,
)
from incrementer.api.routes import fail, ok
from incrementer.http import HttpConnection, Request, Result
from incrementer.ingest.validate import BadRequest
from incrementer.store.base import KeyList, ManyRead, Window

PARAMETERS = ("key", "granularity", "from", "to", "prefix", "limit", "cursor", "order")
READ_MANY = ("key", "granularity", "from", "to")
LIST = ("prefix", "limit", "cursor", "order")
TOP = ("prefix", "limit", "order")
DEFAULT_LIMIT = 100
TOP_SCAN = 100_000
"""Keys under a prefix that GET /counters?order=value ranks at most (measured cost:
docs/performance.md); more, and the prefix is refused as too broad."""
_cursor_decode = msgspec.json.Decoder(tuple[str, str]).decode


def route_of(url: bytes) -> str:
    """Which of the three reads a GET /counters asks for (a malformed query is a `list`, which
    answers 400)."""
    try:
        params = parse_query(url, PARAMETERS, "key")
    except BadRequest:
        return "list"
    if "key" in params:
        return "read_many"
    return "top" if params.get("order") == ["value"] else "list"


class Listing(ReadRoute):
    def answer(self, conn: HttpConnection, request: Request, route: str) -> Result:
        keep_alive = request.keep_alive
        try:
            if route == "read_many":
                return self._read_many(conn, request, keep_alive)
            if route == "top":
                return self._top(conn, request, keep_alive)
            return self._list(conn, request, keep_alive)
        except BadRequest as exc:
            return fail(self.metrics, conn, route, exc, keep_alive)

    # --- many keys by name

    def _read_many(self, conn: HttpConnection, request: Request, keep_alive: bool) -> Result:
        params = parse_query(request.url, READ_MANY, "key")
        keys = params["key"]
        if len(keys) > self.max_keys:
            raise BadRequest(
                "too_many_keys",
                f"At most {self.max_keys} keys per request (--max-read-keys); got {len(keys)}.",
            )
        for key in keys:
            self.validator.check(key, 1)
        window = None
        if "granularity" in params:
            window = self.kept.window(params, time.time())
        elif "from" in params or "to" in params:
            raise BadRequest("invalid_granularity", "from and to need a granularity.")
        return self._many(conn, keys, window, keep_alive)

    async def _many(
        self, conn: HttpConnection, keys: list[str], window: Window | None, keep_alive: bool
    ) -> bytes:
        try:
            read = await consistently(
                self.flusher, lambda: self.store.read_many(keys, self.node_id, window)
            )
        except Unavailable as exc:
            return unavailable(self.metrics, conn, "read_many", exc, keep_alive)
        counters = [self._entry(key, read, window) for key in keys]
        payload: dict[str, object] = {"counters": counters}
        if window is not None:
            payload = {
                "granularity": periods.describe(window.length),
                "from": periods.text(window.start),
                "to": periods.text(window.end),
                "counters": counters,
            }
        if self.worker is not None:
            payload["worker"] = self.worker  # whose unflushed increments the values include
        return ok(self.metrics, conn, "read_many", payload, keep_alive)

    def _entry(self, key: str, read: ManyRead, window: Window | None) -> dict[str, object]:
        persisted, stored_overflow = read.values[key]
        if window is None:
            value, overflow, _ = self.flusher.project(key, read.applied_seq, persisted or 0)
            overflow += stored_overflow
            entry: dict[str, object] = {"key": key, "value": value}
            if overflow:
                entry["overflow"] = str(overflow)
            return entry
        horizon = self.kept.horizon(window.length, time.time())
        points = read.windows[key].points()
        pending = self.flusher.project_buckets(key, window, read.applied_seq, persisted or 0)
        total = sum(
            v
            for s, v in [*points.items(), *pending.items()]
            if window.start <= s < window.end and s >= horizon
        )
        return {"key": key, "value": total}

    # --- a page of keys under a prefix

    def _list(self, conn: HttpConnection, request: Request, keep_alive: bool) -> Result:
        params = parse_query(request.url, LIST)
        if params.get("order", ["key"]) != ["key"]:
            raise BadRequest("invalid_order", "order must be key (the default) or value.")
        prefix = params.get("prefix", [""])[0]
        limit = number(params, "limit", DEFAULT_LIMIT, self.max_keys)
        after = None
        if "cursor" in params:
            after = _after(params["cursor"][0], prefix)
        return self._page(conn, prefix, limit, after, keep_alive)

    async def _page(
        self, conn: HttpConnection, prefix: str, limit: int, after: str | None, keep_alive: bool
    ) -> bytes:
        try:
            page: KeyList = await consistently(
                self.flusher,
                lambda: self.store.list_keys(prefix, limit, after, self.node_id),
            )
        except Unavailable as exc:
            return unavailable(self.metrics, conn, "list", exc, keep_alive)
        counters = []
        for key, persisted, stored_overflow in page.rows:
            value, overflow, _ = self.flusher.project(key, page.applied_seq, persisted)
            overflow += stored_overflow
            entry: dict[str, object] = {"key": key, "value": value}
            if overflow:
                entry["overflow"] = str(overflow)
            counters.append(entry)
        last = page.rows[-1][0] if len(page.rows) == limit else None
        payload: dict[str, object] = {
            "counters": counters,
            "next": None if last is None else _cursor(prefix, last),
        }
        if self.worker is not None:
            payload["worker"] = self.worker  # whose unflushed increments the values include
        return ok(self.metrics, conn, "list", payload, keep_alive)

    # --- the top of a prefix

    def _top(self, conn: HttpConnection, request: Request, keep_alive: bool) -> Result:
        params = parse_query(request.url, TOP)
        prefix = params.get("prefix", [""])[0]
        limit = number(params, "limit", 10, self.max_keys)
        return self._ranked(conn, prefix, limit, keep_alive)

    async def _ranked(
        self, conn: HttpConnection, prefix: str, limit: int, keep_alive: bool
    ) -> bytes:
        try:
            rows, seen = await consistently(
                self.flusher, lambda: self.store.top_keys(prefix, limit, TOP_SCAN)
            )
        except Unavailable as exc:
            return unavailable(self.metrics, conn, "top", exc, keep_alive)
        if seen > TOP_SCAN:
            broad = BadRequest(
                "prefix_too_broad",
                f"More than {TOP_SCAN} keys start with this prefix; ranking them would scan "
                "them all. Rank a narrower prefix.",
                422,
            )
            return fail(self.metrics, conn, "top", broad, keep_alive)
        payload = {"counters": [{"key": key, "value": value} for key, value in rows]}
        return ok(self.metrics, conn, "top", payload, keep_alive)


def _cursor(prefix: str, last: str) -> str:
    """Opaque to clients: the prefix and the last key listed, as JSON in URL-safe base64."""
    return base64.urlsafe_b64encode(msgspec.json.encode((prefix, last))).decode().rstrip("=")


def _after(cursor: str, prefix: str) -> str:
    """The key a cursor says to continue after; BadRequest unless it was made for this prefix."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        made_for, last = _cursor_decode(raw)
    except (ValueError, binascii.Error, msgspec.DecodeError):
        made_for, last = None, ""
    if made_for != prefix or not last.startswith(prefix):
        raise BadRequest(
            "invalid_cursor", "cursor is not one this route gave for this prefix: start over."
        )
    return last
