"""Idempotency-Key: a batch retried to the same instance, to another, after kill -9, concurrently,
or while the first copy is unflushed, is applied exactly once; a reused key with another body
gets 422; keys expire after the window. Against real servers and both databases."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from proxy import proxy_to
from support import (
    db_totals,
    exchange,
    hand_frame,
    kill,
    run_service,
    serve_args,
    settings_for,
    spawn,
    spawned,
    unique,
    wait_until,
)

from incrementer.ingest.idempotency import (
    ALLOWANCE_SLOTS,
    MAX_KEY_LENGTH,
    Allowance,
    Ledger,
    digest,
    encode,
    parse_key,
)
from incrementer.ingest.validate import BadRequest
from incrementer.ingest.wal import SegmentIO, WriteAheadLog, summarize
from incrementer.ingest.wal_reader import ENTRY, segment_name
from incrementer.service import Service
from incrementer.store import open_store
from incrementer.store.base import IdempotentBatch, losers, scoped, taken_back, unscoped
from incrementer.store.migrate import migrate

REPLAYED = "idempotent-replayed"
Items = list[tuple[str, int]]


def body(items: Items) -> bytes:
    return msgspec.json.encode([{"key": k, "value": v} for k, v in items])


async def send(client: httpx.AsyncClient, url: str, items: Items, key: str) -> httpx.Response:
    return await client.post(
        url + "/increments",
        content=body(items),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )


@asynccontextmanager
async def instance(
    tmp_path: Path, db_url: str, name: str, **overrides: Any
) -> AsyncIterator[Service]:
    """One real service with its own data dir; several may share the database."""
    settings = settings_for(tmp_path, db_url, data_dir=tmp_path / name, **overrides)
    async with run_service(settings) as service:
        yield service


async def metric(client: httpx.AsyncClient, url: str, line: str) -> float:
    text = (await client.get(url + "/metrics")).text
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


# --- one instance -------------------------------------------------------------------------------


async def test_retry_to_the_same_instance_is_applied_once(tmp_path: Path, db_url: str) -> None:
    """A retry before and after the flush gets 202 with Idempotent-Replayed and adds nothing."""
    a, b, key = unique(), unique(), unique("idem-")
    items = [(a, 3), (b, 4), (a, 5)]
    async with (
        instance(tmp_path, db_url, "one", flush_interval=5) as svc,
        httpx.AsyncClient() as client,
    ):
        first = await send(client, svc.url, items, key)
        pending = await send(client, svc.url, items, key)  # the first is not flushed yet
        assert svc.flusher is not None and svc.flusher.pending_keys() == 2
        svc.flusher.stop(float("inf"))  # flush now, as at shutdown
        await wait_until(lambda: svc.flusher is not None and not svc.flusher.pending_keys())
        settled = await send(client, svc.url, items, key)
        read = (await client.get(f"{svc.url}/counters/{a}")).json()
    assert first.status_code == 202 and REPLAYED not in first.headers
    for retry in (pending, settled):
        assert retry.status_code == 202, retry.text
        assert retry.headers[REPLAYED] == "true"
    assert read == {"key": a, "value": 8}
    assert await db_totals(db_url, [a, b]) == {a: 8, b: 4}


async def test_reused_key_with_another_body_gets_422_and_changes_nothing(
    tmp_path: Path, db_url: str
) -> None:
    """The same key with other increments: 422, before the flush, after it, on another instance."""
    a, key = unique(), unique("idem-")
    async with (
        instance(tmp_path, db_url, "one") as one,
        instance(tmp_path, db_url, "two") as two,
        httpx.AsyncClient() as client,
    ):
        assert (await send(client, one.url, [(a, 1)], key)).status_code == 202
        answers = [await send(client, one.url, [(a, 2)], key)]
        await wait_until(lambda: db_totals(db_url, [a]))
        answers.append(await send(client, one.url, [(a, 1), (a, 1)], key))
        answers.append(await send(client, two.url, [(a, 1), (unique(), 1)], key))
        replay = await send(client, two.url, [(a, 1)], key)
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] == "idempotency_key_reused"
    assert replay.status_code == 202 and replay.headers[REPLAYED] == "true"
    assert await db_totals(db_url, [a]) == {a: 1}


async def test_single_increment_route_takes_the_key_too(tmp_path: Path, sqlite_url: str) -> None:
    """POST /increment with an Idempotency-Key is a batch of one: a retry is a replay."""
    a, key = unique(), unique("idem-")
    async with instance(tmp_path, sqlite_url, "one") as svc, httpx.AsyncClient() as client:
        answers = [
            await client.post(
                svc.url + "/increment",
                json={"key": a, "value": 2},
                headers={"Idempotency-Key": key},
            )
            for _ in range(3)
        ]
        same_as_batch = await send(client, svc.url, [(a, 2)], key)
    assert [r.status_code for r in answers] == [202, 202, 202]
    assert [REPLAYED in r.headers for r in answers] == [False, True, True]
    assert same_as_batch.headers[REPLAYED] == "true"
    assert await db_totals(sqlite_url, [a]) == {a: 2}


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (b"", "empty"),
        (b"k" * 129, "129 characters"),
        (b"two words", "a space"),
        ("cl\u00e9".encode(), "not ASCII"),
        (b"tab\there", "a control character"),
    ],
)
async def test_invalid_keys_get_400_and_change_nothing(
    tmp_path: Path, sqlite_url: str, header: bytes, why: str
) -> None:
    """An Idempotency-Key that is not 1-128 visible ASCII characters is refused with 400."""
    a = unique()
    payload = body([(a, 1)])
    request = (
        b"POST /increments HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: %s\r\nContent-Length: %d\r\n\r\n%s" % (header, len(payload), payload)
    )
    async with instance(tmp_path, sqlite_url, "one") as svc:
        (answer,) = await exchange(svc.url, request, 1)
    assert answer.status == 400, why
    assert msgspec.json.decode(answer.body) == {
        "error": "invalid_idempotency_key",
        "detail": "Idempotency-Key must be 1 to 128 visible ASCII characters (no spaces); a "
        "random UUID is a good key.",
    }, why
    assert await db_totals(sqlite_url, [a]) == {}


async def test_a_longest_key_is_accepted_and_two_keys_are_refused(
    tmp_path: Path, sqlite_url: str
) -> None:
    """128 visible characters are a key; a request with two Idempotency-Key headers gets 400."""
    a = unique()
    payload = body([(a, 1)])
    head = b"POST /increments HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    tail = b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    longest = head + b"Idempotency-Key: " + b"~" * 127 + b"!\r\n" + tail
    twice = head + b"Idempotency-Key: one\r\nidempotency-key: two\r\n" + tail
    async with instance(tmp_path, sqlite_url, "one") as svc:
        (accepted,) = await exchange(svc.url, longest, 1)
        (refused,) = await exchange(svc.url, twice, 1)
    assert accepted.status == 202
    assert refused.status == 400
    assert msgspec.json.decode(refused.body)["error"] == "duplicate_idempotency_key"
    assert refused.headers["connection"] == "close"
    assert await db_totals(sqlite_url, [a]) == {a: 1}


# --- two instances ------------------------------------------------------------------------------


async def test_retry_to_a_second_instance_is_applied_once(tmp_path: Path, db_url: str) -> None:
    """Flushed by one instance, retried to another: the database lookup answers it as a replay."""
    a, key = unique(), unique("idem-")
    async with (
        instance(tmp_path, db_url, "one") as one,
        instance(tmp_path, db_url, "two") as two,
        httpx.AsyncClient() as client,
    ):
        assert REPLAYED not in (await send(client, one.url, [(a, 7)], key)).headers
        await wait_until(lambda: db_totals(db_url, [a]))
        retry = await send(client, two.url, [(a, 7)], key)
    assert retry.status_code == 202 and retry.headers[REPLAYED] == "true"
    assert await db_totals(db_url, [a]) == {a: 7}


@pytest.mark.parametrize("bodies", ["same", "different"])
async def test_copies_unflushed_on_two_instances_are_applied_once(
    tmp_path: Path, db_url: str, bodies: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Both instances take the key in before either flushes: both say 202 (neither can know),
    and the flush transaction applies the first copy to commit, never both; the later copy is
    counted as a duplicate, or, with another body, as one conflict, logged with the key."""
    a, b, key = unique(), unique(), unique("idem-")
    first: Items = [(a, 5), (b, 1)]
    second = first if bodies == "same" else [(a, 50)]
    async with (
        httpx.AsyncClient() as client,
        instance(tmp_path, db_url, "one", flush_interval=5) as one,
        instance(tmp_path, db_url, "two", flush_interval=5) as two,
    ):
        answers = [await send(client, one.url, first, key)]
        answers.append(await send(client, two.url, second, key))
        # a plain increment beside the copy, in the same flush, must still count
        await client.post(two.url + "/increments", json=[{"key": b, "value": 10}])
        settled = one.metrics.idempotent_settled
    # Both stopped, "two" first: its final flush commits its copy, "one"'s then finds the key.
    outcome = "duplicate" if bodies == "same" else "conflict"
    assert settled[outcome] == 1 and settled["applied"] == 0, settled
    conflicts = [r.getMessage() for r in caplog.records if "another body" in r.getMessage()]
    assert conflicts == (
        []
        if bodies == "same"
        else [
            f"idempotency key {key!r} was applied before with another body; this batch of 2 "
            "keys (accepted while the first was unflushed elsewhere) was not applied "
            "(sent by 'ip:127.0.0.1')"
        ]
    )
    assert [r.status_code for r in answers] == [202, 202]
    assert not any(REPLAYED in r.headers for r in answers)
    totals = await db_totals(db_url, [a, b])
    assert totals == ({a: 5, b: 11} if bodies == "same" else {a: 50, b: 10})


