"""Per-bucket counts are exact through crashes, retries and processes: random increments with
event times over many buckets, the server killed with SIGKILL during the load (and right after
a flush commits), restarted, every batch sent again under its Idempotency-Key; then each
bucket of each key equals an independent count of the batches, and each key's series sums to
its total. The same checker is shown catching a bucket that is one off. Also: a database
outage during the load, an idempotent
batch sent to two instances counts once in every bucket, a WAL written with buckets off
replays into the totals only, and a --workers group keeps all of it."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

import httpx
from fleet import spawn_group, worker_pids
from support import (
    Spawned,
    db_execute,
    kill,
    serve_args,
    spawn,
    spawned,
    totals_are,
    unique,
    wait_until,
)

from incrementer import periods

GRANULARITIES = {"minute": 60, "hour": 3600, "day": 86400}
Oracle = dict[tuple[str, int, int], int]


class Batches:
    """Batches of increments with event times, each under its own Idempotency-Key, and what
    an independent count of them says every bucket holds."""

    def __init__(self, keys: list[str], seed: int, count: int, size: int = 40) -> None:
        rng = random.Random(seed)
        now = time.time()
        self.batches: list[tuple[str, list[dict[str, object]]]] = []
        self.oracle: Oracle = defaultdict(int)
        self.totals: dict[str, int] = defaultdict(int)
        for _ in range(count):
            items: list[dict[str, object]] = []
            for _ in range(size):
                key, value = rng.choice(keys), rng.randrange(1, 1000)
                at = int(now - rng.uniform(30, 2700))  # over 45 minutes, some 45 buckets
                items.append({"key": key, "value": value, "at": at})
                self.totals[key] += value
                for length in GRANULARITIES.values():
                    self.oracle[(key, length, periods.bucket_start(at, length))] += value
            self.batches.append((str(uuid.uuid4()), items))

    async def send(self, url: str, acknowledged: set[str], stop_after: float | None = None) -> None:
        """Send every batch not yet acknowledged, from 4 connections, until done or until
        `stop_after` seconds (a server that dies makes the rest fail; they are sent again)."""
        queue = [b for b in self.batches if b[0] not in acknowledged]
        deadline = time.monotonic() + (stop_after or 120)

        async def sender(client: httpx.AsyncClient) -> None:
            while queue and time.monotonic() < deadline:
                key, items = queue.pop()
                try:
                    resp = await client.post(
                        "/increments", json=items, headers={"Idempotency-Key": key}
                    )
                except httpx.TransportError:
                    continue
                if resp.status_code == 202:
                    acknowledged.add(key)

        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            await asyncio.gather(*(sender(client) for _ in range(4)))


async def bucket_mismatches(url: str, oracle: Oracle, totals: dict[str, int]) -> list[str]:
    """Every way the server's series differ from the oracle: a bucket's count, or a series that
    does not sum to the key's total."""
    found = []
    start = time.time() - 3 * 3600
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for key, total in totals.items():
            path = f"/counters/{quote(key, safe='')}"
            assert (await client.get(path)).json()["value"] == total
            for name, length in GRANULARITIES.items():
                resp = await client.get(
                    f"{path}/series", params={"granularity": name, "from": str(start)}
                )
                body = resp.json()
                if body["sum"] != total:
                    found.append(f"{key} {name}: the series sums to {body['sum']}, not {total}")
                for bucket, value in body["points"]:
                    want = oracle.get((key, length, bucket), 0)
                    if value != want:
                        found.append(f"{key} {name} {bucket}: {value}, counted {want}")
    return found


def bucket_args(tmp_path: Path, db_url: str, *more: str) -> list[str]:
    return serve_args(
        tmp_path, db_url, "--buckets", "minute,hour,day", "--flush-interval", "0.05", *more
    )


