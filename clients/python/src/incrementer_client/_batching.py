"""The model both clients share, without I/O: counts coalesced per key, cut into batches that
each carry their own Idempotency-Key, and what an answer means for a batch.

A batch keeps its key, body and increments until the server has answered it for good: every
retry sends the same bytes under the same key, so the server applies it once however many of
the attempts reached it. A batch the server refused whole without applying anything (400, 413,
422) may be split or re-keyed safely: nothing of it counted.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from time import time
from typing import Final, Literal, NamedTuple

from incrementer_client._endpoint import permanent

log = logging.getLogger("incrementer_client")

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
# C0 and C1 controls and DEL, which the server refuses in keys.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Retry-After values past this are treated as this: a retry is never put off for hours.
MAX_RETRY_AFTER: Final = 300.0
# One item of a RateLimit field (draft-ietf-httpapi-ratelimit-headers): the remaining quota r
# and, when more is coming, the seconds t until it does.
_RATELIMIT_ITEM = re.compile(r'^\s*"[^"]*"((?:;[a-z][a-z0-9*_.-]*=[^;,]*)*)\s*$')


class Full(Exception):
    """More than max_pending distinct keys wait to be sent (the server is unreachable or slower
    than the caller); raised by incr() unless the client was made with when_full="block"."""


class Refused(Exception):
    """The server refused increments for good (a 4xx that no retry changes): they were dropped.
    Raised by flush() for what was refused since the previous flush."""


@dataclass
class ClientStats:
    """Counts since the client was made; increments are incr() calls."""

    acknowledged: int = 0
    """Increments the server has acknowledged (202): they count exactly once."""
    batches: int = 0
    """Batches acknowledged."""
    replayed: int = 0
    """Batches whose acknowledgement said Idempotent-Replayed: an earlier attempt had reached the
    server, and this one changed nothing."""
    retries: int = 0
    """Attempts that failed and were retried under the same key."""
    dropped: int = 0
    """Increments given up: refused by the server, or still failing after retry_for."""
    pending: int = 0
    """Increments not yet acknowledged or dropped."""


class Batch:
    """One POST /increments: its key, its body and the increments in it."""

    __slots__ = ("body", "calls", "first_attempt", "items", "key", "times")

    def __init__(
        self, items: list[tuple[str, int]], calls: int, times: list[int] | None = None
    ) -> None:
        self.items = items
        self.times = times or []
        """Each item's own time, whole seconds since the epoch (0: none); [] when no item has
        one."""
        self.calls = calls
        """incr() calls folded into it (for the stats)."""
        self.key = str(uuid.uuid4())
        self.body = encode(items, self.times)
        self.first_attempt = 0.0

    def halves(self) -> list[Batch]:
        """Two new batches (new keys) of its increments: for a batch the server refused whole."""
        middle = len(self.items) // 2
        calls = self.calls * middle // len(self.items)
        times = self.times
        return [
            Batch(self.items[:middle], calls, times[:middle]),
            Batch(self.items[middle:], self.calls - calls, times[middle:]),
        ]

    def rekeyed(self) -> Batch:
        return Batch(self.items, self.calls, self.times)


def encode(items: list[tuple[str, int]], times: list[int] | None = None) -> bytes:
    """The JSON body of POST /increments. Keys hold no control characters (incr refuses them),
    so only a quote or a backslash needs escaping: without either, plain formatting writes the
    same JSON as json.dumps at a quarter of its cost. `times`: each item's "at" in seconds
    since the epoch (0: none)."""
    keys = "".join([key for key, _ in items])
    stamps = times or [0] * len(items)
    if '"' in keys or "\\" in keys:
        return json.dumps(
            [
                {"key": key, "value": value, **({"at": at} if at else {})}
                for (key, value), at in zip(items, stamps, strict=True)
            ],
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
    return (
        "["
        + ",".join(
            [
                f'{{"key":"{k}","value":{v},"at":{at}}}' if at else f'{{"key":"{k}","value":{v}}}'
                for (k, v), at in zip(items, stamps, strict=True)
            ]
        )
        + "]"
    ).encode()


def at_seconds(at: datetime | float) -> int:
    """An increment's time as whole seconds since the epoch (rounded down: a bucket, a minute
    at the finest, starts on a whole second, so this never moves an increment to another)."""
    if isinstance(at, datetime):
        if at.tzinfo is None:
            raise ValueError(
                "at must be an aware datetime (with a tzinfo), or seconds since the epoch"
            )
        seconds = at.timestamp()
    elif isinstance(at, int | float) and not isinstance(at, bool):
        seconds = float(at)
    else:
        raise TypeError(
            f"at must be a datetime or seconds since the epoch, got {type(at).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"at must be a time after 1970, got {at!r}")
    return math.floor(seconds)


WhenFull = Literal["raise", "block"]


def check_options(flush_interval: float, when_full: str) -> None:
    """The options Client and AsyncClient check alike, before anything starts (Pending checks
    the sizes)."""
    if flush_interval <= 0:
        raise ValueError(f"flush_interval must be positive, got {flush_interval!r}")
    if when_full not in ("raise", "block"):
        raise ValueError(f"when_full must be 'raise' or 'block', got {when_full!r}")


def full(pending: Pending, url: object, last_error: str | None) -> Full:
    """What incr() raises, with when_full="raise", for a new key when max_pending are held."""
    return Full(
        f"{pending.max_pending} keys are waiting to be sent to {url}"
        f" (last error: {last_error or 'none'})"
    )


class Pending:
    """Increments not yet cut into batches: key -> summed value. Not thread-safe: the sync
    client holds its lock around every call, the async one runs on one loop."""

    def __init__(
        self,
        max_pending: int,
        max_batch: int,
        max_body_bytes: int,
        max_key_bytes: int,
        allow_negative: bool,
    ) -> None:
        for name, value in (
            ("max_pending", max_pending),
            ("max_batch", max_batch),
            ("max_body_bytes", max_body_bytes),
            ("max_key_bytes", max_key_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.max_key_bytes = max_key_bytes
        self.min_value = INT64_MIN if allow_negative else 1
        self.deltas: dict[str, int] = {}
        self.timed: dict[tuple[str, int], int] = {}
        """Increments with their own time: (key, at in whole seconds) -> sum."""
        self.spill: list[tuple[str, int, int]] = []
        """Sums that would have left signed 64-bit, with their time (0: none): sent as items
        of their own."""
        self.calls = 0
        self.held = 0
        """Keys in batches cut and not yet answered for good: memory the bound counts."""

    def add(self, key: str, value: int, at: int = 0) -> bool:
        """Fold one increment in (`at`: its time in whole seconds, 0 for none); False (nothing
        changed) when it is a new key and max_pending keys are already held. TypeError or
        ValueError for what the server would refuse."""
        if type(value) is not int or not self.min_value <= value <= INT64_MAX:
            raise _bad_value(value, self.min_value)
        if at:
            return self._add_timed(key, value, at)
        deltas = self.deltas
        old = deltas.get(key)
        if old is None:
            self._check_key(key)
            if len(self) + self.held >= self.max_pending:
                return False
            deltas[key] = value
        else:
            total = old + value
            if INT64_MIN <= total <= INT64_MAX:
                deltas[key] = total
            else:
                self.spill.append((key, old, 0))
                deltas[key] = value
        self.calls += 1
        return True

    def _add_timed(self, key: str, value: int, at: int) -> bool:
        timed = self.timed
        old = timed.get((key, at))
        if old is None:
            self._check_key(key)
            if len(self) + self.held >= self.max_pending:
                return False
            timed[(key, at)] = value
        elif INT64_MIN <= old + value <= INT64_MAX:
            timed[(key, at)] = old + value
        else:
            self.spill.append((key, old, at))
            timed[(key, at)] = value
        self.calls += 1
        return True

    def _check_key(self, key: str) -> None:
        if type(key) is not str:
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        if key.isascii() and key.isprintable() and 0 < len(key) <= self.max_key_bytes:
            return
        if not key:
            raise ValueError("key must not be empty")
        if _CONTROL.search(key):
            raise ValueError(f"key {key!r} contains control characters")
        if len(key.encode("utf-8", "surrogatepass")) > self.max_key_bytes:
            raise ValueError(f"key {key[:40]!r}... exceeds {self.max_key_bytes} UTF-8 bytes")
        try:
            key.encode()
        except UnicodeEncodeError:
            raise ValueError(f"key {key!r} is not valid Unicode (a lone surrogate)") from None

    def __len__(self) -> int:
        return len(self.deltas) + len(self.timed)

    def cut(self) -> list[Batch]:
        """Everything pending as batches of at most max_batch increments and max_body_bytes."""
        items = [*self.deltas.items()]
        times = [0] * len(items)
        for (key, at), value in self.timed.items():
            items.append((key, value))
            times.append(at)
        for key, value, at in self.spill:
            items.append((key, value))
            times.append(at)
        calls = self.calls
        self.deltas = {}
        self.timed = {}
        self.spill = []
        self.calls = 0
        if not items:
            return []
        timed = any(times)
        batches: list[Batch] = []
        step = self.max_batch
        left = calls  # the last chunk takes what the proportional shares leave
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            share = calls * len(chunk) // len(items) if start + step < len(items) else left
            left -= share
            own = times[start : start + step] if timed else None
            batches.extend(self._fitted(Batch(chunk, share, own)))
        self.held += sum(len(b.items) for b in batches)
        return batches

    def _fitted(self, batch: Batch) -> list[Batch]:
        if len(batch.body) <= self.max_body_bytes or len(batch.items) == 1:
            return [batch]
        return [part for half in batch.halves() for part in self._fitted(half)]

    def answered(self, batch: Batch) -> None:
        """The batch is done with (acknowledged or given up): its keys no longer held."""
        self.held -= len(batch.items)


def _bad_value(value: object, min_value: int) -> Exception:
    if type(value) is not int:
        return TypeError(f"value must be an int, got {type(value).__name__} {value!r}")
    if min_value == 1 and value <= 0:
        return ValueError(
            f"value must be at least 1, got {value} (a server run with --allow-negative takes "
            "any value: make the client with allow_negative=True)"
        )
    return ValueError(f"value {value} is outside signed 64-bit")


# --- answers ------------------------------------------------------------------------------------

ACKNOWLEDGED: Final = "acknowledged"
RETRY: Final = "retry"  # same batch, same key, after a pause
SPLIT: Final = "split"  # refused whole, nothing applied: send its halves under new keys
REKEY: Final = "rekey"  # the key was used for something else, nothing applied: a new key
REFUSED: Final = "refused"  # for good: drop it


def verdict(status: int, error: str, items: int) -> str:
    """What to do with a batch the server answered with `status` (and error code `error`)."""
    if status == 202:
        return ACKNOWLEDGED
    if status in (408, 429) or status >= 500:
        return RETRY
    if status == 422 and error == "idempotency_key_reused":
        return REKEY
    if status in (401, 403):
        # No key, or a key the server will not let write these counters (no write scope, or a
        # counter outside its prefix): the same key gets the same answer however often.
        return REFUSED
    refused_whole = status in (400, 413) or (status == 422 and error == "at_out_of_range")
    if refused_whole and items > 1 and error != "malformed_json":
        # One bad item (a key or value the server's settings refuse) or a batch over its
        # limits: halves until the bad item is alone, so the others still count.
        return SPLIT
    return REFUSED


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class Backoff:
    """Exponential backoff, each pause drawn between half and all of it (jitter: clients that
    failed together do not retry together), never shorter than the server's Retry-After."""

    def __init__(self, initial: float = 0.05, maximum: float = 5.0) -> None:
        self.initial = initial
        self.maximum = maximum

    def delay(self, attempt: int, asked: float | None = None) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(attempt, 30))
        jittered = random.uniform(ceiling / 2, ceiling)
        return max(jittered, asked or 0.0)


