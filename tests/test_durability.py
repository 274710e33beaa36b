"""Nothing acknowledged is lost, nothing is applied twice: kill -9, crash points, outages."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
from proxy import proxy_to
from support import (
    LoadResult,
    db_totals,
    kill,
    load,
    load_until,
    merge,
    run_cli,
    run_service,
    serve_args,
    settings_for,
    spawn,
    spawned,
    totals_are,
    unique,
    violations,
    wait_until,
)

from incrementer.ingest.wal import summarize


def test_violations_catches_loss_and_duplicates() -> None:
    """The checker itself flags both a lost and a doubled increment."""
    assert violations({"a": 5}, {}, {"a": 5}) == []
    assert violations({"a": 5}, {"a": 2}, {"a": 7}) == []
    assert violations({"a": 5}, {}, {"a": 4})
    assert violations({"a": 5}, {"a": 1}, {"a": 7})


async def crash_rounds(
    tmp_path: Path, db_url: str, durability: str, rounds: int
) -> tuple[LoadResult, dict[str, int]]:
    """Run load, kill -9 mid-load, restart, repeat; then drain gracefully and read totals."""
    prefix = unique()
    keys = [f"{prefix}-{i}" for i in range(200)]
    rng = random.Random(durability)
    args = serve_args(tmp_path, db_url, durability=durability, flush_interval="3", log_level="info")
    seen = LoadResult()
    for _ in range(rounds):
        server = spawn(args)
        try:
            items = [(rng.choice(keys), rng.randint(1, 9)) for _ in range(200_000)]
            task = asyncio.create_task(
                load(server.url, items, connections=8, pipeline=32, stop_on_error=False)
            )
            await asyncio.sleep(rng.uniform(0.6, 1.2))
            kill(server.proc)
            merge(seen, await task)
        finally:
            kill(server.proc)
    with spawned(args) as server:
        assert server.stop(signal.SIGTERM) == 0, server.read_log()
    return seen, await db_totals(db_url, keys)


@pytest.mark.parametrize("durability", ["wal", "wal-fsync"])
async def test_kill9_under_load_loses_nothing(tmp_path: Path, db_url: str, durability: str) -> None:
    """Repeated kill -9 under load: every acknowledged increment lands exactly once."""
    seen, totals = await crash_rounds(tmp_path, db_url, durability, rounds=3)
    assert sum(seen.acked.values()) > 1000, "the load never got going"
    assert violations(seen.acked, seen.in_flight, totals) == []


async def test_kill9_in_memory_mode_loses_data(tmp_path: Path, sqlite_url: str) -> None:
    """The same harness catches memory mode losing acknowledged increments on kill -9."""
    seen, totals = await crash_rounds(tmp_path, sqlite_url, "memory", rounds=1)
    assert sum(seen.acked.values()) > 1000
    assert violations(seen.acked, seen.in_flight, totals) != []


async def test_crash_after_commit_before_recycle_does_not_double_apply(
    tmp_path: Path, db_url: str
) -> None:
    """A crash right after the commit replays the WAL, finds the batch applied, skips it."""
    key = unique("crash-")
    args = serve_args(tmp_path, db_url, flush_interval="0.05")
    server = spawn(args, env={"INCREMENTER_FAULT_CRASH_AFTER_COMMITS": "1"})
    try:
        result = await load(server.url, [(key, 1)] * 50, connections=1, pipeline=50)
        assert server.proc.wait(15) == 137
    finally:
        kill(server.proc)
    assert await db_totals(db_url, [key]) == {key: 50}
    pending = summarize(tmp_path / "data" / "wal")
    assert pending.records >= 50, "the crash should leave the applied records in the WAL"
    with spawned(args) as server:
        server.stop_cleanly()
    assert "replayed" not in server.read_log()
    assert result.acked == {key: 50}
    assert await db_totals(db_url, [key]) == {key: 50}


async def test_graceful_shutdown_loses_nothing_in_memory_mode(tmp_path: Path, db_url: str) -> None:
    """SIGTERM under load: in-flight requests answered, final flush, exit 0, totals exact."""
    prefix = unique()
    keys = [f"{prefix}-{i}" for i in range(100)]
    items = [(random.choice(keys), 1) for _ in range(100_000)]
    args = serve_args(tmp_path, db_url, durability="memory", flush_interval="5")
    server = spawn(args)
    try:
        task = asyncio.create_task(
            load(server.url, items, connections=8, pipeline=32, stop_on_error=False)
        )
        await asyncio.sleep(0.8)
        server.proc.send_signal(signal.SIGTERM)
        seen = await task
        assert await asyncio.to_thread(server.proc.wait, 30) == 0
    finally:
        kill(server.proc)
    assert sum(seen.acked.values()) > 1000
    totals = await db_totals(db_url, keys)
    assert violations(seen.acked, seen.in_flight, totals) == []
    assert "stopped after" in server.read_log()


OUTAGE_SECONDS = float(os.environ.get("INCREMENTER_TEST_OUTAGE_SECONDS", "5"))


async def test_database_outage_keeps_accepting_then_recovers(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL unreachable under continuous load: increments still accepted, readyz 503,
    then flushing resumes by itself, lag drops back under 1 s, and every total is exact.
    (INCREMENTER_TEST_OUTAGE_SECONDS=30 runs a 30 s outage.)"""
    prefix = unique()
    keys = [f"{prefix}-{i}" for i in range(500)]
    async with proxy_to(pg_url) as (proxy, via_proxy):
        settings = settings_for(tmp_path, via_proxy, flush_interval=0.05)
        async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
            stop = asyncio.Event()
            loader = asyncio.create_task(load_until(svc.url, stop, keys))
            await asyncio.sleep(1)
            await proxy.cut()
            await wait_until(lambda: _ready_status(client, 503), timeout=10)
            accepted_at_cut = svc.metrics.accepted_increments
            await asyncio.sleep(OUTAGE_SECONDS)
            assert svc.metrics.accepted_increments > accepted_at_cut, "stopped accepting"
            assert svc.metrics.flush_failures > 0
            await proxy.restore()
            await wait_until(lambda: _ready_status(client, 200), timeout=15)
            await wait_until(lambda: _lag_below(client, 1.0), timeout=10)
            stop.set()
            seen = await loader
            await wait_until(lambda: totals_are(pg_url, seen.acked), timeout=15)
    assert sum(seen.acked.values()) > 1000
    assert violations(seen.acked, {}, await db_totals(pg_url, keys)) == []


