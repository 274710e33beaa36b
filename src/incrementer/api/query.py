"""What the read routes share: a key from the path, the query string, time windows, and a read
that is consistent with this process's flushes.

A query string is read strictly, as a JSON body is: an unknown parameter, one given twice (but
`key`, which repeats), or an escape that is not `%` and two hex digits is a 400 that names it.
`+` is a space, as HTML forms and most HTTP clients encode one (send `%2B` for a plus sign).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import unquote_to_bytes

from incrementer import periods
from incrementer.api.routes import RETRY_AFTER, fail
from incrementer.delivery.flush import Flusher
from incrementer.http import HttpConnection
from incrementer.ingest.validate import BadRequest, Validator
from incrementer.metrics import Metrics
from incrementer.store.base import BackendError, Store, Window

T = TypeVar("T")
HEX_DIGITS = b"0123456789abcdefABCDEF"
READ_ATTEMPTS = 5
READ_TIMEOUT = 5.0  # a read waiting on a dead database answers 503 rather than hanging
BAD_ESCAPE = BadRequest(
    "invalid_key",
    "The key is not valid percent-encoding: every % starts a two-digit hex escape (%25 for %).",
)
BAD_UTF8 = BadRequest("invalid_key", "The key is not valid percent-encoded UTF-8.")
# How many buckets back a series or a window starts when `from` is not given: an hour of
# minutes, a day of hours, 30 days.
DEFAULT_POINTS = {60: 60, 3600: 24, 86400: 30}


class Unavailable(Exception):
    """The database could not be read (failed, or no answer within READ_TIMEOUT)."""


def well_encoded(raw: bytes) -> bool:
    """Every % starts a two-digit hex escape (RFC 3986 2.1); unquote would keep a stray one."""
    start = raw.find(b"%")
    while start >= 0:
        escape = raw[start + 1 : start + 3]
        if len(escape) != 2 or not all(c in HEX_DIGITS for c in escape):
            return False
        start = raw.find(b"%", start + 3)
    return True


def path_key(raw: bytes, validator: Validator) -> str:
    """The counter key of a percent-encoded path segment, checked as an increment's key is."""
    if not well_encoded(raw):
        raise BAD_ESCAPE
    try:
        key = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BAD_UTF8 from None
    validator.check(key, 1)
    return key


def parse_query(url: bytes, allowed: tuple[str, ...], repeated: str = "") -> dict[str, list[str]]:
    """The query string's parameters (name -> values, in order), each one of `allowed`; only
    `repeated` may appear more than once."""
    query = url.partition(b"?")[2]
    found: dict[str, list[str]] = {}
    for part in query.split(b"&") if query else []:
        raw_name, _, raw_value = part.partition(b"=")
        name, value = _component(raw_name, "parameter name"), _component(raw_value, "value")
        if name not in allowed:
            raise BadRequest(
                "unknown_parameter",
                f"Unknown query parameter {name[:40]!r}; this route takes {', '.join(allowed)}.",
            )
        if name in found and name != repeated:
            raise BadRequest("duplicate_parameter", f"Query parameter {name!r} appears twice.")
        found.setdefault(name, []).append(value)
    return found


def _component(raw: bytes, what: str) -> str:
    if not well_encoded(raw):
        raise BadRequest(
            "invalid_query", f"A query {what} is not valid percent-encoding (%25 for %)."
        )
    try:
        return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("invalid_query", f"A query {what} is not valid UTF-8.") from None


def number(params: dict[str, list[str]], name: str, default: int, highest: int) -> int:
    """A whole-number parameter between 1 and `highest`."""
    if name not in params:
        return default
    text = params[name][0]
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= highest:
        raise BadRequest(f"invalid_{name}", f"{name} must be a whole number from 1 to {highest}.")
    return int(text)


