"""Time buckets: the granularities counters are kept per, and the times requests name.

Every bucket has UTC boundaries. POSIX time has no leap seconds, so a minute, an hour and a day
are fixed numbers of seconds, and a bucket's start is `t - t % length`: the same integer
arithmetic in Python and in SQL, and the granularities nest exactly (every minute lies in one
hour, every hour in one day), so a coarser bucket's start follows from a finer one's.

A time in a request (an increment's `"at"`, a read's `from` and `to`) is RFC 3339 text with an
offset (`2026-12-06T10:15:00Z`, `...+01:00`) or a number of seconds since the epoch.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

GRANULARITIES = {"minute": 60, "hour": 3600, "day": 86400}
"""Name -> bucket length in seconds. A month is not one: it is the sum of its day buckets."""
NAMES = {length: name for name, length in GRANULARITIES.items()}
DEFAULT_RETENTION = {60: 2 * 86400, 3600: 90 * 86400, 86400: 5 * 365 * 86400}
FOREVER = "forever"
LATEST = 253402300799
"""9999-12-31T23:59:59Z: the last second a request may name."""
_DURATION = re.compile(r"([0-9]+)([smhdwy])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_EPOCH = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def parse_granularities(text: str) -> tuple[int, ...]:
    """`minute,hour,day` (any subset, any order) -> bucket lengths, ascending; "" -> ()."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in GRANULARITIES]
    if unknown:
        raise ValueError(
            f"unknown granularity {unknown[0]!r}: choose from {', '.join(GRANULARITIES)}"
        )
    if len(set(names)) != len(names):
        raise ValueError("a granularity is named twice")
    return tuple(sorted(GRANULARITIES[name] for name in names))


def parse_duration(text: str) -> int:
    """`90s`, `15m`, `36h`, `2d`, `1w`, `5y` (365 days) -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(
            f"{text!r} is not a duration: a positive whole number and one of s, m, h, d, w, y "
            "(365 days), like 2d or 90d"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_retention(text: str) -> dict[int, int | None]:
    """`minute=2d,hour=90d,day=forever` -> {bucket length: seconds kept, None = forever}, over
    the defaults (DEFAULT_RETENTION) for a granularity not named."""
    retention: dict[int, int | None] = dict(DEFAULT_RETENTION)
    seen = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in GRANULARITIES:
            raise ValueError(
                f"{part!r} is not GRANULARITY=DURATION with a granularity of "
                f"{', '.join(GRANULARITIES)}"
            )
        if name in seen:
            raise ValueError(f"{name} is named twice")
        seen.add(name)
        value = value.strip()
        retention[GRANULARITIES[name]] = None if value == FOREVER else parse_duration(value)
    return retention


def parse_time(value: object) -> float:
    """Seconds since the epoch from RFC 3339 text with an offset, a number, or the text of a
    number; ValueError saying what is wrong."""
    if isinstance(value, bool):
        raise ValueError("must be RFC 3339 text or seconds since the epoch, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        seconds = float(text) if _EPOCH.fullmatch(text) else _rfc3339(text)
    else:
        raise ValueError("must be RFC 3339 text or seconds since the epoch")
    if not (math.isfinite(seconds) and 0 <= seconds <= LATEST):
        raise ValueError("must lie between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
    return seconds


def _rfc3339(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text[:60]!r} is neither RFC 3339 (2026-12-06T10:15:00Z) nor seconds since the epoch"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"{text[:60]!r} has no UTC offset: end it with Z or +hh:mm")
    return moment.timestamp()


def bucket_start(seconds: int, length: int) -> int:
    """The start of the bucket of that length that holds the second `seconds`."""
    return seconds - seconds % length


def horizon(length: int, kept: int | None, now: float) -> int:
    """The start of the oldest bucket of that length still kept `kept` seconds (None: forever)
    at `now`: older ones are swept, and reads show them as 0 whether swept yet or not."""
    if kept is None:
        return 0
    return max(0, bucket_start(int(now) - kept, length))


def text(seconds: float) -> str:
    """RFC 3339 in UTC, to the second: `2026-12-06T10:15:00Z`."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(length: int) -> str:
    """A bucket length as its granularity's name."""
    return NAMES.get(length, f"{length} s")
