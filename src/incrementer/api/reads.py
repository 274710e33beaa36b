"""GET /counters/{key}: the persisted value plus this process's unflushed delta.

In a `--workers` group that is the answering worker's delta only, and the answer says which
worker answered (`worker`): another worker's increments show once it flushes them (within its
flush interval), as another instance's always have. Adding the whole group's would make every
read wait on every worker, a stuck one included, for a view that is still not the fleet's.

The read and the flush race: a batch that commits while the store is read may or may not be in
the snapshot, so the read is repeated (query.consistently) until no commit happened during it;
the flusher then projects what it holds that the snapshot does not (Flusher.project).
"""

from __future__ import annotations

from incrementer.api.query import ReadRoute, Unavailable, consistently, path_key, unavailable
from incrementer.api.routes import fail, ok
from incrementer.http import HttpConnection, Result
from incrementer.ingest.validate import BadRequest

NO_SUCH_COUNTER = BadRequest(
    "not_found",
    "No such counter: the database has none, and the process that answered holds no unflushed "
    "increment to it. Unflushed increments on other instances (or other --workers processes) "
    "are not included: they count here once flushed, normally within a second. To read your own "
    "writes at once, read on the connection that wrote them.",
    404,
)


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
        if self.worker is not None:
            payload["worker"] = self.worker  # whose unflushed increments `value` includes
        return ok(self.metrics, conn, "counters", payload, keep_alive)
