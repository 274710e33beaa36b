"""Reading your own writes as the README and the runbook say: on the connection that wrote, a
read sees the write at once, also with --workers; elsewhere, a 404 says why it does not yet."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fleet import Conn, one_per_worker, spawn_group
from support import serve_args, unique

# Nothing is flushed while the test runs: every read depends on the answering process's memory.
NO_FLUSH = ("--flush-interval", "30", "--flush-interval-max", "30", "--lag-bound", "60")


async def test_a_read_on_the_writing_connection_sees_the_write(tmp_path: Path) -> None:
    """With --workers 2 and no flush yet, POST then GET on one keep-alive connection returns the
    value every time, on connections the kernel gave to either worker; a read of a key only the
    other worker holds is a 404 that says unflushed increments on other processes are not
    included."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    group = await asyncio.to_thread(spawn_group, serve_args(tmp_path, database_url, *NO_FLUSH), 2)
    try:
        for _ in range(10):
            conn = await Conn.open(group.url)
            try:
                key = unique()
                assert await conn.increment(key, 3) == 202
                read = await conn.request("GET", f"/counters/{key}")
            finally:
                await conn.close()
            answer = json.loads(read.body)
            assert read.status == 200
            # A group's read names the worker that answered it.
            assert answer == {"key": key, "value": 3, "worker": answer.get("worker")}
            assert answer["worker"] in (0, 1)
        conns = await one_per_worker(group.url, 2)
        key = unique()
        assert await conns[0].increment(key, 1) == 202
        elsewhere = await conns[1].request("GET", f"/counters/{key}")
        for conn in conns.values():
            await conn.close()
    finally:
        group.stop_cleanly()
    assert elsewhere.status == 404
    detail = json.loads(elsewhere.body)["detail"]
    assert "Unflushed increments on other instances (or other --workers processes)" in detail
