"""A key works on its first request: a cache miss looks its key id up in the database, and the
lookups are bounded (unknown ids remembered, a cap per second). The queries are counted on the
real SQLite database with its trace callback. The push of key changes (test_key_push.py) would
often load a new key before its first request: it is turned off here, as it is on an engine
without LISTEN, so what these prove is the lookup and the periodic reload behind it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
from support import add_api_key, settings_for, unique, wait_until

from incrementer.config import Settings
from incrementer.service import Service
from incrementer.store.sqlite import SQLiteStore

LOOKUP = "FROM api_keys WHERE key_id ="


async def _no_watch(changed: Callable[[], None]) -> None:
    await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def unwatched(
    settings: Settings, trace: Callable[[str], None] | None = None
) -> AsyncIterator[Service]:
    """The service with no push of key changes: keys change by lookup and reload only. With
    `trace`, an SQLite store calls it with every statement its connections run."""
    service = Service(settings)
    service.store.watch_api_keys = _no_watch  # type: ignore[method-assign]
    if trace is not None:
        assert isinstance(service.store, SQLiteStore)
        service.store.trace = trace
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def traced(settings: Settings) -> AsyncIterator[tuple[Service, list[str]]]:
    """The service on SQLite, unwatched, with every statement its connections run recorded."""
    statements: list[str] = []
    async with unwatched(settings, statements.append) as service:
        yield service, statements


def lookups(statements: list[str]) -> int:
    return sum(LOOKUP in sql for sql in statements)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_key_created_while_serving_works_on_its_first_request(
    tmp_path: Path, db_url: str
) -> None:
    """With the next reload an hour away, a key created after the start is taken at once, on
    every protected route, and its later requests take the cache (no second lookup)."""
    await add_api_key(db_url, unique("old-"))
    settings = settings_for(tmp_path, db_url, auth="required", auth_refresh=3600)
    async with unwatched(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        fresh = await add_api_key(db_url, unique("new-"))
        body = {"key": "first-request", "value": 1}
        assert (
            await client.post("/increment", json=body, headers=bearer(fresh))
        ).status_code == 202
        for _ in range(5):
            await client.post("/increment", json=body, headers=bearer(fresh))
        read = await client.get("/counters/first-request", headers=bearer(fresh))
        assert read.json()["value"] == 6
        other = await add_api_key(db_url, unique("reader-"))
        assert (await client.get("/metrics", headers=bearer(other))).status_code == 200
        assert svc.key_source is not None and svc.key_source.lookups == 2  # one per new key


async def test_concurrent_first_requests_share_one_lookup(tmp_path: Path, sqlite_url: str) -> None:
    """Twenty connections bringing the same new key at once cause one query, and all get in."""
    settings = settings_for(tmp_path, sqlite_url, auth="required", auth_refresh=3600)
    async with traced(settings) as (svc, statements):
        fresh = await add_api_key(sqlite_url, "crowd")

        async def one() -> int:
            async with httpx.AsyncClient(base_url=svc.url) as client:
                body = {"key": "crowd", "value": 1}
                return (
                    await client.post("/increment", json=body, headers=bearer(fresh))
                ).status_code

        assert await asyncio.gather(*(one() for _ in range(20))) == [202] * 20
        assert lookups(statements) == 1


async def test_an_unknown_key_is_looked_up_once_until_the_next_reload(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Fifty requests with the same made-up key make one query (the id is remembered as
    absent); once that key is created, it works within --auth-refresh."""
    made_up = "ik_abcdef123456.not-a-real-secret"
    settings = settings_for(tmp_path, sqlite_url, auth="required", auth_refresh=1.0)
    async with (
        traced(settings) as (svc, statements),
        httpx.AsyncClient(base_url=svc.url, headers=bearer(made_up)) as client,
    ):
        body = {"key": "probe", "value": 1}
        statuses = [(await client.post("/increment", json=body)).status_code for _ in range(50)]
        assert statuses == [401] * 50
        assert lookups(statements) == 1

        await add_api_key(sqlite_url, "late", key=made_up)

        async def accepted() -> bool:
            return (await client.post("/increment", json=body)).status_code == 202

        await wait_until(accepted, timeout=10)


