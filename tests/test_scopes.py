"""API key scopes and prefixes: what a key may write, read and administer, on both engines, in a
`--workers` group, through the Python client, and for keys made before scopes existed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from incrementer_client import AsyncClient, Refused
from support import (
    counter_path,
    db_execute,
    db_totals,
    run_cli,
    run_service,
    serve_args,
    settings_for,
    spawned,
    unique,
)

from incrementer.auth.keyring import new_key
from incrementer.store import open_store
from incrementer.store.base import ApiKey
from incrementer.store.migrate import migrate


async def scoped_key(
    database_url: str,
    scopes: tuple[str, ...],
    prefix: str | None = None,
    name: str = "",
    rate: float | None = None,
    burst: int | None = None,
) -> str:
    """A key stored as `keys create --scope ... --prefix ...` stores one."""
    await asyncio.to_thread(migrate, database_url)
    key, key_id, key_hash = new_key()
    store = open_store(database_url)
    await store.open()
    try:
        await store.create_api_key(
            ApiKey(
                name or unique("scoped-"),
                key_id,
                key_hash,
                rate,
                burst,
                scopes=scopes,
                prefix=prefix,
            )
        )
    finally:
        await store.close()
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def forbidden(answer: httpx.Response) -> bool:
    return answer.status_code == 403 and answer.json()["error"] == "forbidden"


async def test_each_scope_opens_its_routes_only(tmp_path: Path, db_url: str) -> None:
    """Guards scopes: a write key cannot read counters or /metrics, a read key cannot write
    (neither on the fast path nor with a form or a batch), only an admin key reads /metrics and
    the details of /readyz; every refusal is 403 JSON and changes nothing."""
    writer = await scoped_key(db_url, ("write",))
    reader = await scoped_key(db_url, ("read",))
    admin = await scoped_key(db_url, ("admin",))
    everything = await scoped_key(db_url, ("write", "read", "admin"))
    key = unique("scoped-")
    settings = settings_for(tmp_path, db_url, auth="required")
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        # Twice each: the second request of a key finds it in the keyring's cache (fast path).
        for _ in range(2):
            wrote = await client.post(
                "/increment", json={"key": key, "value": 1}, headers=bearer(writer)
            )
            assert wrote.status_code == 202
            assert forbidden(
                await client.post(
                    "/increment", json={"key": key, "value": 100}, headers=bearer(reader)
                )
            )
        assert forbidden(
            await client.post(
                "/increment", data={"key": key, "value": "100"}, headers=bearer(admin)
            )
        )
        assert forbidden(
            await client.post(
                "/increments", json=[{"key": key, "value": 100}], headers=bearer(reader)
            )
        )
        assert forbidden(await client.get(counter_path(key), headers=bearer(writer)))
        assert forbidden(await client.get(f"/counters?key={key}", headers=bearer(admin)))
        assert forbidden(await client.get("/metrics", headers=bearer(writer)))
        assert forbidden(await client.get("/metrics", headers=bearer(reader)))
        read = await client.get(counter_path(key), headers=bearer(reader))
        assert read.status_code == 200 and read.json()["value"] == 2
        assert (await client.get("/metrics", headers=bearer(admin))).status_code == 200
        for who, details in ((reader, False), (writer, False), (admin, True), (everything, True)):
            ready = await client.get("/readyz", headers=bearer(who))
            assert ("details" in ready.json()) is details
        metrics = (await client.get("/metrics", headers=bearer(admin))).text
        assert 'incrementer_http_requests_total{route="increment",status="403"} 3.0' in metrics
    assert await db_totals(db_url, [key]) == {key: 2}


async def test_a_prefix_confines_writes_and_reads(tmp_path: Path, db_url: str) -> None:
    """Guards prefixes: a key limited to `t1/` writes and reads counters under it only; a batch
    with one key outside is refused whole; listings and top N must ask within the prefix."""
    key = await scoped_key(db_url, ("write", "read"), prefix="t1/")
    mine, theirs = unique("t1/"), unique("t2/")
    settings = settings_for(tmp_path, db_url, auth="required")
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        for _ in range(2):  # first sight, then cached
            assert (
                await client.post("/increment", json={"key": mine, "value": 1}, headers=bearer(key))
            ).status_code == 202
            refused = await client.post(
                "/increment", json={"key": theirs, "value": 1}, headers=bearer(key)
            )
            assert forbidden(refused) and "'t1/'" in refused.json()["detail"]
        assert forbidden(
            await client.post("/increment", data={"key": theirs, "value": "1"}, headers=bearer(key))
        )
        batch = [{"key": mine, "value": 5}, {"key": theirs, "value": 5}]
        assert forbidden(await client.post("/increments", json=batch, headers=bearer(key)))
        # A malformed body is still the route's 400, not a 403.
        headers = {**bearer(key), "Content-Type": "application/json"}
        bad = await client.post("/increments", content=b"[", headers=headers)
        assert bad.status_code == 400
        assert (await client.get(counter_path(mine), headers=bearer(key))).json()["value"] == 2
        assert forbidden(await client.get(counter_path(theirs), headers=bearer(key)))
        assert forbidden(await client.get(counter_path(theirs) + "/series", headers=bearer(key)))
        assert forbidden(
            await client.get(
                "/counters", params=[("key", mine), ("key", theirs)], headers=bearer(key)
            )
        )
        both = await client.get("/counters", params=[("key", mine)], headers=bearer(key))
        assert both.status_code == 200
        listed = await client.get("/counters", params={"prefix": "t1/"}, headers=bearer(key))
        assert listed.status_code == 200
        for prefix in ("", "t", "t2/"):
            for extra in ({}, {"order": "value"}):
                answer = await client.get(
                    "/counters", params={"prefix": prefix, **extra}, headers=bearer(key)
                )
                assert forbidden(answer), (prefix, extra, answer.text)
    assert await db_totals(db_url, [mine, theirs]) == {mine: 2}


async def test_a_prefixed_key_refused_by_its_rate_limit_confines_no_one_else(
    tmp_path: Path, db_url: str
) -> None:
    """Guards the hand-over between the guard and the prefix check: a key with a prefix refused
    429 by its own rate limit must not leave its prefix to be checked against the next request,
    another key's, which may write anywhere."""
    slow = await scoped_key(db_url, ("write",), prefix="mine/", rate=0.001, burst=1)
    free = await scoped_key(db_url, ("write", "read", "admin"))
    mine, other = "mine/" + unique("k-"), unique("elsewhere-")
    settings = settings_for(tmp_path, db_url, auth="required")
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        batch = [{"key": mine, "value": 1}]
        assert (
            await client.post("/increments", json=batch, headers=bearer(slow))
        ).status_code == 202
        limited = await client.post("/increments", json=batch, headers=bearer(slow))
        assert limited.status_code == 429, limited.text
        wrote = await client.post(
            "/increments", json=[{"key": other, "value": 5}], headers=bearer(free)
        )
        assert wrote.status_code == 202, wrote.text
    assert await db_totals(db_url, [mine, other]) == {mine: 1, other: 5}