async def test_every_bucket_is_exact_after_kill_9_during_the_load(
    tmp_path: Path, db_url: str
) -> None:
    """SIGKILL right after a flush commits (before the process knows), then SIGKILL at a
    random moment of the load; each time restarted and every batch sent again: every bucket of
    every key equals the independent count, and every series sums to its total. Then one
    bucket made one off in the database is caught by the same checker."""
    keys = [unique("x") for _ in range(8)]
    load = Batches(keys, seed=11, count=300)
    acknowledged: set[str] = set()
    # A flush every 0.05 s, never stretched: the third commit comes while the load still runs
    # (stretched to 16x a flush of this load, two commits can take in all of it, and no third
    # comes at all).
    args = bucket_args(tmp_path, db_url, "--flush-interval-max", "0.05")
    server = spawn(args, env={"INCREMENTER_FAULT_CRASH_AFTER_COMMITS": "3"})
    await load.send(server.url, acknowledged, stop_after=10)
    assert server.proc.wait(30) == 137  # the crash point: killed with a commit not yet seen
    server = spawn(args)
    again: set[str] = set()  # every batch again, acknowledged before or not
    sending = asyncio.create_task(load.send(server.url, again, stop_after=10))
    await asyncio.sleep(0.3)
    kill(server.proc)  # SIGKILL, mid-load
    await sending
    assert 0 < len(again) < len(load.batches)
    with spawned(args) as server:
        finished: set[str] = set()
        await load.send(server.url, finished)  # everything once more: replays count nothing
        assert len(finished) == len(load.batches)
        await wait_until(lambda: totals_are(db_url, dict(load.totals)), timeout=30)
        assert await bucket_mismatches(server.url, load.oracle, dict(load.totals)) == []
        # The harness catches a bucket one off: the checker is not blind.
        victim = keys[0]
        await db_execute(
            db_url, "UPDATE counters SET minute_value = minute_value + 1 WHERE key = $1", victim
        )
        found = await bucket_mismatches(server.url, load.oracle, dict(load.totals))
        assert any(line.startswith(f"{victim} minute") for line in found), found
        server.stop_cleanly()


async def test_an_idempotent_batch_sent_to_two_instances_counts_once_in_every_bucket(
    tmp_path: Path, pg_url: str
) -> None:
    """The same keyed batches taken in by two instances before either flushes (a retry that
    reached both): whichever flush commits first applies them, the other's copy is taken back
    out of every bucket, its own-time items and its arrival-time ones alike."""
    keys = [unique("y") for _ in range(5)]
    load = Batches(keys, seed=5, count=6, size=20)
    arrival = unique("arrival")
    for _, items in load.batches:
        items.append({"key": arrival, "value": 1})  # counted at its arrival, wherever it lands
    slow = ("--flush-interval", "3", "--flush-interval-max", "3")
    first = spawn(bucket_args(tmp_path / "a", pg_url, *slow))
    second = spawn(bucket_args(tmp_path / "b", pg_url, *slow))
    try:
        for server in (first, second):
            await load.send(server.url, set())
        totals = {**load.totals, arrival: len(load.batches)}
        await wait_until(lambda: totals_are(pg_url, totals), timeout=30)
        # Both flushed (a copy still unflushed would show in its instance's reads until then).
        await asyncio.sleep(3.5)
        for server in (first, second):
            assert await bucket_mismatches(server.url, load.oracle, dict(load.totals)) == []
            async with httpx.AsyncClient(base_url=server.url) as client:
                for name in GRANULARITIES:
                    resp = await client.get(
                        f"/counters/{arrival}/series", params={"granularity": name}
                    )
                    assert resp.json()["sum"] == len(load.batches)
    finally:
        for server in (first, second):
            server.stop_cleanly()


