"""GET /counters/{key}: the persisted value plus this process's unflushed delta.

In a `--workers` group that is the answering worker's delta only, and the answer says which
worker answered (`worker`): another worker's increments show once it flushes them (within its
flush interval), as another instance's always have. Adding the whole group's would make every
read wait on every worker, a stuck one included, for a view that is still not the fleet's.

The read and the flush race: a batch that commits while the store is read may or may not be in
the snapshot, so the read is repeated (up to READ_ATTEMPTS) until no commit happened during it;
the flusher then projects what it holds that the snapshot does not (Flusher.project).
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote_to_bytes

from incrementer.api.routes import RETRY_AFTER, fail, ok
from incrementer.delivery.flush import Flusher
from incrementer.http import HttpConnection, Result
from incrementer.ingest.validate import BadRequest, Validator
from incrementer.metrics import Metrics
from incrementer.store.base import BackendError, Store

HEX_DIGITS = b"0123456789abcdefABCDEF"
READ_ATTEMPTS = 5
READ_TIMEOUT = 5.0  # a read waiting on a dead database answers 503 rather than hanging
BAD_ESCAPE = BadRequest(
    "invalid_key",
    "The key is not valid percent-encoding: every % starts a two-digit hex escape (%25 for %).",
)
BAD_UTF8 = BadRequest("invalid_key", "The key is not valid percent-encoded UTF-8.")
NO_SUCH_COUNTER = BadRequest(
    "not_found",
    "No such counter: the database has none, and the process that answered holds no unflushed "
    "increment to it. Unflushed increments on other instances (or other --workers processes) "
    "are not included: they count here once flushed, normally within a second. To read your own "
    "writes at once, read on the connection that wrote them.",
    404,
)


class Reads:
    def __init__(
        self,
        validator: Validator,
        store: Store,
        flusher: Flusher,
        node_id: str,
        metrics: Metrics,
        worker: int | None = None,
    ) -> None:
        self.worker = worker
        """This worker's index in its `--workers` group, None for a process alone."""
        self.validator = validator
        self.store = store
        self.flusher = flusher
        self.node_id = node_id
        self.metrics = metrics

    def counter(self, conn: HttpConnection, raw_key: bytes, keep_alive: bool) -> Result:
        """raw_key: the percent-encoded path segment after /counters/."""
        if not _well_encoded(raw_key):
            return fail(self.metrics, conn, "counters", BAD_ESCAPE, keep_alive)
        try:
            key = unquote_to_bytes(raw_key).decode("utf-8")
            self.validator.check(key, 1)
        except UnicodeDecodeError:
            return fail(self.metrics, conn, "counters", BAD_UTF8, keep_alive)
        except BadRequest as exc:
            return fail(self.metrics, conn, "counters", exc, keep_alive)
        return self._read(conn, key, keep_alive)

    async def _read(self, conn: HttpConnection, key: str, keep_alive: bool) -> bytes:
        for _ in range(READ_ATTEMPTS):
            commits = self.flusher.commits
            try:
                snapshot = await asyncio.wait_for(self.store.read(key, self.node_id), READ_TIMEOUT)
            except (BackendError, TimeoutError) as exc:
                unavailable = BadRequest(
                    "database_unavailable",
                    f"The database cannot be read: {exc or 'timed out'}",
                    503,
                )
                return fail(self.metrics, conn, "counters", unavailable, keep_alive, RETRY_AFTER)
            # A batch that committed during the read may or may not be in the snapshot: re-read.
            if self.flusher.commits == commits:
                break
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


def _well_encoded(raw: bytes) -> bool:
    """Every % starts a two-digit hex escape (RFC 3986 2.1); unquote would keep a stray one."""
    start = raw.find(b"%")
    while start >= 0:
        escape = raw[start + 1 : start + 3]
        if len(escape) != 2 or not all(c in HEX_DIGITS for c in escape):
            return False
        start = raw.find(b"%", start + 3)
    return True