async def test_a_flood_of_made_up_keys_is_capped_per_second(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Two hundred different made-up keys as fast as they come: at most --auth-lookup-rate
    queries a second (plus one second's burst), not one each; a known key is not held up."""
    known = await add_api_key(sqlite_url, "known")
    rate = 5.0
    settings = settings_for(
        tmp_path, sqlite_url, auth="required", auth_refresh=3600, auth_lookup_rate=rate
    )
    async with traced(settings) as (svc, statements), httpx.AsyncClient(base_url=svc.url) as client:
        body = {"key": "flood", "value": 1}
        started = time.monotonic()
        for i in range(200):
            made_up = f"ik_{i:012x}.flood"
            resp = await client.post("/increment", json=body, headers=bearer(made_up))
            assert resp.status_code == 401
        elapsed = time.monotonic() - started
        assert (
            await client.post("/increment", json=body, headers=bearer(known))
        ).status_code == 202
    made = lookups(statements)
    assert 1 <= made <= rate * (1 + elapsed) + 1, (made, elapsed)
    assert made < 200


async def test_lookups_off_new_keys_wait_for_the_reload(tmp_path: Path, sqlite_url: str) -> None:
    """--auth-lookup-rate 0: no query for an unknown key; a new key works after a reload."""
    settings = settings_for(
        tmp_path, sqlite_url, auth="required", auth_refresh=0.5, auth_lookup_rate=0
    )
    async with traced(settings) as (svc, statements), httpx.AsyncClient(base_url=svc.url) as client:
        fresh = await add_api_key(sqlite_url, "patient")

        async def accepted() -> bool:
            resp = await client.post(
                "/increment", json={"key": "p", "value": 1}, headers=bearer(fresh)
            )
            return resp.status_code == 202

        await wait_until(accepted, timeout=10)
        assert lookups(statements) == 0


async def test_a_flood_from_one_address_leaves_lookups_for_another(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Guards one --auth-lookup-rate shared by everyone: 127.0.0.1 sending made-up keys to
    /readyz without pause spends only its own lookups (about 5 a second), and keys created a
    moment before work on their first request from 127.0.0.2 (within that address's own 5)."""
    settings = settings_for(
        tmp_path, sqlite_url, auth="required", auth_refresh=3600, auth_lookup_rate=5
    )
    async with traced(settings) as (svc, statements):
        stop = asyncio.Event()
        sent = 0

        async def flood() -> None:
            nonlocal sent
            transport = httpx.AsyncHTTPTransport(local_address="127.0.0.1")
            async with httpx.AsyncClient(base_url=svc.url, transport=transport) as client:
                while not stop.is_set():
                    made_up = f"ik_{sent:012x}.flood"
                    await client.get("/readyz", headers=bearer(made_up))  # 200, no details
                    sent += 1

        flooding = asyncio.create_task(flood())
        started = time.monotonic()
        try:
            await wait_until(lambda: sent >= 50)
            transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
            async with httpx.AsyncClient(base_url=svc.url, transport=transport) as client:
                for i in range(3):
                    fresh = await add_api_key(sqlite_url, unique(f"new{i}-"))
                    resp = await client.post(
                        "/increment", json={"key": "n", "value": 1}, headers=bearer(fresh)
                    )
                    assert resp.status_code == 202, resp.text
        finally:
            stop.set()
            await flooding
        elapsed = time.monotonic() - started
    made = lookups(statements)
    assert made <= 5 * (1 + elapsed) + 3 + 1, (made, sent, elapsed)  # the flood's, and 3 keys
    assert made < sent
