"""The reads both clients share, without I/O: what to ask the server for, and what its answer
means. A read is one request, answered now: unlike increments, nothing is queued or retried
(a failed read raises, and the caller decides)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

Time = datetime | float
"""An aware datetime, or seconds since the epoch."""


class ReadError(Exception):
    """The server refused or failed a read: its HTTP status, error code and detail (a 503 with
    `database_unavailable` passes; a 400, or a 403 `forbidden` for a key without the read scope
    or outside its prefix, will not)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Series:
    """One key's counts per time bucket, as GET /counters/{key}/series answers."""

    key: str
    granularity: str
    start: datetime
    """The first bucket's start (UTC)."""
    end: datetime
    """Just past the last bucket."""
    points: list[tuple[datetime, int]]
    """(bucket start, count) of every bucket in order, 0 for a bucket nothing was counted in."""
    total: int
    """The sum of the points."""


def _time(value: Time) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("times must be aware datetimes (with a tzinfo)")
        return value.isoformat()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    raise TypeError(f"a time must be a datetime or seconds since the epoch, got {value!r}")


Query = tuple[tuple[str, str], ...]


def _window(granularity: str | None, start: Time | None, end: Time | None) -> Query:
    if granularity is None:
        if start is not None or end is not None:
            raise ValueError("start and end need a granularity")
        return ()
    params = [("granularity", granularity)]
    if start is not None:
        params.append(("from", _time(start)))
    if end is not None:
        params.append(("to", _time(end)))
    return tuple(params)


def series_request(
    key: str, granularity: str, start: Time | None, end: Time | None
) -> tuple[str, Query]:
    """The path and query of a series read."""
    return f"/counters/{quote(key, safe='')}/series", _window(granularity, start, end)


def many_request(
    keys: list[str], granularity: str | None, start: Time | None, end: Time | None
) -> tuple[str, Query]:
    """The path and query of a read of many keys (their totals, or their counts over a
    window)."""
    if not keys:
        raise ValueError("read_many needs at least one key")
    return "/counters", tuple(("key", key) for key in keys) + _window(granularity, start, end)


def _answer(status: int, body: bytes) -> dict[str, object]:
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if status != 200 or not isinstance(payload, dict):
        code = detail = ""
        if isinstance(payload, dict):
            code, detail = str(payload.get("error", "")), str(payload.get("detail", ""))
        raise ReadError(status, code or "unexpected_answer", detail or repr(body[:200]))
    return payload


def series_answer(status: int, body: bytes) -> Series:
    payload = _answer(status, body)
    points = payload["points"]
    assert isinstance(points, list)
    return Series(
        key=str(payload["key"]),
        granularity=str(payload["granularity"]),
        start=datetime.fromisoformat(str(payload["from"])),
        end=datetime.fromisoformat(str(payload["to"])),
        points=[(datetime.fromtimestamp(start, UTC), int(value)) for start, value in points],
        total=int(str(payload["sum"])),
    )


def many_answer(status: int, body: bytes) -> dict[str, int]:
    """key -> its total, or its count over the window (a key never counted: 0)."""
    counters = _answer(status, body)["counters"]
    assert isinstance(counters, list)
    return {str(entry["key"]): int(entry["value"]) for entry in counters}