async def test_one_flush_settles_each_of_its_keys_by_its_own_outcome(
    tmp_path: Path, db_url: str
) -> None:
    """One flush holding six idempotent batches: two whose copies another instance applied
    first with the same body (duplicates), two with another body (conflicts), two nobody else
    sent (applied). Each is counted under its own outcome, every one of them."""
    keys = {
        name: unique(f"idem-{name}-") for name in ("dup1", "dup2", "con1", "con2", "new1", "new2")
    }
    counter = unique()
    async with (
        httpx.AsyncClient() as client,
        instance(tmp_path, db_url, "one", flush_interval=5) as one,
        instance(tmp_path, db_url, "two", flush_interval=5) as two,
    ):
        for name, key in keys.items():
            assert (await send(client, one.url, [(counter, 1)], key)).status_code == 202
            if name.startswith("dup"):
                assert (await send(client, two.url, [(counter, 1)], key)).status_code == 202
            if name.startswith("con"):
                assert (await send(client, two.url, [(counter, 2)], key)).status_code == 202
        settled = one.metrics.idempotent_settled
    # Both stopped, "two" first: its final flush commits its copies, "one"'s then finds them.
    assert {o: settled[o] for o in ("applied", "duplicate", "conflict")} == {
        "applied": 2, "duplicate": 2, "conflict": 2,
    }  # fmt: skip
    assert await db_totals(db_url, [counter]) == {counter: 2 + 2 * 1 + 2 * 2}


