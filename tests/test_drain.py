"""`incrementer wal drain` and drain.py: what a stopped node left in its WAL, applied exactly once."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from pathlib import Path

from fleet import spawn_group
from support import db_totals, load, run_cli, serve_args, spawn, unique

from incrementer.ingest.wal import WriteAheadLog
from incrementer.node.datadir import RETIRED, DataDir
from incrementer.node.retire import drain_node
from incrementer.store import open_store
from incrementer.store.migrate import migrate

# No flush while the instance runs: what it acknowledges stays in its WAL until it is killed.
NO_FLUSH = ["--flush-interval", "9", "--flush-interval-max", "9", "--lag-bound", "30"]


def wal_drain(data_dir: Path, db_url: str) -> subprocess.CompletedProcess[str]:
    return run_cli("wal", "drain", "--data-dir", str(data_dir), "--database-url", db_url)


async def test_wal_drain_applies_a_killed_instances_wal_once_and_again_is_harmless(
    tmp_path: Path, db_url: str
) -> None:
    """A retired instance's WAL (killed with SIGKILL, nothing flushed): the drain reports what
    it applied, the database then holds exactly the acknowledged increments, a second drain
    applies nothing, and an instance started on the dir later serves without replaying them."""
    keys = [unique(f"drain-{i}-") for i in range(50)]
    data = tmp_path / "data"
    args = serve_args(tmp_path, db_url, *NO_FLUSH)
    server = await asyncio.to_thread(spawn, args)
    items = [(random.choice(keys), random.randint(1, 9)) for _ in range(2000)]
    seen = await load(server.url, items, connections=8, pipeline=16)
    server.stop(signal.SIGKILL)
    assert await db_totals(db_url, keys) == {}

    first = wal_drain(data, db_url)
    assert first.returncode == 0, first.stderr
    assert f"applied 2000 increments to {len(seen.acked)} keys" in first.stdout, first.stdout
    assert await db_totals(db_url, keys) == seen.acked
    assert (data / RETIRED).exists()

    second = wal_drain(data, db_url)
    assert second.returncode == 0, second.stderr
    assert "already retired, nothing after seq" in second.stdout, second.stdout
    assert await db_totals(db_url, keys) == seen.acked

    server = await asyncio.to_thread(spawn, [*args, "--log-level", "info"])
    assert server.stop(signal.SIGTERM) == 0
    assert "replayed" not in server.read_log()
    assert "was retired; serving from it again" in server.read_log()
    assert not (data / RETIRED).exists()
    assert await db_totals(db_url, keys) == seen.acked


async def test_wal_drain_is_refused_while_a_live_process_holds_the_dir(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A drain next to a live node would apply increments the node applies too: refused, in one
    line, for a lone instance's dir and for a live group's dir and worker dirs; nothing changes,
    and the live node still applies its own increments exactly once."""
    key = unique("live-")
    lone_dir = tmp_path / "lone"
    lone = await asyncio.to_thread(
        spawn, ["--database-url", sqlite_url, "--data-dir", str(lone_dir), *NO_FLUSH]
    )
    group_dir = tmp_path / "group"
    group = await asyncio.to_thread(
        spawn_group, ["--database-url", sqlite_url, "--data-dir", str(group_dir), *NO_FLUSH], 2
    )
    try:
        seen = await load(lone.url, [(key, 3)] * 10, connections=1, pipeline=10)
        for data_dir in (lone_dir, group_dir, group_dir / "worker-1"):
            refused = wal_drain(data_dir, sqlite_url)
            assert refused.returncode == 1
            assert refused.stderr.strip().count("\n") == 0, refused.stderr
            assert f"cannot drain {data_dir}" in refused.stderr
            assert "locked by another incrementer process" in refused.stderr
            assert not (data_dir / RETIRED).exists()
        assert await db_totals(sqlite_url, [key]) == {}
    finally:
        assert lone.stop(signal.SIGTERM) == 0
        assert group.stop(signal.SIGTERM) == 0
    assert await db_totals(sqlite_url, [key]) == seen.acked == {key: 30}


