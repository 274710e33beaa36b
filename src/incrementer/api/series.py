"""GET /counters/{key}/series: one key's counts per time bucket, zero-filled.

`granularity` (one of --buckets), `from` and `to` (RFC 3339 or seconds since the epoch; by
default the last DEFAULT_POINTS buckets up to now, query.py) pick the buckets; at most
--max-series-points of them. Each point is the stored bucket (store/buckets.py) plus this
process's unflushed deltas for it (Flusher.project_buckets), read consistently with the flushes
as GET /counters/{key} is: the series of a process's own increments is exact at once, other
processes' and workers' increments show once they have flushed. Buckets older than the
granularity's --bucket-retention read 0, swept yet or not.
"""

from __future__ import annotations

import time

from incrementer import periods
from incrementer.api.query import (
    ReadRoute,
    Unavailable,
    consistently,
    parse_query,
    path_key,
    unavailable,
)
from incrementer.api.routes import fail, ok
from incrementer.http import HttpConnection, Request, Result
from incrementer.ingest.validate import BadRequest
from incrementer.store.base import Window

SERIES = b"/series"
PARAMETERS = ("granularity", "from", "to")


class Series(ReadRoute):
    def series(self, conn: HttpConnection, request: Request, raw_key: bytes) -> Result:
        """raw_key: the percent-encoded path segment between /counters/ and /series."""
        keep_alive = request.keep_alive
        try:
            key = path_key(raw_key, self.validator)
            window = self.kept.window(parse_query(request.url, PARAMETERS), time.time())
        except BadRequest as exc:
            return fail(self.metrics, conn, "series", exc, keep_alive)
        return self._read(conn, key, window, keep_alive)

    async def _read(
        self, conn: HttpConnection, key: str, window: Window, keep_alive: bool
    ) -> bytes:
        try:
            snapshot = await consistently(
                self.flusher, lambda: self.store.read_series(key, window, self.node_id)
            )
        except Unavailable as exc:
            return unavailable(self.metrics, conn, "series", exc, keep_alive)
        stored = snapshot.stored.points()
        pending = self.flusher.project_buckets(
            key, window, snapshot.applied_seq, snapshot.value or 0
        )
        horizon = self.kept.horizon(window.length, time.time())
        points = []
        total = 0
        for start in range(window.start, window.end, window.length):
            value = stored.get(start, 0) + pending.get(start, 0) if start >= horizon else 0
            points.append((start, value))
            total += value
        payload: dict[str, object] = {
            "key": key,
            "granularity": periods.describe(window.length),
            "from": periods.text(window.start),
            "to": periods.text(window.end),
            "points": points,
            "sum": total,
        }
        if self.worker is not None:
            payload["worker"] = self.worker  # whose unflushed increments the points include
        return ok(self.metrics, conn, "series", payload, keep_alive)