async def test_after_a_conflict_the_losing_instance_answers_for_the_winning_body(
    tmp_path: Path, db_url: str
) -> None:
    """Two bodies under one key, each unflushed on its own instance: once both have flushed, the
    instance whose copy lost answers the winning body as a replay and its own body with 422."""
    a, key = unique(), unique("idem-")
    bodies: list[Items] = [[(a, 1)], [(a, 100)]]
    async with (
        httpx.AsyncClient() as client,
        instance(tmp_path, db_url, "one", flush_interval=5) as one,
        instance(tmp_path, db_url, "two", flush_interval=5) as two,
    ):
        for svc, items in zip((one, two), bodies, strict=True):
            assert (await send(client, svc.url, items, key)).status_code == 202
        for svc in (one, two):
            assert svc.flusher is not None
            svc.flusher.stop(float("inf"))  # flush now, as at shutdown
            await wait_until(lambda s=svc: not s.flusher.pending_keys())
        lost = 0 if one.metrics.idempotent_settled["conflict"] else 1
        loser = (one, two)[lost]
        winning = await send(client, loser.url, bodies[1 - lost], key)
        own = await send(client, loser.url, bodies[lost], key)
    assert winning.status_code == 202 and winning.headers[REPLAYED] == "true"
    assert own.status_code == 422
    assert await db_totals(db_url, [a]) == {a: dict(bodies[1 - lost])[a]}