class Periods:
    """The time buckets this service keeps, as the read routes need them."""

    def __init__(
        self,
        granularities: tuple[int, ...],
        retention: dict[int, int | None],
        max_points: int,
    ) -> None:
        self.granularities = granularities
        self.retention = retention
        self.max_points = max_points

    def window(self, params: dict[str, list[str]], now: float) -> Window:
        """The buckets a read asks for: `granularity`, `from` (default: DEFAULT_POINTS buckets
        before `to`) and `to` (default: now), each bucket that overlaps [from, to). The start
        is clamped to the retention's horizon: older buckets are gone (or about to be)."""
        length = self.granularity(params)
        end_at = _time(params, "to", now)
        end = periods.bucket_start(int(end_at), length)
        if end < end_at or "to" not in params:
            end += length  # the bucket holding `to` (its current one, by default)
        if "from" in params:
            start = periods.bucket_start(int(_time(params, "from", now)), length)
        else:
            start = end - DEFAULT_POINTS.get(length, 60) * length
        if start >= end:
            raise BadRequest("invalid_range", "from must lie before to.")
        points = (end - start) // length
        if points > self.max_points:
            raise BadRequest(
                "too_many_points",
                f"The range spans {points} {periods.describe(length)} buckets; at most "
                f"{self.max_points} (--max-series-points): ask for a coarser granularity or a "
                "shorter range.",
            )
        return Window(length, start, end)

    def granularity(self, params: dict[str, list[str]]) -> int:
        kept = ", ".join(periods.describe(g) for g in self.granularities)
        if not self.granularities:
            raise BadRequest(
                "invalid_granularity",
                "This service keeps no time buckets (it runs without --buckets).",
            )
        name = params.get("granularity", [""])[0]
        length = periods.GRANULARITIES.get(name)
        if length not in self.granularities:
            raise BadRequest(
                "invalid_granularity",
                f"granularity must be one of the kept ones: {kept} (got {name[:20]!r}).",
            )
        return length

    def horizon(self, length: int, now: float) -> int:
        return periods.horizon(length, self.retention.get(length), now)


class ReadRoute:
    """What every read route holds: the key rules, the store, the flusher whose unflushed
    deltas a read adds, this node's id (its applied_seq in the ledger), the metrics, the time
    buckets kept, the most keys one read may name (--max-read-keys), and, in a `--workers`
    group, this worker's index: the answers that add unflushed deltas name the worker whose
    they are."""

    def __init__(
        self,
        validator: Validator,
        store: Store,
        flusher: Flusher,
        node_id: str,
        metrics: Metrics,
        kept: Periods,
        max_keys: int,
        worker: int | None = None,
    ) -> None:
        self.validator = validator
        self.store = store
        self.flusher = flusher
        self.node_id = node_id
        self.metrics = metrics
        self.kept = kept
        self.max_keys = max_keys
        self.worker = worker
        """This worker's index in its `--workers` group, None for a process alone."""


def _time(params: dict[str, list[str]], name: str, now: float) -> float:
    if name not in params:
        return now
    try:
        return periods.parse_time(params[name][0])
    except ValueError as exc:
        raise BadRequest("invalid_time", f"{name} {exc}.") from None


async def consistently(flusher: Flusher, read: Callable[[], Awaitable[T]]) -> T:
    """read() again, up to READ_ATTEMPTS times, while a flush commits during it: a batch that
    committed meanwhile may or may not be in its snapshot, and the caller projects this node's
    unflushed deltas on top by the snapshot's applied_seq. Unavailable on a database failure."""
    for _ in range(READ_ATTEMPTS):
        commits = flusher.commits
        try:
            result = await asyncio.wait_for(read(), READ_TIMEOUT)
        except (BackendError, TimeoutError) as exc:
            raise Unavailable(str(exc) or "timed out") from exc
        if flusher.commits == commits:
            break
    return result


def unavailable(
    metrics: Metrics, conn: HttpConnection, route: str, exc: Unavailable, keep_alive: bool
) -> bytes:
    failed = BadRequest("database_unavailable", f"The database cannot be read: {exc}", 503)
    return fail(metrics, conn, route, failed, keep_alive, RETRY_AFTER)