async def test_keys_made_before_scopes_keep_every_right(tmp_path: Path, db_url: str) -> None:
    """Guards the migration: a key stored under the schema before scopes (0007) still writes,
    reads and administers, with no prefix, once the database is migrated."""
    await asyncio.to_thread(migrate, db_url, until="0007.time-buckets")
    key, key_id, key_hash = new_key()
    name = unique("legacy-")
    await db_execute(
        db_url,
        "INSERT INTO api_keys (name, key_id, key_hash, created_at) VALUES ("
        + (
            "$1, $2, $3, now())"
            if db_url.startswith("postgres")
            else "?, ?, ?, '2026-01-01T00:00:00Z')"
        ),
        name,
        key_id,
        key_hash,
    )
    await asyncio.to_thread(migrate, db_url)
    store = open_store(db_url)
    await store.open()
    try:
        found = [k for k in await store.api_keys() if k.name == name]
    finally:
        await store.close()
    assert [(k.scopes, k.prefix) for k in found] == [(("write", "read", "admin"), None)]
    counter = unique("legacy-")
    settings = settings_for(tmp_path, db_url, auth="required")
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        assert (
            await client.post("/increment", json={"key": counter, "value": 1}, headers=bearer(key))
        ).status_code == 202
        assert (await client.get(counter_path(counter), headers=bearer(key))).status_code == 200
        assert (await client.get("/metrics", headers=bearer(key))).status_code == 200