async def test_a_drain_applies_batches_cut_at_frame_boundaries(
    tmp_path: Path, sqlite_url: str
) -> None:
    """drain_node applies the frames after the node's applied seq in batches of at most
    batch_keys keys, each claiming the seq of its last frame, so the ledger ends at the last
    frame; frames at or below the applied seq are not applied again."""
    await asyncio.to_thread(migrate, sqlite_url)
    store = open_store(sqlite_url)
    await store.open()
    node = DataDir(tmp_path / "node")
    node.open()  # a node id, as a node that served would have
    try:
        with WriteAheadLog.open(node.wal_path) as wal:
            for frame in range(1, 6):  # seq 1..5, two keys each: a, and one of its own
                wal.append(b"a", 1)
                wal.append(b"k%d" % frame, frame)
                wal.write()
        assert (await store.apply_batch(node.node_id, 2, {"a": 2, "k1": 1, "k2": 2})).applied
        drained = await drain_node(node, store, batch_keys=2)
        assert (drained.applied_before, drained.applied_seq) == (2, 5)
        # Two keys a frame: each of frames 3, 4 and 5 fills a batch of its own.
        assert (drained.frames, drained.increments, drained.keys) == (3, 6, 6)
        assert await store.applied_seq(node.node_id) == 5
        assert await db_totals(sqlite_url, ["a", "k1", "k2", "k3", "k4", "k5"]) == {
            "a": 5, "k1": 1, "k2": 2, "k3": 3, "k4": 4, "k5": 5,
        }  # fmt: skip
        again = await drain_node(node, store, batch_keys=2)
        assert (again.frames, again.was_retired) == (0, True)
        assert await db_totals(sqlite_url, ["a"]) == {"a": 5}
    finally:
        node.close()
        await store.close()


async def test_a_dir_no_node_served_from_is_drained_as_empty(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A data dir without a node id (a supervisor's own, or one never used) holds nothing: the
    drain says so and creates no node id."""
    empty = tmp_path / "empty"
    empty.mkdir()
    done = wal_drain(empty, sqlite_url)
    assert done.returncode == 0, done.stderr
    assert "no node ever served from it, nothing to apply" in done.stdout
    assert not (empty / "node_id").exists()


def test_wal_drain_of_a_missing_dir_is_an_error(tmp_path: Path, sqlite_url: str) -> None:
    """A mistyped --data-dir is refused, not created."""
    done = wal_drain(tmp_path / "nope", sqlite_url)
    assert done.returncode == 2
    assert f"no data dir at {tmp_path / 'nope'}" in done.stderr
    assert not (tmp_path / "nope").exists()


async def test_a_drain_settles_idempotent_batches_and_counts_their_buckets(
    tmp_path: Path, db_url: str
) -> None:
    """A killed instance's WAL holding a keyed batch that another instance applied meanwhile
    (a retry that reached both): the drain applies it once, by its key, as a flush would; and
    with --buckets, each increment lands in the bucket it was counted in."""
    import time

    import httpx

    key = unique("drained-")
    at = int(time.time()) - 600
    batch = [{"key": key, "value": 4, "at": at}, {"key": key, "value": 1}]
    headers = {"Idempotency-Key": unique("retried-")}
    buckets = ["--buckets", "minute,hour,day"]
    killed = await asyncio.to_thread(spawn, serve_args(tmp_path / "a", db_url, *NO_FLUSH, *buckets))
    other = await asyncio.to_thread(spawn, serve_args(tmp_path / "b", db_url, *buckets))
    async with httpx.AsyncClient() as client:
        for server in (killed, other):
            resp = await client.post(server.url + "/increments", json=batch, headers=headers)
            assert resp.status_code == 202
    killed.stop(signal.SIGKILL)
    assert other.stop(signal.SIGTERM) == 0
    assert await db_totals(db_url, [key]) == {key: 5}
    drained = run_cli(
        "wal",
        "drain",
        "--data-dir",
        str(tmp_path / "a" / "data"),
        "--database-url",
        db_url,
        *buckets,
    )
    assert drained.returncode == 0, drained.stderr
    assert await db_totals(db_url, [key]) == {key: 5}
    await asyncio.to_thread(migrate, db_url)
    store = open_store(db_url)
    await store.open()
    try:
        from incrementer.store.base import Window

        minute = await store.read_series(key, Window(60, at - 600, at + 1200), unique())
        assert sum(minute.stored.points().values()) == 5
        assert minute.stored.points()[at - at % 60] == 4
    finally:
        await store.close()
