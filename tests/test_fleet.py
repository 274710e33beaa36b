"""A fleet behind a real nginx (deploy/nginx/incrementer.conf): instances and workers killed and
restarted under load, and the database holds exactly what was acknowledged, nothing twice."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import asyncpg
import httpx
import pytest
from fleet import (
    DEPLOY_CONF,
    alive,
    nginx_in_front,
    nginx_test,
    record_until,
    spawn_group,
    worker_pids,
    write_nginx,
)
from support import (
    LoadResult,
    db_totals,
    free_port,
    kill,
    run_cli,
    serve_args,
    spawn,
    unique,
    violations,
    wait_until,
)


def test_deploy_config_passes_nginx_t_and_never_resends_a_post(tmp_path: Path) -> None:
    """The shipped config is valid for nginx, keeps upstream connections alive, and retries on
    another instance without `non_idempotent`, so a POST that reached one is never sent twice."""
    main = write_nginx(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"], free_port())
    checked = nginx_test(main)
    assert checked.returncode == 0, checked.stderr
    text = DEPLOY_CONF.read_text()
    directives = [line.split("#")[0].strip() for line in text.splitlines()]
    next_upstream = [d for d in directives if d.startswith("proxy_next_upstream ")]
    assert next_upstream and "non_idempotent" not in next_upstream[0]
    assert any(d.startswith("keepalive ") for d in directives)
    assert 'proxy_set_header Connection "";' in directives
    assert "proxy_http_version 1.1;" in directives


def test_the_consistent_hash_alternative_passes_nginx_t(tmp_path: Path) -> None:
    """The commented alternative of the shipped config, pinning each API key to one instance
    (`hash $http_authorization consistent`), is valid nginx once uncommented."""
    main = write_nginx(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"], free_port())
    conf = main.parent / "incrementer.conf"
    text = conf.read_text()
    alternative = "#     hash $http_authorization consistent;"
    assert alternative in text
    conf.write_text(text.replace(alternative, "hash $http_authorization consistent;"))
    checked = nginx_test(main)
    assert checked.returncode == 0, checked.stderr


async def test_fleet_behind_nginx_survives_kill9_and_a_rolling_restart(
    tmp_path: Path, pg_url: str
) -> None:
    """Three instances on one PostgreSQL behind nginx under load: one killed with SIGKILL and
    restarted, then another stopped with SIGTERM and restarted. The database holds exactly the
    acknowledged increments, at most plus those whose answer was lost, none twice; a copy of the
    killed instance's WAL drained under another node id (two nodes claiming one log) is caught
    as double counting by the same check."""
    keys = [unique(f"fleet-{i}-") for i in range(200)]
    ports = [free_port() for _ in range(3)]

    def args(i: int) -> list[str]:
        return ["--database-url", pg_url, "--data-dir", str(tmp_path / f"node{i}"),
                "--port", str(ports[i]), "--log-level", "info"]  # fmt: skip

    instances = [await asyncio.to_thread(spawn, args(i)) for i in range(3)]
    seen = LoadResult()
    try:
        with nginx_in_front(tmp_path / "nginx", [f"127.0.0.1:{p}" for p in ports]) as url:
            stop = asyncio.Event()
            loader = asyncio.create_task(record_until(url, stop, keys, seen))
            await wait_until(lambda: answered(seen) > 3000, timeout=60)
            kill(instances[0].proc)  # mid-load: its WAL has frames not yet flushed
            shutil.copytree(tmp_path / "node0", tmp_path / "node0-copy")
            before = answered(seen)
            await wait_until(lambda: answered(seen) > before + 3000, timeout=60)
            instances[0] = await asyncio.to_thread(spawn, args(0))  # replays, then listens
            assert await asyncio.to_thread(instances[1].stop, signal.SIGTERM) == 0
            instances[1] = await asyncio.to_thread(spawn, args(1))
            before = answered(seen)
            await wait_until(lambda: answered(seen) > before + 3000, timeout=60)
            stop.set()
            await loader
    finally:
        codes = [await asyncio.to_thread(i.stop, signal.SIGTERM) for i in instances]
    assert codes == [0, 0, 0], [i.read_log()[-2000:] for i in instances]
    assert "replayed" in instances[0].read_log()
    assert sum(seen.in_flight.values()) < sum(seen.acked.values()) / 20, seen.statuses
    totals = await db_totals(pg_url, keys)
    assert violations(seen.acked, seen.in_flight, totals) == []
    nodes = [(tmp_path / f"node{i}" / "node_id").read_text().strip() for i in range(3)]
    assert await _flushed(pg_url, nodes) == 3  # nginx spread the load over all three

    copy = tmp_path / "node0-copy"
    (copy / "node_id").write_text(unique() + "\n")
    drained = run_cli("wal", "drain", "--data-dir", str(copy), "--database-url", pg_url)
    assert drained.returncode == 0, drained.stderr
    assert "applied" in drained.stdout
    assert violations(seen.acked, seen.in_flight, await db_totals(pg_url, keys)) != []


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
async def test_workers_behind_nginx_survive_kill9_of_a_worker(
    tmp_path: Path, db: str, request: pytest.FixtureRequest
) -> None:
    """`--workers 3` behind nginx under load, one worker killed with SIGKILL: the supervisor
    restarts it (it replays its WAL first), the group drains on SIGTERM with status 0, and the
    database holds exactly the acknowledged increments, none twice."""
    db_url = (
        f"sqlite:///{tmp_path / 'c.db'}" if db == "sqlite" else request.getfixturevalue("pg_url")
    )
    keys = [unique(f"group-{i}-") for i in range(200)]
    port = free_port()
    args = serve_args(tmp_path, db_url, "--port", str(port), "--log-level", "info")
    group = await asyncio.to_thread(spawn_group, args, 3)
    seen = LoadResult()
    try:
        with nginx_in_front(tmp_path / "nginx", [f"127.0.0.1:{port}"]) as url:
            stop = asyncio.Event()
            loader = asyncio.create_task(record_until(url, stop, keys, seen, connections=12))
            await wait_until(lambda: answered(seen) > 3000, timeout=60)
            victim = worker_pids(group)[1]
            os.kill(victim, signal.SIGKILL)
            await wait_until(lambda: "restarting it" in group.read_log(), timeout=10)
            await wait_until(lambda: _restarted(url), timeout=30)
            before = answered(seen)
            await wait_until(lambda: answered(seen) > before + 3000, timeout=60)
            stop.set()
            await loader
    finally:
        code = await asyncio.to_thread(group.stop, signal.SIGTERM)
    log = group.read_log()
    assert code == 0, log[-3000:]
    assert f"(pid {victim}) was killed by SIGKILL" in log
    assert not alive(victim)
    assert sum(seen.in_flight.values()) < sum(seen.acked.values()) / 20, seen.statuses
    totals = await db_totals(db_url, keys)
    assert violations(seen.acked, seen.in_flight, totals) == []
    for i in range(3):
        assert (tmp_path / "data" / f"worker-{i}" / "node_id").exists()


def answered(seen: LoadResult) -> int:
    """Requests answered 202 so far."""
    return seen.statuses.get(202, 0)


async def _restarted(url: str) -> bool:
    """The supervisor counts the restart and three workers serving again."""
    async with httpx.AsyncClient(base_url=url) as client:
        text = (await client.get("/metrics")).text
    return "incrementer_worker_restarts_total 1.0" in text and "incrementer_workers 3.0" in text


async def _flushed(pg_url: str, nodes: list[str]) -> int:
    """How many of these nodes have applied a batch."""
    conn = await asyncpg.connect(pg_url)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM incrementer_nodes WHERE node_id = ANY($1) AND applied_seq > 0",
            nodes,
        )
        return int(found)
    finally:
        await conn.close()