def rate_limit_wait(value: str | None) -> float | None:
    """Seconds until the server's rate limit lets another request through, from its RateLimit
    field: t of an item whose remaining quota r is 0, capped; None when no item says so (or
    the field is malformed, which the draft says to ignore)."""
    wait: float | None = None
    for item in (value or "").split(","):
        found = _RATELIMIT_ITEM.match(item)
        if found is None:
            return None
        params = dict(p.split("=", 1) for p in found.group(1).split(";")[1:])
        try:
            if int(params["r"]) == 0 and "t" in params:
                wait = max(wait or 0.0, float(int(params["t"])))
        except (KeyError, ValueError):
            return None
    return None if wait is None else min(wait, MAX_RETRY_AFTER)


class Answer(NamedTuple):
    """What one attempt came to: what to do next, and why (for the log and the errors)."""

    action: str
    problem: str = ""
    asked: float | None = None
    """Seconds the server asked to wait before a retry: its Retry-After, else its RateLimit
    field's (the draft gives Retry-After precedence)."""
    replayed: bool = False
    hold: float | None = None
    """Seconds before anything more is sent: the rate limit's quota is spent for now."""


def read_answer(status: int, headers: Mapping[str, str], body: bytes, items: int) -> Answer:
    hold = rate_limit_wait(headers.get("RateLimit"))
    if status == 202:
        replayed = headers.get("Idempotent-Replayed") == "true"
        return Answer(ACKNOWLEDGED, replayed=replayed, hold=hold)
    error, detail = _error(body)
    action = verdict(status, error, items)
    problem = f"{status} {error}: {detail}" if error else f"{status} {body[:200]!r}"
    asked = retry_after(headers.get("Retry-After"))
    return Answer(action, problem, hold if asked is None else asked, hold=hold)