async def _lag_below(client: httpx.AsyncClient, seconds: float) -> bool:
    return float((await client.get("/readyz")).json()["lag_seconds"]) < seconds


async def test_sqlite_locked_then_released_recovers(tmp_path: Path, sqlite_url: str) -> None:
    """SQLite write-locked by another process: flushes retry, then land exactly once."""
    key = unique("locked-")
    async with run_service(settings_for(tmp_path, sqlite_url)) as svc:
        blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        seen = await load(svc.url, [(key, 1)] * 2000)
        await wait_until(lambda: svc.metrics.flush_failures > 0, timeout=20)
        blocker.execute("ROLLBACK")
        blocker.close()
        await wait_until(lambda: totals_are(sqlite_url, seen.acked), timeout=20)
    assert await db_totals(sqlite_url, [key]) == {key: 2000}


async def test_overload_sheds_new_keys_with_503(tmp_path: Path, pg_url: str) -> None:
    """Past --max-pending-keys, new keys get 503 + Retry-After; pending keys still count."""
    prefix = unique()
    async with proxy_to(pg_url) as (proxy, via_proxy):
        settings = settings_for(
            tmp_path,
            via_proxy,
            max_pending_keys=100,
            max_pending_keys_per_client=100,  # one client: the whole budget is its share
            flush_max_keys=50,
        )
        async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
            await proxy.cut()
            statuses = []
            for i in range(150):
                resp = await client.post("/increment", json={"key": f"{prefix}-{i}", "value": 1})
                statuses.append(resp.status_code)
                if resp.status_code == 503:
                    assert resp.headers["retry-after"] == "1"
                    assert resp.json()["error"] == "overloaded"
            assert statuses.count(202) == 100
            assert statuses.count(503) == 50
            # A key already waiting in the buffer costs no memory, so it is still accepted.
            buffered = next(iter(svc.buffer.deltas))
            again = await client.post("/increment", json={"key": buffered, "value": 1})
            assert again.status_code == 202
            assert svc.metrics.rejected["overloaded"] == 50
            await proxy.restore()
            expected = {f"{prefix}-{i}": 1 for i in range(100)}
            expected[buffered] = 2
            await wait_until(lambda: totals_are(pg_url, expected), timeout=20)


