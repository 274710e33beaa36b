"""A worker whose event loop hangs (a fault hook blocks it) is killed by the supervisor's
watchdog after --worker-timeout and replaced; it replays its WAL, so nothing it acknowledged is
lost, and the same run in --durability memory, where nothing survives the kill, shows the check
catching the loss. The dead worker's live metrics are gone from the group's files."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from fleet import record_until, spawn_group, worker_pids
from support import LoadResult, db_totals, serve_args, unique, violations, wait_until


def answered(seen: LoadResult) -> int:
    return seen.statuses.get(202, 0)


@pytest.mark.parametrize("durability", ["wal", "memory"])
async def test_a_hung_worker_is_replaced_and_nothing_acknowledged_is_lost(
    tmp_path: Path, sqlite_url: str, durability: str
) -> None:
    """Under load, worker 1's loop hangs: the supervisor kills it after --worker-timeout 2 s
    (one log line), restarts it, and the group serves on; the database ends with exactly what
    was acknowledged (at most plus what was in flight). In memory mode (flushes held 3 s) the
    hung worker's acknowledged increments die with it, and the same check says so."""
    keys = [unique(f"hang-{i}-") for i in range(50)]
    hang = tmp_path / "hang"
    args = serve_args(tmp_path, sqlite_url, "--log-level", "info", "--worker-timeout", "2",
                      "--durability", durability, "--flush-interval", "3",
                      "--flush-interval-max", "3", "--lag-bound", "30")  # fmt: skip
    group = await asyncio.to_thread(
        spawn_group, args, 2, env={"INCREMENTER_FAULT_HANG_FILE": str(hang)}
    )
    seen = LoadResult()
    try:
        stop = asyncio.Event()
        loader = asyncio.create_task(record_until(group.url, stop, keys, seen, connections=8))
        await wait_until(lambda: answered(seen) > 2000, timeout=60)
        victim = worker_pids(group)[1]
        Path(f"{hang}.{victim}").touch()
        await wait_until(lambda: "has not answered for" in group.read_log(), timeout=30)
        await wait_until(lambda: "worker 1 serving again" in group.read_log(), timeout=30)
        before = answered(seen)
        await wait_until(lambda: answered(seen) > before + 2000, timeout=60)
        stop.set()
        await loader
        metrics = tmp_path / "data" / "run" / "metrics"
        assert list(metrics.glob("gauge_live*_w1g1.db")) == []  # the dead worker's live gauges
        assert list(metrics.glob("counter_w1g1.db")) != []  # its counts happened: they stay
    finally:
        code = await asyncio.to_thread(group.stop, signal.SIGTERM)
    log = group.read_log()
    assert code == 0, log[-3000:]
    assert f"worker 1 (pid {victim}) has not answered for" in log
    assert f"worker 1 (pid {victim}) was killed by SIGKILL" in log
    totals = await db_totals(sqlite_url, keys)
    found = violations(seen.acked, seen.in_flight, totals)
    if durability == "wal":
        assert found == []
    else:
        assert found != []