def test_keys_cli_scope_and_prefix(tmp_path: Path) -> None:
    """keys create --scope/--prefix store them, keys list shows them, a rotation keeps them,
    and an unknown scope is a one-line usage error."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    made = run_cli(
        "keys", "create", "tenant", "--scope", "read,write", "--prefix", "t1/",
        "--database-url", url, cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    listed = run_cli("keys", "list", "--database-url", url, cwd=tmp_path).stdout.splitlines()
    assert listed[1].split()[3:5] == ["write,read", "'t1/'"]
    rotated = run_cli(
        "keys", "rotate", "tenant", "--grace", "0", "--database-url", url, cwd=tmp_path
    )
    assert rotated.returncode == 0, rotated.stderr
    rows = json.loads(run_cli("keys", "list", "--json", "--database-url", url, cwd=tmp_path).stdout)
    assert [(r["scopes"], r["prefix"]) for r in rows] == [(["write", "read"], "t1/")] * 2
    wrong = run_cli("keys", "create", "x", "--scope", "write,root", "--database-url", url)
    assert wrong.returncode == 2 and "--scope" in wrong.stderr and "Traceback" not in wrong.stderr


def test_scopes_hold_in_a_workers_group(tmp_path: Path, sqlite_url: str) -> None:
    """Guards scopes under `--workers 2`: every worker refuses a read key's writes and a write
    key's reads, whichever worker a connection lands on."""
    reader = asyncio.run(scoped_key(sqlite_url, ("read",)))
    writer = asyncio.run(scoped_key(sqlite_url, ("write",)))
    key = unique("group-")
    args = serve_args(tmp_path, sqlite_url, "--workers", "2", "--auth", "required")
    with spawned(args) as server:
        workers: set[int] = set()
        for _ in range(12):  # fresh connections: the kernel spreads them over the workers
            with httpx.Client(base_url=server.url) as client:
                assert forbidden(
                    client.post("/increment", json={"key": key, "value": 1}, headers=bearer(reader))
                )
                assert (
                    client.post(
                        "/increment", json={"key": key, "value": 1}, headers=bearer(writer)
                    ).status_code
                    == 202
                )
                read = client.get(counter_path(key), headers=bearer(reader))
                assert read.status_code == 200
                workers.add(read.json()["worker"])
                assert forbidden(client.get(counter_path(key), headers=bearer(writer)))
        server.stop_cleanly()
    assert asyncio.run(db_totals(sqlite_url, [key])) == {key: 12}
    assert workers == {0, 1}


async def test_the_client_drops_a_forbidden_batch_without_retrying(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Guards the client: 403 is for good, so a batch a read-only key sends is dropped at once
    (flush raises Refused) rather than retried."""
    reader = await scoped_key(sqlite_url, ("read",))
    settings = settings_for(tmp_path, sqlite_url, auth="required")
    async with run_service(settings) as svc:
        client = AsyncClient(svc.url, api_key=reader, flush_interval=0.05)
        try:
            await client.incr(unique("refused-"))
            with pytest.raises(Refused, match="403"):
                await client.flush(timeout=10)
            assert client.stats.retries == 0 and client.stats.dropped == 1
        finally:
            await client.aclose(timeout=5)