async def _ready_status(client: httpx.AsyncClient, status: int) -> bool:
    return (await client.get("/readyz")).status_code == status


async def _crash_with_pending_wal(tmp_path: Path, db_url: str, key: str) -> tuple[list[str], Path]:
    """Acknowledge 3 requests (3 WAL frames), then kill -9 before any flush."""
    args = serve_args(tmp_path, db_url, flush_interval="9")
    server = spawn(args)
    try:
        for value in (1, 2, 4):
            result = await load(server.url, [(key, value)], connections=1, pipeline=1)
            assert result.acked == {key: value}
    finally:
        kill(server.proc)
    [segment] = sorted((tmp_path / "data" / "wal").glob("wal-*.log"))
    return args, segment


async def test_torn_wal_tail_is_cut_and_the_rest_replayed(tmp_path: Path, sqlite_url: str) -> None:
    """Half a frame at the end of the WAL (a power cut mid-write) is dropped with a warning;
    every acknowledged increment before it is replayed."""
    key = "torn"
    args, segment = await _crash_with_pending_wal(tmp_path, sqlite_url, key)
    with segment.open("ab") as f:
        f.write(b"IWAL\x40\x00\x00\x00\x09")  # a header promising 64 bytes that never came
    with spawned(args) as server:
        server.stop_cleanly()
    log = server.read_log()
    assert "replayed 3 increments" in log
    assert "WAL torn tail dropped" in log  # the tmp path holds "torn" too: match the warning
    assert await db_totals(sqlite_url, [key]) == {key: 7}


async def test_corrupt_wal_middle_stops_startup_naming_file_and_offset(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A damaged frame followed by good ones refuses to start, names file and offset, and
    leaves the file untouched."""
    args, segment = await _crash_with_pending_wal(tmp_path, sqlite_url, "corrupt")
    data = bytearray(segment.read_bytes())
    data[30] ^= 0xFF  # inside the first frame's payload; frames 2 and 3 follow intact
    segment.write_bytes(bytes(data))
    proc = run_cli("serve", "--port", "0", *args)
    assert proc.returncode == 1  # a failure at run time, not a usage error
    assert str(segment) in proc.stderr
    assert "offset" in proc.stderr
    assert segment.read_bytes() == bytes(data)
    assert await db_totals(sqlite_url, ["corrupt"]) == {}


async def test_flush_interval_stretches_while_flushes_are_slow(tmp_path: Path, pg_url: str) -> None:
    """A flush held up by the database (here: a row lock for 1 s) stretches the interval
    to --flush-interval-max; the next quick flush brings it back down. (A quick flush means
    under 0.125 s here: the interval after it is max(0.2, STRETCH x its duration), below 2.)"""
    import asyncpg

    settings = settings_for(tmp_path, pg_url, flush_interval=0.2, flush_interval_max=2.0)
    key = unique("stretch-")
    body = {"key": key, "value": 1}
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        assert (await client.post("/increment", json=body)).status_code == 202
        await wait_until(lambda: svc.flusher.commits >= 1 and not svc.flusher.pending_keys())
        assert svc.flusher.interval < 2.0
        blocker = await asyncpg.connect(pg_url)
        try:
            async with blocker.transaction():
                await blocker.execute("SELECT 1 FROM counters WHERE key = $1 FOR UPDATE", key)
                commits = svc.flusher.commits
                assert (await client.post("/increment", json=body)).status_code == 202
                # The flush starts within ~0.2 s and then waits for the lock: >= 0.5 s in all.
                await asyncio.sleep(1.0)
                assert svc.flusher.commits == commits
        finally:
            await blocker.close()
        await wait_until(lambda: svc.flusher.commits > commits)
        assert svc.flusher.interval == 2.0  # STRETCH (16) x (>= 0.5 s), capped
        commits = svc.flusher.commits
        assert (await client.post("/increment", json=body)).status_code == 202
        await wait_until(lambda: svc.flusher.commits > commits)
        assert svc.flusher.interval < 2.0
        assert (await db_totals(pg_url, [key]))[key] == 3
