"""periods.py: the times and durations that requests and settings name, and bucket arithmetic."""

from __future__ import annotations

import pytest

from incrementer import periods

T = 1_796_515_200  # 2026-12-06T00:00:00Z


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("2026-12-06T00:00:00Z", T),
        ("2026-12-06T01:30:00+01:00", T + 1800),
        ("2026-12-05T23:00:00.250-01:00", T + 0.25),
        ("2026-12-06 00:00:00+00:00", T),
        (str(T), T),
        (f"{T}.5", T + 0.5),
        (T, T),
        (float(T) + 0.125, T + 0.125),
        (" 2026-12-06T00:00:00Z ", T),
    ],
)
def test_times_in_every_accepted_form(given: object, seconds: float) -> None:
    """RFC 3339 with any offset and a fraction, or seconds since the epoch as a number or as
    text, all read as the same instant."""
    assert periods.parse_time(given) == seconds


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("2026-12-06T00:00:00", "no UTC offset"),
        ("2026-12-06", "no UTC offset"),
        ("noon", "neither RFC 3339"),
        (True, "not a boolean"),
        (None, "must be RFC 3339"),
        (-1, "between 1970"),
        (float("nan"), "between 1970"),
        (1e13, "between 1970"),
        ("1e5", "neither RFC 3339"),
    ],
)
def test_what_is_not_a_time_says_why(given: object, why: str) -> None:
    """A naive time, another text, a boolean, or a time outside 1970..9999 is refused with a
    reason."""
    with pytest.raises(ValueError, match=why):
        periods.parse_time(given)


def test_buckets_nest_and_durations_read() -> None:
    """A bucket starts at t - t % length, so every minute lies in one hour and every hour in
    one day; durations take s, m, h, d, w and y (365 days); the horizon is the oldest bucket
    kept."""
    t = T + 3 * 3600 + 17 * 60 + 42
    minute, hour, day = (periods.bucket_start(t, n) for n in (60, 3600, 86400))
    assert (minute, hour, day) == (T + 3 * 3600 + 17 * 60, T + 3 * 3600, T)
    assert periods.bucket_start(minute, 3600) == hour and periods.bucket_start(hour, 86400) == day
    assert [periods.parse_duration(x) for x in ("90s", "15m", "36h", "2d", "1w", "5y")] == [
        90,
        900,
        129600,
        172800,
        604800,
        5 * 365 * 86400,
    ]
    with pytest.raises(ValueError):
        periods.parse_duration("2 days")
    assert periods.horizon(60, 2 * 86400, t) == minute - 2 * 86400
    assert periods.horizon(86400, None, t) == 0
    assert periods.text(t) == "2026-12-06T03:17:42Z"
