"""GET /counters/{key}: the persisted value plus this process's unflushed delta.

The read and the flush race: a batch that commits while the store is read may or may not be in
the snapshot, so the read is repeated (query.consistently) until no commit happened during it;
the flusher then projects what it holds that the snapshot does not (Flusher.project).
"""

from __future__ import annotations

from incrementer.api.query import ReadRoute, Unavailable, consistently, path_key, unavailable
from incrementer.api.routes import fail, ok
from incrementer.http import HttpConnection, Result
from incrementer.ingest.validate import BadRequest

NO_SUCH_COUNTER = BadRequest("not_found", "No such counter.", 404)


class Reads(ReadRoute):
    def counter(self, conn: HttpConnection, raw_key: bytes, keep_alive: bool) -> Result:
        """raw_key: the percent-encoded path segment after /counters/."""
        try:
            key = path_key(raw_key, self.validator)
        except BadRequest as exc:
            return fail(self.metrics, conn, "counters", exc, keep_alive)
        return self._read(conn, key, keep_alive)

    async def _read(self, conn: HttpConnection, key: str, keep_alive: bool) -> bytes:
        try:
            snapshot = await consistently(self.flusher, lambda: self.store.read(key, self.node_id))
        except Unavailable as exc:
            return unavailable(self.metrics, conn, "counters", exc, keep_alive)
        value, overflow, pending = self.flusher.project(
            key, snapshot.applied_seq, snapshot.value or 0
        )
        overflow += snapshot.overflow
        if snapshot.value is None and not pending and not overflow:
            return fail(self.metrics, conn, "counters", NO_SUCH_COUNTER, keep_alive)
        payload: dict[str, object] = {"key": key, "value": value}
        if overflow:
            payload["overflow"] = str(overflow)  # may exceed 64 bits: exact decimal text
        return ok(self.metrics, conn, "counters", payload, keep_alive)