async def test_concurrent_retries_to_two_instances_are_applied_once(
    tmp_path: Path, db_url: str
) -> None:
    """Each batch sent five times at once to each of two instances: every key counts once."""
    keys = [unique() for _ in range(30)]
    async with (
        instance(tmp_path, db_url, "one", flush_interval=0.02) as one,
        instance(tmp_path, db_url, "two", flush_interval=0.02) as two,
        # 300 requests queue for 40 connections, served by two services on this loop: a slow
        # machine takes seconds, so the wait is not httpx's default of 5 s.
        httpx.AsyncClient(limits=httpx.Limits(max_connections=40), timeout=60.0) as client,
    ):
        for round_number in range(3):
            idem = [unique("idem-") for _ in keys]
            sends = [
                send(client, url, [(k, round_number + 1), (keys[0], 1)], key)
                for k, key in zip(keys, idem, strict=True)
                for url in (one.url, two.url)
                for _ in range(5)
            ]
            answers = await asyncio.gather(*sends)
            assert {r.status_code for r in answers} == {202}
    totals = await db_totals(db_url, keys)
    assert totals == {k: 6 + (90 if k == keys[0] else 0) for k in keys}


# --- crashes and failures -----------------------------------------------------------------------


@pytest.mark.parametrize("flushed", [False, True], ids=["unflushed", "flushed"])
async def test_retry_after_kill9_and_restart_is_applied_once(
    tmp_path: Path, db_url: str, flushed: bool
) -> None:
    """kill -9 after the 202, restart, retry: a replay, from the WAL (the batch was not yet
    flushed) or from the database (it was)."""
    a, key = unique(), unique("idem-")
    interval = "0.05" if flushed else "5"
    args = serve_args(tmp_path, db_url, "--flush-interval", interval)
    async with httpx.AsyncClient() as client:
        server = spawn(args)
        try:
            assert REPLAYED not in (await send(client, server.url, [(a, 9)], key)).headers
            if flushed:
                await wait_until(lambda: db_totals(db_url, [a]))
        finally:
            kill(server.proc)
        assert await db_totals(db_url, [a]) == ({a: 9} if flushed else {})
        with spawned(args) as server:
            retry = await send(client, server.url, [(a, 9)], key)
            other = await send(client, server.url, [(a, 1)], key)
            server.stop_cleanly()
    assert retry.status_code == 202 and retry.headers[REPLAYED] == "true"
    assert other.status_code == 422
    assert await db_totals(db_url, [a]) == {a: 9}


