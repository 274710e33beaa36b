"""Idempotency keys belong to their sender: two API keys (two client IPs with auth off) using one
Idempotency-Key are two batches, each applied; neither can confirm nor block the other's. Each
sender may take in --idempotency-keys-per-client new keys per window, in a --workers group too.
The rows stored before keys were scoped answer no request but their own batch's retry. Against
real servers and both databases."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from fleet import Conn, one_per_worker, spawn_group
from support import (
    Response,
    add_api_key,
    db_execute,
    db_totals,
    hand_frame,
    run_service,
    serve_args,
    settings_for,
    unique,
    wait_until,
)

from incrementer.config import ConfigError, Settings
from incrementer.ingest.idempotency import digest, encode
from incrementer.ingest.wal import WriteAheadLog, summarize
from incrementer.ingest.wal_reader import (
    BATCH_RANGE,
    ENTRIES_LEN,
    MAGIC_KEYED,
    segment_name,
)
from incrementer.service import Service
from incrementer.store.base import scoped, unscoped
from incrementer.store.migrate import migrate

REPLAYED = "idempotent-replayed"
Items = list[tuple[str, int]]


def body(items: Items) -> bytes:
    return msgspec.json.encode([{"key": k, "value": v} for k, v in items])


async def send(
    client: httpx.AsyncClient, url: str, items: Items, key: str, api_key: str | None = None
) -> httpx.Response:
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return await client.post(url + "/increments", content=body(items), headers=headers)


@asynccontextmanager
async def instance(tmp_path: Path, db_url: str, **overrides: Any) -> AsyncIterator[Service]:
    async with run_service(settings_for(tmp_path, db_url, **overrides)) as service:
        yield service


async def stored_rows(db_url: str, key: str) -> list[tuple[str, str]]:
    """(principal, digest) of every stored row of an Idempotency-Key, by principal."""
    sql = "SELECT principal, digest FROM idempotency_keys WHERE key = $1 ORDER BY principal"
    if db_url.startswith("sqlite:///"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        try:
            return [tuple(row) for row in conn.execute(sql.replace("$1", "?"), (key,))]
        finally:
            conn.close()
    pg = await asyncpg.connect(db_url)
    try:
        return [(row[0], row[1]) for row in await pg.fetch(sql, key)]
    finally:
        await pg.close()


async def principal_rows(db_url: str, principal: str, prefix: str) -> int:
    """How many rows of principal's hold a key that starts with prefix."""
    sql = "SELECT count(*) FROM idempotency_keys WHERE principal = $1 AND key LIKE $2"
    if db_url.startswith("sqlite:///"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        try:
            found = conn.execute(
                sql.replace("$1", "?").replace("$2", "?"), (principal, prefix + "%")
            )
            return int(found.fetchone()[0])
        finally:
            conn.close()
    pg = await asyncpg.connect(db_url)
    try:
        return int(await pg.fetchval(sql, principal, prefix + "%"))
    finally:
        await pg.close()


# --- scoped by principal ------------------------------------------------------------------------


async def test_two_api_keys_sending_one_key_each_get_their_batch_applied(
    tmp_path: Path, db_url: str
) -> None:
    """Key B sends [t2 += 3] under `order-2`, then key A the same body under the same key: A's
    batch is new (202 without Idempotent-Replayed) and applied, t2 holds 6; each key's own
    retry is still a replay, and each has its own row. (Unscoped, A was told "replayed" and its
    increment was lost: t2 held 3.)"""
    a_key = await add_api_key(db_url, unique("tenant-a-"))
    b_key = await add_api_key(db_url, unique("tenant-b-"))
    t2, order = unique("t2-"), unique("order-2-")
    async with (
        instance(tmp_path, db_url, auth="required") as svc,
        httpx.AsyncClient() as client,
    ):
        by_b = await send(client, svc.url, [(t2, 3)], order, b_key)
        by_a = await send(client, svc.url, [(t2, 3)], order, a_key)
        await wait_until(lambda: svc.flusher is not None and not svc.flusher.pending_keys())
        retries = [await send(client, svc.url, [(t2, 3)], order, k) for k in (a_key, b_key)]
    assert by_b.status_code == by_a.status_code == 202, (by_b.text, by_a.text)
    assert REPLAYED not in by_a.headers
    assert [r.headers.get(REPLAYED) for r in retries] == ["true", "true"]
    assert await db_totals(db_url, [t2]) == {t2: 6}
    assert len(await stored_rows(db_url, order)) == 2


async def test_a_tenant_can_neither_block_nor_confirm_anothers_batch(
    tmp_path: Path, db_url: str
) -> None:
    """An attacker who sends junk under the victim's next key first does not make the victim's
    batch a 422; sending the victim's batch under the victim's key gets no replay header, so it
    confirms nothing (and counts, as the attacker's own). Within one API key, another body
    under a key already used is still 422."""
    attacker = await add_api_key(db_url, unique("attacker-"))
    victim = await add_api_key(db_url, unique("victim-"))
    counter, junk = unique("c-"), unique("junk-")
    planted, guessed = unique("order-"), unique("order-")
    async with (
        instance(tmp_path, db_url, auth="required") as svc,
        httpx.AsyncClient() as client,
    ):
        blocked = await send(client, svc.url, [(junk, 1)], planted, attacker)
        await wait_until(lambda: db_totals(db_url, [junk]))  # the attacker's row is stored
        real = await send(client, svc.url, [(counter, 5)], planted, victim)
        sent = await send(client, svc.url, [(counter, 2)], guessed, victim)
        await wait_until(lambda: svc.flusher is not None and not svc.flusher.pending_keys())
        probe = await send(client, svc.url, [(counter, 2)], guessed, attacker)
        reused = await send(client, svc.url, [(counter, 7)], planted, victim)
        await wait_until(lambda: svc.flusher is not None and not svc.flusher.pending_keys())
    assert blocked.status_code == real.status_code == sent.status_code == 202, real.text
    assert probe.status_code == 202 and REPLAYED not in probe.headers
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"
    assert await db_totals(db_url, [counter, junk]) == {counter: 9, junk: 1}


async def test_with_auth_off_each_client_ip_has_its_own_keys(tmp_path: Path, db_url: str) -> None:
    """Auth off: the principal is the client's IP. 127.0.0.1 and 127.0.0.2 sending one body
    under one key both count; each one's retry is a replay; the rows say whose they are."""
    counter, order = unique("c-"), unique("order-")
    other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with (
        instance(tmp_path, db_url, auth="off") as svc,
        httpx.AsyncClient() as first,
        httpx.AsyncClient(transport=other) as second,
    ):
        answers = [await send(c, svc.url, [(counter, 2)], order) for c in (first, second)]
        await wait_until(lambda: svc.flusher is not None and not svc.flusher.pending_keys())
        retries = [await send(c, svc.url, [(counter, 2)], order) for c in (first, second)]
    assert [REPLAYED in r.headers for r in answers] == [False, False]
    assert [r.headers.get(REPLAYED) for r in retries] == ["true", "true"]
    assert await db_totals(db_url, [counter]) == {counter: 4}
    assert [p for p, _ in await stored_rows(db_url, order)] == ["ip:127.0.0.1", "ip:127.0.0.2"]


# --- rows stored before keys were scoped -------------------------------------------------------


async def test_rows_stored_before_the_upgrade_answer_only_their_own_batch(
    tmp_path: Path, db_url: str
) -> None:
    """Migration 0009 gives the rows already stored the empty principal: a row no request owns.
    A batch under its key with another body is new (202, applied), not a 422 nobody could clear;
    the very batch it recorded, retried after the upgrade, is still a replay."""
    await asyncio.to_thread(migrate, db_url, until="0007.time-buckets")
    before, recorded, counter = unique("old-"), unique("old-"), unique("c-")
    same = [(counter, 4)]
    insert = "INSERT INTO idempotency_keys (key, digest) VALUES ($1, $2)"
    for key, hex_digest in ((before, "00" * 32), (recorded, digest(encode(_items(same))).hex())):
        await db_execute(db_url, insert, key, hex_digest)
    async with instance(tmp_path, db_url) as svc, httpx.AsyncClient() as client:
        assert await stored_rows(db_url, before) == [("", "00" * 32)]
        other = await send(client, svc.url, [(counter, 1)], before)
        retried = await send(client, svc.url, same, recorded)
        await wait_until(lambda: db_totals(db_url, [counter]))
    assert other.status_code == 202 and REPLAYED not in other.headers, other.text
    assert retried.status_code == 202 and retried.headers[REPLAYED] == "true"
    assert await db_totals(db_url, [counter]) == {counter: 1}


def _items(items: Items) -> list[tuple[bytes, str, int]]:
    return [(k.encode(), k, v) for k, v in items]


# --- new keys per client ------------------------------------------------------------------------


async def test_new_keys_past_the_clients_allowance_get_429_and_change_nothing(
    tmp_path: Path, db_url: str
) -> None:
    """--idempotency-keys-per-client 5: a client's first five fresh keys are taken in, the next
    get 429 too_many_idempotency_keys with Retry-After and leave no row and no count; a retry
    under a key already taken in is still a replay; another client keeps its own allowance."""
    counter, fresh = unique("c-"), unique("fresh-")
    other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with (
        instance(tmp_path, db_url, auth="off", idempotency_keys_per_client=5) as svc,
        httpx.AsyncClient() as client,
        httpx.AsyncClient(transport=other) as neighbour,
    ):
        keys = [unique(fresh) for _ in range(8)]
        answers = [await send(client, svc.url, [(counter, 1)], key) for key in keys]
        replay = await send(client, svc.url, [(counter, 1)], keys[0])
        theirs = await send(neighbour, svc.url, [(counter, 1)], unique("fresh-"))
        await wait_until(lambda: svc.flusher is not None and not svc.flusher.pending_keys())
        refused = await _refused_metric(client, svc.url)
    assert [r.status_code for r in answers] == [202] * 5 + [429] * 3
    over = answers[-1]
    assert over.json()["error"] == "too_many_idempotency_keys"
    assert "--idempotency-keys-per-client" in over.json()["detail"]
    assert int(over.headers["retry-after"]) >= 1
    assert replay.status_code == 202 and replay.headers[REPLAYED] == "true"
    assert theirs.status_code == 202
    assert await db_totals(db_url, [counter]) == {counter: 6}
    assert await principal_rows(db_url, "ip:127.0.0.1", fresh) == 5
    assert refused == 3


async def _refused_metric(client: httpx.AsyncClient, url: str) -> float:
    text = (await client.get(url + "/metrics")).text
    for row in text.splitlines():
        if row.startswith('incrementer_idempotent_requests_total{outcome="refused"} '):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


async def test_a_workers_group_allows_each_worker_its_share(
    tmp_path: Path, sqlite_url: str
) -> None:
    """`--workers 2 --idempotency-keys-per-client 4`: each worker takes in two of a client's new
    keys, so the group as a whole never more than four; the rest get 429."""
    args = serve_args(tmp_path, sqlite_url, "--idempotency-keys-per-client", "4")
    group = await asyncio.to_thread(spawn_group, args, 2)
    try:
        conns = await one_per_worker(group.url, 2)
        counter, fresh = unique("c-"), unique("fresh-")
        statuses: dict[int, list[int]] = {}
        for index, conn in conns.items():
            statuses[index] = []
            for _ in range(4):
                answer = await _keyed(conn, unique(fresh), [(counter, 1)])
                statuses[index].append(answer.status)
            await conn.close()
        await wait_until(lambda: db_totals(sqlite_url, [counter]))
        await asyncio.sleep(0.3)  # a worker's later flush would show here
    finally:
        group.stop()
    assert statuses == {0: [202, 202, 429, 429], 1: [202, 202, 429, 429]}
    assert await db_totals(sqlite_url, [counter]) == {counter: 4}
    assert await principal_rows(sqlite_url, "ip:127.0.0.1", fresh) == 4


async def _keyed(conn: Conn, key: str, items: Items) -> Response:
    """POST /increments under an Idempotency-Key on one worker's connection."""
    payload = body(items)
    head = (
        "POST /increments HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: {key}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    conn.writer.write(head.encode() + payload)
    wanted = len(conn.collector.done) + 1
    async with asyncio.timeout(10):
        while len(conn.collector.done) < wanted:
            chunk = await conn.reader.read(65536)
            assert chunk, "closed before the answer"
            conn.collector.parser.feed_data(chunk)
    answer = conn.collector.done[-1]
    assert answer.status in (202, 429), json.loads(answer.body)
    return answer


def test_settings_refuse_a_negative_allowance() -> None:
    """A negative --idempotency-keys-per-client is a configuration error naming the option."""
    with pytest.raises(ConfigError, match=r"idempotency.keys.per.client=-1"):
        Settings(idempotency_keys_per_client=-1)


def test_a_scoped_key_of_any_length_survives_the_wal(tmp_path: Path) -> None:
    """A batch's key is logged with its principal, however long (an API key's name has no
    length limit; the older one-byte field held 255), and read back whole; a frame of the older
    format beside it reads with the principal no request has."""
    principal = "key:" + "é" * 200  # 400 bytes of UTF-8
    key = scoped(principal, "order-1")
    items = [(b"k", "k", 2)]
    encoded = encode(items)
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_batch(key.encode(), digest(encoded), encoded)
        wal.write()
        wal.frame_ms = 1_700_000_000_000
        wal.append_batch(scoped("ip:10.0.0.1", "order-1").encode(), digest(encoded), encoded)
        wal.write()
        frames = list(wal.replay_frames(0))
    assert [batch.key for frame in frames for batch in frame.batches] == [
        key,
        "ip:10.0.0.1\norder-1",
    ]
    assert unscoped(key) == (principal, "order-1")
    assert summarize(tmp_path).problems == []


async def test_a_batch_logged_before_the_upgrade_replays_and_settles_under_no_ones_name(
    tmp_path: Path, db_url: str
) -> None:
    """A WAL frame of the format before keys were scoped (IWAK, by hand), replayed at start:
    its batch is applied once, stored under the empty principal, and its sender's retry after
    the upgrade is still a replay, before and after the flush."""
    counter, key = unique("c-"), unique("old-")
    items = [(counter.encode(), counter, 6)]
    encoded = encode(items)
    payload = (
        ENTRIES_LEN.pack(len(encoded))
        + encoded
        + bytes([len(key)])
        + key.encode()
        + digest(encoded)
        + BATCH_RANGE.pack(0, len(encoded))
    )
    wal_dir = tmp_path / "data" / "wal"
    wal_dir.mkdir(parents=True)
    (wal_dir / segment_name(1)).write_bytes(hand_frame(1, payload, MAGIC_KEYED))
    async with instance(tmp_path, db_url, flush_interval=5) as svc, httpx.AsyncClient() as client:
        pending = await send(client, svc.url, [(counter, 6)], key)
        assert svc.flusher is not None
        svc.flusher.stop(float("inf"))  # flush now, as at shutdown
        await wait_until(lambda: svc.flusher is not None and not svc.flusher.pending_keys())
        settled = await send(client, svc.url, [(counter, 6)], key)
    assert pending.headers.get(REPLAYED) == settled.headers.get(REPLAYED) == "true"
    assert await db_totals(db_url, [counter]) == {counter: 6}
    assert await stored_rows(db_url, key) == [("", digest(encoded).hex())]


async def test_new_keys_sent_at_once_stop_at_the_allowance(tmp_path: Path, db_url: str) -> None:
    """Twenty fresh keys sent at once, their database lookups in flight together: exactly the
    allowance of five is taken in (it is checked again after each lookup), the rest get 429."""
    counter, fresh = unique("c-"), unique("fresh-")
    async with (
        instance(tmp_path, db_url, auth="off", idempotency_keys_per_client=5) as svc,
        httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as client,
    ):
        sends = [send(client, svc.url, [(counter, 1)], unique(fresh)) for _ in range(20)]
        answers = await asyncio.gather(*sends)
        await wait_until(lambda: svc.flusher is not None and not svc.flusher.pending_keys())
    assert sorted(r.status_code for r in answers) == [202] * 5 + [429] * 15
    assert await db_totals(db_url, [counter]) == {counter: 5}
    assert await principal_rows(db_url, "ip:127.0.0.1", fresh) == 5