async def test_a_wal_written_with_buckets_off_replays_into_the_totals_only(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Frames written before buckets were on (no times) replay into the totals at the next
    start with --buckets; frames with times, replayed with buckets off, into the totals too,
    and replayed with buckets on, into the buckets they were counted in."""
    off = serve_args(tmp_path, sqlite_url, "--flush-interval", "9", "--flush-interval-max", "9")
    on = bucket_args(tmp_path, sqlite_url, "--flush-interval", "9", "--flush-interval-max", "9")
    plain, timed = unique(), unique()
    at = int(time.time()) - 600

    async def send(server: Spawned, key: str) -> None:
        async with httpx.AsyncClient(base_url=server.url) as client:
            body = {"key": key, "value": 5, "at": at}
            assert (await client.post("/increment", json=body)).status_code == 202

    server = spawn(off)
    await send(server, plain)
    kill(server.proc)  # the WAL holds it, unflushed: a frame without times
    server = spawn(on)
    await send(server, timed)
    kill(server.proc)  # and now a frame with its time
    with spawned(on) as server:
        await wait_until(lambda: totals_are(sqlite_url, {plain: 5, timed: 5}))
        async with httpx.AsyncClient(base_url=server.url) as client:
            for key, want in ((plain, 0), (timed, 5)):
                resp = await client.get(
                    f"/counters/{key}/series",
                    params={"granularity": "minute", "from": str(at - 60)},
                )
                assert resp.json()["sum"] == want, key
                if want:
                    assert [p for p in resp.json()["points"] if p[1]] == [
                        [periods.bucket_start(at, 60), 5]
                    ]
        server.stop_cleanly()
    server = spawn(on)
    await send(server, timed)
    kill(server.proc)
    with spawned(off) as server:  # a timed frame read with buckets off: the total counts it
        await wait_until(lambda: totals_are(sqlite_url, {timed: 10}))
        server.stop_cleanly()


async def test_a_workers_group_keeps_every_bucket_exact(tmp_path: Path, pg_url: str) -> None:
    """--workers 2 with buckets: load spread over both workers, one killed with SIGKILL and
    restarted by the supervisor, every batch sent again: every bucket exact, read from any
    worker."""
    keys = [unique("w") for _ in range(6)]
    load = Batches(keys, seed=23, count=300)
    acknowledged: set[str] = set()
    group = spawn_group(bucket_args(tmp_path, pg_url, "--log-level", "info"), 2)
    try:
        sending = asyncio.create_task(load.send(group.url, acknowledged, stop_after=8))
        await asyncio.sleep(0.3)
        victim = worker_pids(group)[0]
        kill_9(victim)
        await sending
        await wait_until(lambda: "serving again" in group.read_log(), timeout=30)
        await load.send(group.url, set())
        await wait_until(lambda: totals_are(pg_url, dict(load.totals)), timeout=30)
        # A resent batch the other worker had not flushed yet reached this one as new: its
        # copy shows in this worker's reads until its flush takes it back (the database was
        # exact all along). Read once neither worker holds anything unflushed.
        await wait_until(lambda: group_holds_nothing_unflushed(group.url), timeout=30)
        for _ in range(3):  # whichever worker answers
            assert await bucket_mismatches(group.url, load.oracle, dict(load.totals)) == []
    finally:
        assert group.stop(signal.SIGTERM) == 0


async def group_holds_nothing_unflushed(url: str) -> bool:
    """True when /readyz says the group's workers hold no pending key, twice, a heartbeat
    apart (each worker's figure reaches the others through a file rewritten every 0.25 s)."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(2):
            if (await client.get("/readyz")).json()["pending_keys"] != 0:
                return False
            await asyncio.sleep(0.3)
    return True


def kill_9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


async def test_every_bucket_is_exact_through_a_database_outage(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL cut off during the load (flushes fail and are retried unchanged, the
    connection dropped mid-transaction), then back: every bucket exact, every series summing
    to its total."""
    from proxy import proxy_to

    keys = [unique("o") for _ in range(6)]
    load = Batches(keys, seed=31, count=200)
    async with proxy_to(pg_url) as (proxy, via_proxy):
        # Started on a thread: the proxy serves from this loop while the server migrates.
        server = await asyncio.to_thread(spawn, bucket_args(tmp_path, via_proxy))
        try:
            sending = asyncio.create_task(load.send(server.url, set(), stop_after=30))
            await asyncio.sleep(0.2)
            await proxy.cut()
            await asyncio.sleep(2)
            await proxy.restore()
            await sending
            await load.send(server.url, set())  # whatever a cut connection left unanswered
            await wait_until(lambda: totals_are(pg_url, dict(load.totals)), timeout=30)
            assert await bucket_mismatches(server.url, load.oracle, dict(load.totals)) == []
            assert "flush failed" in server.read_log()
        finally:
            assert await asyncio.to_thread(server.stop) == 0