async def test_expired_keys_are_swept(tmp_path: Path, db_url: str) -> None:
    """After --idempotency-window the key is gone from the database and from memory: the same
    batch is then new again (and counts again)."""
    a, key = unique(), unique("idem-")
    async with (
        instance(tmp_path, db_url, "one", idempotency_window=2.0) as svc,
        httpx.AsyncClient() as client,
    ):
        assert REPLAYED not in (await send(client, svc.url, [(a, 2)], key)).headers
        await wait_until(lambda: db_totals(db_url, [a]))
        assert (await send(client, svc.url, [(a, 2)], key)).headers[REPLAYED] == "true"
        store = svc.store
        await wait_until(lambda: _missing(store, key), timeout=20)
        again = await send(client, svc.url, [(a, 2)], key)
        swept = await metric(client, svc.url, "incrementer_idempotency_keys_swept_total")
    assert again.status_code == 202 and REPLAYED not in again.headers
    assert swept >= 1
    assert await db_totals(db_url, [a]) == {a: 4}


async def _missing(store: Any, key: str) -> bool:
    return await store.idempotency_digest(scoped("ip:127.0.0.1", key), "") is None


class FailingWrites(SegmentIO):
    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    def write(self, fd: int, data: memoryview) -> int:
        if self.failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(fd, data)


async def test_a_batch_whose_wal_write_failed_is_forgotten(tmp_path: Path, db_url: str) -> None:
    """503 wal_unavailable when the batch cannot be logged; its retry is then new, not a replay
    of increments that were never recorded, and counts once."""
    a, key = unique(), unique("idem-")
    async with instance(tmp_path, db_url, "one") as svc, httpx.AsyncClient() as client:
        assert isinstance(svc.wal, WriteAheadLog)
        disk = FailingWrites()
        svc.wal.io = disk
        refused = await send(client, svc.url, [(a, 3)], key)
        disk.failing = False
        retry = await send(client, svc.url, [(a, 3)], key)
        await wait_until(lambda: db_totals(db_url, [a]))
    assert refused.status_code == 503 and refused.json()["error"] == "wal_unavailable"
    assert retry.status_code == 202 and REPLAYED not in retry.headers
    assert await db_totals(db_url, [a]) == {a: 3}


async def test_database_down_takes_batches_unchecked_and_settles_them_once(
    tmp_path: Path, pg_url: str
) -> None:
    """With the database unreachable a known-elsewhere key cannot be looked up: the batch is
    taken in (202), and its flush, once the database is back, finds the key and leaves it out;
    from then on this instance knows the key, and a retry during the next outage is a replay."""
    a, key = unique(), unique("idem-")
    async with (
        proxy_to(pg_url) as (proxy, proxied_url),
        instance(tmp_path, pg_url, "one") as one,
        instance(tmp_path, proxied_url, "two") as two,
        httpx.AsyncClient() as client,
    ):
        await send(client, one.url, [(a, 4)], key)
        await wait_until(lambda: db_totals(pg_url, [a]))
        await proxy.cut()
        await wait_until(lambda: two.flusher is not None and two.flusher.db_error is not None)
        unchecked = await send(client, two.url, [(a, 4)], key)
        await proxy.restore()
        await wait_until(lambda: two.flusher is not None and not two.flusher.pending_keys())
        duplicates = await metric(
            client, two.url, 'incrementer_idempotent_batches_settled_total{result="duplicate"}'
        )
        await proxy.cut()
        await wait_until(lambda: two.flusher is not None and two.flusher.db_error is not None)
        remembered = await send(client, two.url, [(a, 4)], key)
        await proxy.restore()
    assert unchecked.status_code == 202 and REPLAYED not in unchecked.headers
    assert remembered.status_code == 202 and remembered.headers[REPLAYED] == "true"
    assert duplicates == 1
    assert await db_totals(pg_url, [a]) == {a: 4}