def _error(body: bytes) -> tuple[str, str]:
    """The server's {"error": code, "detail": text}, or empty strings."""
    try:
        payload = json.loads(body)
    except ValueError:
        return "", ""
    if not isinstance(payload, dict):
        return "", ""
    return str(payload.get("error", "")), str(payload.get("detail", ""))


def failure(exc: BaseException) -> Answer:
    """An attempt that got no answer (connect, read, write, timeout, protocol): retried, unless
    no retry can get past it (_endpoint.permanent), which is refused like a 4xx."""
    return Answer(REFUSED if permanent(exc) else RETRY, f"{type(exc).__name__}: {exc}")


class Delivery:
    """What happens to a batch after each attempt, the stats, and the last problems: the policy
    both clients follow, whichever task or thread sends."""

    def __init__(self, retry_for: float) -> None:
        self.retry_for = retry_for
        self.backoff = Backoff()
        self.stats = ClientStats()
        self.last_error = ""
        """The last failure of an attempt, for TimeoutError messages."""
        self.refusal = ""
        """Why increments were last dropped, for Refused."""
        self.dropped_batches = 0
        self.resume_at = 0.0
        """No batch is sent before this (monotonic): a rate limit said its quota is spent."""

    def pause(self, now: float) -> float:
        """Seconds to wait before sending the next batch."""
        return max(0.0, self.resume_at - now)

    def step(
        self, batch: Batch, answer: Answer, attempt: int, now: float, stop_at: float
    ) -> list[Batch] | float:
        """After attempt number `attempt` of batch: the batches to send instead of it (none
        when it is done with), or the pause before sending it again, the same bytes under the
        same key."""
        action = answer.action
        if answer.hold is not None:
            self.resume_at = max(self.resume_at, now + answer.hold)
        if action == ACKNOWLEDGED:
            stats = self.stats
            stats.acknowledged += batch.calls
            stats.batches += 1
            stats.replayed += answer.replayed
            return []
        if action == SPLIT:
            return batch.halves()
        if action == REKEY:
            return [batch.rekeyed()]
        if action == REFUSED:
            self._drop(batch, answer.problem)
            return []
        if now - batch.first_attempt > self.retry_for or now >= stop_at:
            self._drop(batch, f"given up after {attempt} attempts: {answer.problem}")
            return []
        self.stats.retries += 1
        self.last_error = answer.problem
        # The first failure of a batch, then every tenth: an outage shows without a flood.
        if attempt == 1 or attempt % 10 == 0:
            log.warning(
                "batch %s of %d increments not acknowledged (attempt %d, retrying under the "
                "same key): %s",
                batch.key,
                len(batch.items),
                attempt,
                answer.problem,
            )
        return max(0.0, min(self.backoff.delay(attempt, answer.asked), stop_at - now))

    def attempt_timeout(self, configured: float | None, stop_at: float, now: float) -> float | None:
        """An attempt's timeout: the client's, cut to what is left before the close deadline."""
        if stop_at == float("inf"):
            return configured
        left = max(0.0, stop_at - now)
        return left if configured is None else min(configured, left)

    def abandon(self, calls: int) -> None:
        """The close deadline passed with a request still in flight: its increments and those
        behind it are given up (the server may still apply what it got)."""
        if calls:
            self.stats.dropped += calls
            self.dropped_batches += 1
            self.refusal = "given up at the close deadline with a request still in flight"
            log.error("dropped %d increments: %s", calls, self.refusal)

    def _drop(self, batch: Batch, why: str) -> None:
        self.stats.dropped += batch.calls
        self.dropped_batches += 1
        self.refusal = why
        log.error("dropped %d increments (batch %s): %s", len(batch.items), batch.key, why)
