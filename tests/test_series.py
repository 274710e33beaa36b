"""Counting per time bucket through the API, against the real service on both engines: an
increment's `at`, GET /counters/{key}/series before and after the flush, windows, the
retention horizon, and every refusal."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from support import (
    add_api_key,
    counter_path,
    run_service,
    settings_for,
    totals_are,
    unique,
    wait_until,
)

from incrementer import periods
from incrementer.store import open_store
from incrementer.store.buckets import Buckets

MINUTE, HOUR = 60, 3600
BUCKETS = "minute,hour,day"


def series_path(key: str) -> str:
    return counter_path(key) + "/series"


async def clear_of_a_minute_boundary() -> None:
    """Wait, if need be, until the next minute is more than two seconds away: an increment
    counted at its arrival then lands in the minute the test expects."""
    left = 60 - time.time() % 60
    if left < 2:
        await asyncio.sleep(left + 0.1)


def nonzero(body: dict[str, object]) -> dict[int, int]:
    points = body["points"]
    assert isinstance(points, list)
    return {start: value for start, value in points if value}


async def test_series_counts_each_increment_in_its_bucket_before_and_after_the_flush(
    tmp_path: Path, db_url: str
) -> None:
    """Increments with an `at` in the past hour and without one land in the buckets of their
    times; the series says so at once (this process's unflushed deltas) and after the flush,
    zero-filled, summing to the total."""
    key = unique()
    now = time.time()
    ats = [now - 3000, now - 1700, now - 1700, now - 65, None]
    expected: dict[int, int] = {}
    hours: dict[int, int] = {}
    settings = settings_for(tmp_path, db_url, buckets=BUCKETS, flush_interval=2.0)
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        await clear_of_a_minute_boundary()
        for value, at in enumerate(ats, 1):
            body: dict[str, object] = {"key": key, "value": value}
            if at is not None:
                body["at"] = at if value % 2 else periods.text(at)
            assert (await client.post("/increment", json=body)).status_code == 202
            second = int(at if at is not None else time.time())
            start = periods.bucket_start(second, MINUTE)
            expected[start] = expected.get(start, 0) + value
            hour = periods.bucket_start(second, HOUR)
            hours[hour] = hours.get(hour, 0) + value
        params = {"granularity": "minute", "from": str(now - 3600)}
        for flushed in (False, True):
            if flushed:
                await wait_until(lambda: totals_are(db_url, {key: 15}))
            resp = await client.get(series_path(key), params=params)
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert nonzero(body) == expected, flushed
            assert body["sum"] == 15
            assert body["granularity"] == "minute"
            assert body["from"] == periods.text(periods.bucket_start(int(now - 3600), MINUTE))
            starts = [start for start, _ in body["points"]]
            assert starts == list(range(starts[0], starts[-1] + 1, MINUTE))  # zero-filled
            resp = await client.get(series_path(key), params={"granularity": "hour"})
            assert nonzero(resp.json()) == hours
            assert len(resp.json()["points"]) == 24
            resp = await client.get("/counters", params={"key": key, "granularity": "day"})
            assert resp.json()["counters"] == [{"key": key, "value": 15}]


async def test_a_batch_with_times_is_counted_item_by_item(tmp_path: Path, sqlite_url: str) -> None:
    """POST /increments with an `at` on some items, with and without an Idempotency-Key: each
    item in its own bucket, the keyed batch once however often it is sent."""
    key = unique()
    now = int(time.time())
    then = now - 1800
    batch = [{"key": key, "value": 1, "at": then}, {"key": key, "value": 2}]
    async with (
        run_service(settings_for(tmp_path, sqlite_url, buckets="minute")) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        assert (await client.post("/increments", json=batch)).status_code == 202
        headers = {"Idempotency-Key": unique()}
        for _ in range(3):
            resp = await client.post("/increments", json=batch, headers=headers)
            assert resp.status_code == 202
        other = [{"key": key, "value": 1, "at": then + 60}, {"key": key, "value": 2}]
        reused = await client.post("/increments", json=other, headers=headers)
        assert reused.status_code == 422  # the same counts at another time: another batch
        await wait_until(lambda: totals_are(sqlite_url, {key: 6}))
        resp = await client.get(
            series_path(key), params={"granularity": "minute", "from": str(then - 60)}
        )
        points = nonzero(resp.json())
        assert points[periods.bucket_start(then, MINUTE)] == 2
        assert sum(points.values()) == 6


async def test_an_at_outside_the_window_is_refused_and_changes_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    """An `at` more than --bucket-past ago or more than 60 s ahead is 422, one that is not a
    time 400, alone or in a batch (all or nothing); nothing is counted."""
    key = unique()
    now = time.time()
    settings = settings_for(tmp_path, sqlite_url, buckets=BUCKETS, bucket_past=600.0)
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        refused = {
            now - 700: (422, "at_out_of_range"),
            now + 120: (422, "at_out_of_range"),
            "yesterday": (400, "invalid_at"),
            "2026-12-06T10:00:00": (400, "invalid_at"),  # no offset
            True: (400, "invalid_at"),
            -5: (400, "invalid_at"),
        }
        for at, (status, code) in refused.items():
            for path, body in (
                ("/increment", {"key": key, "value": 1, "at": at}),
                ("/increments", [{"key": key, "value": 1}, {"key": key, "value": 1, "at": at}]),
            ):
                resp = await client.post(path, json=body)
                assert (resp.status_code, resp.json()["error"]) == (status, code), (at, path)
        assert (await client.get(counter_path(key))).status_code == 404
        ok = await client.post("/increment", json={"key": key, "value": 1, "at": now - 590})
        assert ok.status_code == 202


async def test_without_buckets_an_at_is_checked_and_only_the_total_counts(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A server without --buckets checks an `at` the same way and counts the increment in the
    total; a series is 400 invalid_granularity."""
    key = unique()
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        at = time.time() - 60
        assert (
            await client.post("/increment", json={"key": key, "value": 2, "at": at})
        ).status_code == 202
        late = await client.post("/increment", json={"key": key, "value": 2, "at": at - 7200})
        assert late.status_code == 422
        assert (await client.get(counter_path(key))).json() == {"key": key, "value": 2}
        resp = await client.get(series_path(key), params={"granularity": "minute"})
        assert resp.status_code == 400
        assert resp.json()["error"] == "invalid_granularity"
        assert "without --buckets" in resp.json()["detail"]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("", "invalid_granularity"),
        ("granularity=day", "invalid_granularity"),  # not kept
        ("granularity=week", "invalid_granularity"),
        ("granularity=minute&from=2026-12-06T10:00:00Z&to=2026-12-06T09:00:00Z", "invalid_range"),
        ("granularity=minute&from=0", "too_many_points"),
        ("granularity=minute&from=noon", "invalid_time"),
        ("granularity=minute&to=99999999999999", "invalid_time"),
        ("granularity=minute&color=red", "unknown_parameter"),
        ("granularity=minute&granularity=hour", "duplicate_parameter"),
        ("granularity=minute&from=%zz", "invalid_query"),
        ("granularity=minute&from=%ff", "invalid_query"),
    ],
)
async def test_series_parameters_are_checked(
    tmp_path: Path, sqlite_url: str, query: str, code: str
) -> None:
    """Every malformed or unanswerable series request is a 400 that names the problem."""
    settings = settings_for(tmp_path, sqlite_url, buckets="minute,hour", max_series_points=100)
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        resp = await client.get(f"{series_path('k')}?{query}")
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] == code