async def test_a_flushed_batch_is_remembered_through_a_database_outage(
    tmp_path: Path, pg_url: str
) -> None:
    """Once its flush has applied a keyed batch, the instance remembers the key with the batch's
    digest: during a later outage a retry is a replay and other increments under it get 422,
    with no database to ask."""
    a, key = unique(), unique("idem-")
    async with (
        proxy_to(pg_url) as (proxy, proxied_url),
        instance(tmp_path, proxied_url, "one") as one,
        httpx.AsyncClient() as client,
    ):
        await send(client, one.url, [(a, 2)], key)
        await wait_until(lambda: one.flusher is not None and not one.flusher.pending_keys())
        await proxy.cut()
        await wait_until(lambda: one.flusher is not None and one.flusher.db_error is not None)
        retry = await send(client, one.url, [(a, 2)], key)
        other = await send(client, one.url, [(a, 3)], key)
        await proxy.restore()
    assert retry.status_code == 202 and retry.headers[REPLAYED] == "true"
    assert other.status_code == 422
    assert await db_totals(pg_url, [a]) == {a: 2}


# --- the store and the WAL on their own ---------------------------------------------------------


async def test_store_applies_each_key_once_across_nodes(tmp_path: Path, db_url: str) -> None:
    """apply_batch of two nodes carrying the same key: the second takes that batch's deltas back
    out and applies the rest, and reports the stored digest."""
    await asyncio.to_thread(migrate, db_url)
    store = open_store(db_url)
    await store.open()
    try:
        a, b, key = unique(), unique(), unique("idem-")
        keyed = IdempotentBatch(key, "d1", {a: 5})
        first = await store.apply_batch("node-a", 1, {a: 5}, [keyed])
        copy = IdempotentBatch(key, "d1", {a: 5})
        second = await store.apply_batch("node-b", 1, {a: 5 + 1, b: 2}, [copy])
        again = await store.apply_batch("node-b", 2, {a: 5}, [IdempotentBatch(key, "d2", {a: 5})])
        assert await store.idempotency_digest(key, "d2") == "d1"
    finally:
        await store.close()
    assert first.applied and first.duplicates == {}
    assert second.applied and second.duplicates == {key: "d1"}
    assert again.duplicates == {key: "d1"}
    assert await db_totals(db_url, [a, b]) == {a: 6, b: 2}


def test_old_plain_frames_replay_beside_keyed_ones(tmp_path: Path) -> None:
    """A segment written in the format before idempotent batches (plain frames, by hand) is read
    as it was, and frames with batches after it replay their batches and entries."""
    payload = ENTRY.pack(3, 7) + b"old" + ENTRY.pack(0, 1)  # an empty key is a plain entry
    (tmp_path / segment_name(1)).write_bytes(hand_frame(1, payload))
    items = [(b"k", "k", 2), (b"j", "j", 3)]
    encoded = encode(items)
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append(b"plain", 1)
        wal.append_batch(b"idem-1", digest(encoded), encoded)
        wal.write()
        frames = list(wal.replay_frames(0))
    assert [(f.seq, f.entries) for f in frames] == [
        (1, [("old", 7), ("", 1)]),
        (2, [("plain", 1), ("k", 2), ("j", 3)]),
    ]
    assert frames[0].batches == []
    (batch,) = frames[1].batches
    assert (batch.key, batch.digest, batch.entries) == (
        "idem-1",
        digest(encoded).hex(),
        [("k", 2), ("j", 3)],
    )
    summary = summarize(tmp_path)
    assert summary.records == 5 and summary.problems == []


def test_ledger_forgets_settled_keys_after_the_window() -> None:
    """Pending keys stay until their flush; settled ones go after the window or past the limit."""
    ledger = Ledger(window=10.0, limit=2)
    ledger.hold("p", "d0")
    ledger.settle("a", "d1", now=0.0)
    ledger.settle("b", "d2", now=5.0)
    assert ledger.known("p", now=100.0) == "d0"
    assert ledger.known("a", now=9.0) == "d1"
    assert ledger.expire(now=12.0) == 1
    assert ledger.known("a", now=12.0) is None and ledger.known("b", now=12.0) == "d2"
    ledger.settle("c", "d3", now=13.0)
    ledger.settle("d", "d4", now=13.0)  # past the limit: the oldest settled key goes
    assert ledger.known("b", now=13.0) is None
    assert ledger.known("p", now=13.0) == "d0"


