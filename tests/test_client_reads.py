"""The Python client's time buckets and reads against the real server: incr(at=...) lands in the
bucket of that time, series() and read_many() read back, sync and async alike; an `at` the
server refuses drops only that increment."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from incrementer_client import AsyncClient, Client, ReadError, Refused
from support import run_service, settings_for, sqlite_server, unique

from incrementer import periods


def test_incr_at_a_time_then_series_and_read_many(tmp_path: Path) -> None:
    """Increments at given times (a datetime, epoch seconds) and at arrival count in their
    buckets; series gives every bucket zero-filled with its total, read_many totals and counts
    over a window, in one request each."""
    key, other = unique("c"), unique("c")
    # At a whole minute, so that a time 0.9 s later is in the same second and the same minute.
    then = (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0)
    with (
        sqlite_server(tmp_path, "--buckets", "minute,hour,day") as (server, _),
        Client(server.url) as client,
    ):
        client.incr(key, 2, at=then)
        client.incr(key, 3, at=then.timestamp() + 0.9)  # same second: coalesced
        client.incr(key, 4)
        client.incr(other, 1, at=then)
        client.flush()
        series = client.series(key, "minute", start=then - timedelta(minutes=1))
        minute = periods.bucket_start(int(then.timestamp()), 60)
        counted = {int(start.timestamp()): value for start, value in series.points if value}
        assert counted[minute] == 5
        assert sum(counted.values()) == series.total == 9
        assert series.granularity == "minute" and series.key == key
        assert [
            b - a for (a, _), (b, _) in zip(series.points, series.points[1:], strict=False)
        ] == [timedelta(minutes=1)] * (len(series.points) - 1)
        never = unique()
        assert client.read_many([key, other, never]) == {key: 9, other: 1, never: 0}
        window = client.read_many([key], "minute", start=then, end=then + timedelta(minutes=1))
        assert window == {key: 5}
        with pytest.raises(ReadError) as refused:
            client.series(key, "week")
        assert refused.value.status == 400 and refused.value.code == "invalid_granularity"
        with pytest.raises(ValueError):
            client.read_many([key], start=then)  # a window needs its granularity


def test_an_at_the_server_refuses_drops_only_that_increment(tmp_path: Path) -> None:
    """An `at` past the server's --bucket-past is refused (422): the batch is halved until that
    increment is alone and dropped, the rest count; flush says so."""
    key, stale = unique("c"), unique("c")
    with (
        sqlite_server(tmp_path, "--buckets", "minute", "--bucket-past", "600") as (server, _),
        Client(server.url) as client,
    ):
        for n in range(9):
            client.incr(f"{key}{n}", 1, at=time.time() - 60)
        client.incr(stale, 1, at=time.time() - 3600)
        with pytest.raises(Refused, match="at_out_of_range"):
            client.flush()
        assert client.stats.dropped == 1
        counts = client.read_many([f"{key}{n}" for n in range(9)] + [stale])
        assert counts == {**{f"{key}{n}": 1 for n in range(9)}, stale: 0}


def test_bad_times_are_refused_by_incr() -> None:
    """A naive datetime, a bool or a time before 1970 is refused by incr() at once, and nothing
    is held."""
    with Client("http://127.0.0.1:9", close_at_exit=None) as client:
        for bad, error in (
            (datetime(2026, 1, 1), ValueError),
            (True, TypeError),
            (-5.0, ValueError),
        ):
            with pytest.raises(error):
                client.incr("k", 1, at=bad)  # type: ignore[arg-type]
        assert client.stats.pending == 0


async def test_async_client_incr_at_series_and_read_many(tmp_path: Path, sqlite_url: str) -> None:
    """AsyncClient does the same on the caller's loop."""
    key = unique("a")
    then = time.time() - 120
    settings = settings_for(tmp_path, sqlite_url, buckets="minute,hour")
    async with run_service(settings) as svc, AsyncClient(svc.url) as client:
        await client.incr(key, 7, at=then)
        await client.incr(key, 1)
        await client.flush()
        series = await client.series(key, "hour")
        assert series.total == 8 and len(series.points) == 24
        assert await client.read_many([key]) == {key: 8}
        assert await client.read_many([key], "minute", start=then, end=then + 1) == {key: 7}
        with pytest.raises(ReadError):
            await client.series(key, "day")  # not kept
        with pytest.raises(httpx.TransportError):
            async with AsyncClient("http://127.0.0.1:9") as dead:
                await dead.read_many([key])
