"""API key changes reach every process at once: PostgreSQL's NOTIFY to instances LISTENing
(reconnecting when their listening connection is cut), SQLite's data_version to a --workers
group, and a rotated key's grace period ending on time. Every instance reloads only every 60 s
here, so what the tests see within seconds is the push."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
from fleet import Conn, one_per_worker, spawn_group
from support import add_api_key, run_cli, serve_args, spawn, unique

BOUND = 5.0  # seconds; the push takes milliseconds (bench.limits measures it), the reload 60 s


async def refused_within(urls: list[str], key: str, bound: float = BOUND) -> list[float]:
    """Seconds until each URL answers 401 to the key (AssertionError past the bound)."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(url: str) -> float:
        async with httpx.AsyncClient(base_url=url) as client:
            while loop.time() - started < bound:
                resp = await client.post(
                    "/increment",
                    json={"key": "push", "value": 1},
                    headers={"Authorization": f"Bearer {key}"},
                )
                if resp.status_code == 401:
                    return loop.time() - started
                await asyncio.sleep(0.02)
        raise AssertionError(f"{url} still takes the key after {bound} s")

    return await asyncio.gather(*(one(url) for url in urls))


async def accepted(url: str, key: str) -> int:
    async with httpx.AsyncClient(base_url=url) as client:
        resp = await client.post(
            "/increment",
            json={"key": "push", "value": 1},
            headers={"Authorization": f"Bearer {key}"},
        )
        return resp.status_code


@contextlib.asynccontextmanager
async def instances(tmp_path: Path, db_url: str, count: int) -> AsyncIterator[list[str]]:
    servers = []
    try:
        for i in range(count):
            args = serve_args(tmp_path, db_url, "--auth", "required", "--auth-refresh", "60",
                              "--log-level", "info", "--data-dir", str(tmp_path / f"n{i}"))  # fmt: skip
            servers.append(await asyncio.to_thread(spawn, args))
        yield [s.url for s in servers]
    finally:
        for server in servers:
            server.stop_cleanly()


async def test_three_instances_refuse_a_revoked_key_at_once(tmp_path: Path, pg_url: str) -> None:
    """Three instances on PostgreSQL take a key; `keys revoke` (NOTIFY) and every one refuses it
    within the bound, a minute before its reload; `keys rotate` likewise: the old key stops, the
    new one works everywhere."""
    name, other = unique("pushed-"), unique("rotated-")
    key = await add_api_key(pg_url, name)
    old = await add_api_key(pg_url, other)
    async with instances(tmp_path, pg_url, 3) as urls:
        assert [await accepted(url, key) for url in urls] == [202] * 3
        assert [await accepted(url, old) for url in urls] == [202] * 3
        revoked = await asyncio.to_thread(run_cli, "keys", "revoke", name, "--database-url", pg_url)
        assert revoked.returncode == 0, revoked.stderr
        await refused_within(urls, key)
        rotated = await asyncio.to_thread(
            run_cli, "keys", "rotate", other, "--grace", "0", "--database-url", pg_url
        )
        assert rotated.returncode == 0, rotated.stderr
        await refused_within(urls, old)
        new = rotated.stdout.strip()
        assert [await accepted(url, new) for url in urls] == [202] * 3


async def test_a_cut_listening_connection_is_opened_again(tmp_path: Path, pg_url: str) -> None:
    """The listening connection terminated on the server's side: the instance says so, listens
    again, and a revocation made after that still reaches it at once."""
    name = unique("relisten-")
    key = await add_api_key(pg_url, name)
    args = serve_args(tmp_path, pg_url, "--auth", "required", "--auth-refresh", "60",
                      "--log-level", "info")  # fmt: skip
    server = await asyncio.to_thread(spawn, args)
    try:
        assert await accepted(server.url, key) == 202
        conn = await asyncpg.connect(pg_url)
        try:
            cut = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'incrementer-listen' AND datname = current_database()"
            )
        finally:
            await conn.close()
        assert cut >= 1
        for _ in range(200):
            if "listening for API key changes again" in server.read_log():
                break
            await asyncio.sleep(0.05)
        assert "not listening for API key changes" in server.read_log()
        assert "listening for API key changes again" in server.read_log()
        revoked = await asyncio.to_thread(run_cli, "keys", "revoke", name, "--database-url", pg_url)
        assert revoked.returncode == 0
        await refused_within([server.url], key)
    finally:
        server.stop_cleanly()


async def test_a_group_on_sqlite_refuses_a_revoked_key_in_every_worker(
    tmp_path: Path, sqlite_url: str
) -> None:
    """`--workers 3` on SQLite: `keys revoke` changes the file, every worker sees its
    data_version move and refuses the key within the bound."""
    name = unique("sqlite-push-")
    key = await add_api_key(sqlite_url, name)
    args = serve_args(tmp_path, sqlite_url, "--auth", "required", "--auth-refresh", "60",
                      "--log-level", "info")  # fmt: skip
    group = await asyncio.to_thread(spawn_group, args, 3)
    try:
        conns = await one_per_worker(group.url, 3)
        auth = f"Authorization: Bearer {key}\r\n"
        for conn in conns.values():
            assert (await _increment(conn, auth)) == 202
        revoked = await asyncio.to_thread(
            run_cli, "keys", "revoke", name, "--database-url", sqlite_url
        )
        assert revoked.returncode == 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, conn in conns.items():
            while (await _increment(conn, auth)) != 401:
                assert loop.time() - started < BOUND, f"worker {index} still takes the key"
                await asyncio.sleep(0.02)
            await conn.close()
    finally:
        group.stop_cleanly()


async def _increment(conn: Conn, auth: str) -> int:
    body = b'{"key":"push","value":1}'
    head = (
        "POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {len(body)}\r\n\r\n"
    )
    conn.writer.write(head.encode() + body)
    wanted = len(conn.collector.done) + 1
    while len(conn.collector.done) < wanted:
        chunk = await asyncio.wait_for(conn.reader.read(65536), 10)
        assert chunk
        conn.collector.parser.feed_data(chunk)
    return conn.collector.done[-1].status


async def test_a_rotated_keys_grace_ends_on_time(tmp_path: Path, sqlite_url: str) -> None:
    """`keys rotate --grace 2`: the old key works during the grace period and stops once it
    ends, long before the next reload (60 s): the instance wakes when it ends."""
    name = unique("grace-")
    old = await add_api_key(sqlite_url, name)
    async with instances(tmp_path, sqlite_url, 1) as (url,):
        rotated = await asyncio.to_thread(
            run_cli, "keys", "rotate", name, "--grace", "2", "--database-url", sqlite_url
        )
        assert rotated.returncode == 0
        assert await accepted(url, old) == 202
        assert await accepted(url, rotated.stdout.strip()) == 202
        await refused_within([url], old, bound=10.0)