def test_ledger_expiry_counts_every_key_gone_and_keeps_one_exactly_at_the_window() -> None:
    """expire() removes every settled key older than the window and says how many; a key
    exactly as old as the window stays; releasing a key never held is harmless."""
    ledger = Ledger(window=10.0, limit=10)
    for key, when in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        ledger.settle(key, "d", now=when)
    assert ledger.expire(now=12.0) == 2
    assert ledger.known("c", now=12.0) == "d"
    ledger.release(["never-held"])
    ledger.hold("held", "d")
    ledger.release(["held"])
    assert ledger.known("held", now=12.0) is None


def test_a_settled_key_settled_again_is_the_newest() -> None:
    """A key settled again (found in the database after it was settled here) counts from its
    new time: it outlives keys settled between the two, and the limit evicts those first."""
    ledger = Ledger(window=10.0, limit=10)
    ledger.settle("a", "d", now=0.0)
    ledger.settle("b", "d", now=1.0)
    ledger.settle("a", "d", now=5.0)
    assert ledger.expire(now=12.0) == 1  # b, 11 s old; a is 7 s old
    assert ledger.known("a", now=12.0) == "d" and ledger.known("b", now=12.0) is None
    full = Ledger(window=10.0, limit=2)
    full.settle("a", "d", now=0.0)
    full.settle("b", "d", now=1.0)
    full.settle("a", "d", now=2.0)
    full.settle("c", "d", now=3.0)  # past the limit: the oldest settled is now b
    assert full.known("a", now=3.0) == "d" and full.known("b", now=3.0) is None


def test_a_key_is_1_to_128_visible_ascii_characters() -> None:
    """parse_key takes each visible ASCII character, 0x21 '!' to 0x7e '~', one to 128 of them,
    and refuses anything else (DEL, a space, nothing, one too many)."""
    assert MAX_KEY_LENGTH == 128
    for good in (b"k", b"!~", b"x" * 128, bytes(range(0x21, 0x7F))[:128]):
        assert parse_key(good) == good.decode()
    for bad in (b"", b"a\x7f", b"a b", b"\x20", b"x" * 129, "é".encode()):
        with pytest.raises(BadRequest):
            parse_key(bad)


def test_scoped_keys_split_at_the_last_newline() -> None:
    """A principal's name may hold a newline, a key cannot: the scope splits at the last one."""
    assert unscoped(scoped("team\nA", "k-1")) == ("team\nA", "k-1")
    assert unscoped(scoped("", "k")) == ("", "k")


def test_of_two_batches_under_one_key_in_a_flush_only_the_first_wins() -> None:
    """losers(): a batch whose key this transaction inserted wins once; a second batch under
    that key in the same flush, and any batch whose key it did not insert, lost."""
    first, second, other = (IdempotentBatch(k, "d", {"x": 1}) for k in ("k", "k", "o"))
    assert losers([first, second, other], {"k"}) == [second, other]
    assert losers([first, other], {"k", "o"}) == []


def test_taking_back_lost_batches_leaves_exactly_the_rest() -> None:
    """taken_back(): the deltas without those of the lost batches, in any order, also when one
    lost batch takes a key to 0 (dropped) and a later one holds the same key again, with a
    delta or with 0 (its increments summed to nothing)."""
    flushed = {"x": 5, "y": 2}  # x: +5 and -3 lost, +3 kept; y: kept
    lost = [IdempotentBatch("a", "d", {"x": 5}), IdempotentBatch("b", "d", {"x": -3})]
    assert taken_back(flushed, lost) == {"x": 3, "y": 2}
    zero = [IdempotentBatch("a", "d", {"x": 5}), IdempotentBatch("b", "d", {"x": 0})]
    assert taken_back({"x": 5}, zero) == {}
    assert taken_back({"x": 5, "y": 2}, [IdempotentBatch("a", "d", {"y": 2})]) == {"x": 5}