async def test_a_key_ending_in_series_is_still_read_as_a_counter(
    tmp_path: Path, sqlite_url: str
) -> None:
    """/counters/series and /counters/a%2Fseries are totals; /counters/a/series is a series."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url, buckets="minute")) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        for key in ("series", "a/series"):
            assert (
                await client.post("/increment", json={"key": key, "value": 3})
            ).status_code == 202
            assert (await client.get(counter_path(key))).json() == {"key": key, "value": 3}
        resp = await client.get("/counters/a/series?granularity=minute")
        assert resp.json()["key"] == "a" and resp.json()["sum"] == 0


async def test_buckets_older_than_the_retention_read_zero(tmp_path: Path, db_url: str) -> None:
    """A bucket past its granularity's --bucket-retention reads 0 whether swept yet or not, and
    the sweep deletes it; coarser buckets keep counting it."""
    key = unique()
    old = periods.bucket_start(int(time.time()) - 3 * HOUR, MINUTE)
    settings = settings_for(
        tmp_path, db_url, buckets=BUCKETS, bucket_retention="minute=2h", bucket_past=600.0
    )
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        # Written as a replayed old WAL would: straight through the store.
        store = open_store(db_url)
        await store.open()
        try:
            for seq, start in enumerate((old, old + 120), 1):
                await store.apply_batch(
                    unique(), seq, {key: 5}, (), Buckets((60, 3600, 86400), {start: {key: 5}})
                )
        finally:
            await store.close()
        params = {"granularity": "minute", "from": str(old - 60), "to": str(old + 180)}
        resp = await client.get(series_path(key), params=params)
        assert resp.json()["sum"] == 0
        resp = await client.get(series_path(key), params={"granularity": "hour"})
        assert resp.json()["sum"] == 10
        assert svc.flusher is not None
        from incrementer.delivery.retention import BucketSweeper

        swept = await BucketSweeper(svc.store, settings.retention, svc.metrics).sweep(time.time())
        assert swept >= 1
        assert svc.metrics.bucket_rows_swept == swept


async def test_read_routes_need_a_key_and_are_rate_limited(tmp_path: Path, sqlite_url: str) -> None:
    """With keys required, every read route is 401 without a key; a key's rate limit covers
    reads as increments; HEAD gives GET's status and headers without the body."""
    key = await add_api_key(sqlite_url, rate=0.001, burst=3)
    settings = settings_for(tmp_path, sqlite_url, buckets="minute", auth="required")
    paths = [
        "/counters/k/series?granularity=minute",
        "/counters?key=k",
        "/counters?prefix=k",
        "/counters?prefix=k&order=value",
    ]
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        for path in paths:
            resp = await client.get(path)
            assert resp.status_code == 401, path
            assert resp.headers["www-authenticate"].startswith("Bearer")
        auth = {"Authorization": f"Bearer {key}"}
        got = await client.get(paths[0], headers=auth)
        head = await client.head(paths[0], headers=auth)
        assert got.status_code == head.status_code == 200
        assert head.content == b"" and head.headers["content-length"] == str(len(got.content))
        assert (await client.get(paths[1], headers=auth)).status_code == 200
        limited = await client.get(paths[2], headers=auth)
        assert limited.status_code == 429
        assert "retry-after" in limited.headers
        assert (await client.post(paths[0], headers=auth)).status_code == 405


async def test_in_memory_mode_each_tick_counts_at_its_own_time(
    tmp_path: Path, sqlite_url: str
) -> None:
    """With --durability memory nothing is written per tick, yet each tick's increments count
    at that tick's time, not at the first one's since the last flush."""
    key = unique()
    settings = settings_for(
        tmp_path, sqlite_url, buckets="minute", durability="memory", flush_interval=5.0
    )
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        assert (await client.post("/increment", json={"key": key, "value": 1})).status_code == 202
        assert svc.wal is not None
        assert svc.wal.frame_ms == 0  # the tick ended: the next increment stamps a new time
        resp = await client.get(series_path(key), params={"granularity": "minute"})
        assert resp.json()["sum"] == 1