def test_settings_reject_a_window_that_is_not_positive() -> None:
    """--idempotency-window must be a positive number of seconds."""
    from incrementer.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="idempotency-window"):
        replace(Settings(), idempotency_window=0)


def test_allowance_counts_a_window_and_forgets_after_it() -> None:
    """Keys count for at least the window (and at most a slot more): the limit holds in any
    window, the wait says when the oldest stop counting, and a principal idle past the window
    is forgotten."""
    allowance = Allowance(limit=3, window=80.0)  # slots of 10 s
    assert ALLOWANCE_SLOTS == 8
    for now in (1.0, 2.0, 15.0):
        assert allowance.wait("p", now) == 0.0
        allowance.charge("p", now)
    assert allowance.used("p", 15.0) == 3
    assert allowance.wait("p", 85.0) == pytest.approx(5.0)  # slot 0 counts until 90 s
    assert allowance.wait("q", 85.0) == 0.0
    assert allowance.used("p", 90.0) == 1  # the keys of slot 0 went; the one at 15 s stays
    assert allowance.wait("p", 90.0) == 0.0
    allowance.expire(95.0)
    assert "p" in allowance.counts
    allowance.expire(100.0)  # the key of 15 s counted 85 s, past the window of 80 s
    assert allowance.counts == {}


def test_allowance_of_one_key_counts_it_to_the_window_s_end() -> None:
    """With a limit of 1: a principal never seen may take in a key; its key counts for the whole
    window, to its last instant (here where now / slot lands on a whole number that floor
    division does not), and no longer than a slot after it; the wait for a short window is a
    fraction of a second."""
    allowance = Allowance(limit=1, window=0.8)  # slots of 0.1 s
    assert ALLOWANCE_SLOTS == 8
    assert allowance.used("new", 1.0) == 0 and allowance.wait("new", 1.0) == 0.0
    allowance.charge("p", 1.0)
    assert 0.0 < allowance.wait("p", 1.0) <= 0.9
    assert allowance.used("p", 1.8) == 1  # 0.8 s: the window
    assert allowance.used("p", 1.95) == 0  # 0.95 s: past the window and a slot
    allowance.expire(1.95)
    assert allowance.counts == {}


def test_no_limit_counts_nothing() -> None:
    """--idempotency-keys-per-client 0: no limit, and nothing is kept per principal."""
    allowance = Allowance(limit=0, window=60.0)
    for _ in range(100):
        allowance.charge("p", 1.0)
    assert allowance.wait("p", 1.0) == 0.0 and allowance.counts == {}


def test_expiry_forgets_exactly_the_principals_whose_keys_no_longer_count() -> None:
    """Of two principals, the one whose last key left the window is forgotten and the other is
    kept with its count; later both are gone."""
    allowance = Allowance(limit=5, window=80.0)  # slots of 10 s
    assert ALLOWANCE_SLOTS == 8
    allowance.charge("early", 1.0)
    allowance.charge("late", 50.0)
    allowance.charge("late", 51.0)
    allowance.expire(95.0)  # the key of 1 s counted 94 s; those of 50 s, 45 s
    assert allowance.counts == {"late": {5: 2}}
    allowance.expire(145.0)
    assert allowance.counts == {}


def test_a_ledger_limits_each_principal_s_new_keys_and_expires_that_count() -> None:
    """A ledger built with per_client holds that limit over its window, and its expire() forgets
    the principals whose keys no longer count."""
    ledger = Ledger(window=80.0, per_client=2)
    for now in (1.0, 2.0):
        assert ledger.allowance.wait("p", now) == 0.0
        ledger.allowance.charge("p", now)
    assert ledger.allowance.wait("p", 3.0) > 0.0
    ledger.expire(now=200.0)
    assert ledger.allowance.counts == {}
