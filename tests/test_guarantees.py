"""The promises that hold the design up, each made to fail for real: a database that refuses a
write, a server killed with -9 while shedding load, a batch that would go past the key budget."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from proxy import proxy_to
from support import (
    ErrorLog,
    db_execute,
    db_totals,
    kill,
    load,
    run_service,
    serve_args,
    settings_for,
    spawned,
    totals_are,
    unique,
    wait_until,
)

from incrementer.config import Settings
from incrementer.store import INT64_MAX, INT64_MIN, BackendError, Store
from incrementer.store.base import Window
from incrementer.urls import parse_database_url


async def applied_seq_in_db(db_url: str, node: str) -> int | None:
    """The ledger row of node as another connection sees it: None when there is no row."""
    engine, target = parse_database_url(db_url)
    sql = "SELECT applied_seq FROM incrementer_nodes WHERE node_id = "
    if engine == "sqlite":
        conn = sqlite3.connect(target)
        try:
            rows = conn.execute(sql + "?", (node,)).fetchall()
        finally:
            conn.close()
        return int(rows[0][0]) if rows else None
    import asyncpg

    pg = await asyncpg.connect(target)
    try:
        value = await pg.fetchval(sql + "$1", node)
    finally:
        await pg.close()
    return None if value is None else int(value)


async def refuse_writes(db_url: str, table: str, when: str) -> str:
    """A trigger that makes every INSERT or UPDATE of a row of `table` matching the SQL condition
    `when` (on NEW) fail, the way a database refuses a write (a constraint, a full disk).
    Returns its name, for allow_writes."""
    name = f"refuse_{table}_{unique()}"
    message = f"refused by the test trigger {name}"
    if parse_database_url(db_url)[0] == "sqlite":
        for event in ("INSERT", "UPDATE"):
            await db_execute(
                db_url,
                f"CREATE TRIGGER {name}_{event.lower()} BEFORE {event} ON {table} WHEN {when}"
                f" BEGIN SELECT RAISE(ABORT, '{message}'); END",
            )
        return name
    await db_execute(
        db_url,
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN RAISE EXCEPTION '{message}'; END $$",
    )
    await db_execute(
        db_url,
        f"CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW"
        f" WHEN ({when}) EXECUTE FUNCTION {name}()",
    )
    return name


async def allow_writes(db_url: str, table: str, name: str) -> None:
    if parse_database_url(db_url)[0] == "sqlite":
        for event in ("insert", "update"):
            await db_execute(db_url, f"DROP TRIGGER {name}_{event}")
        return
    await db_execute(db_url, f"DROP TRIGGER {name} ON {table}")
    await db_execute(db_url, f"DROP FUNCTION {name}()")


# --- exactly once: the ledger and the counters commit together, or neither does ---------------


@pytest.mark.parametrize("history", ["first flush of the node", "node with an applied batch"])
async def test_a_refused_ledger_write_leaves_the_counters_unchanged(
    store: Store, db_url: str, history: str
) -> None:
    """When the database refuses the applied_seq write, apply_batch raises BackendError and no
    counter moved; once the database accepts it again the retry lands exactly once."""
    node, old, new = unique(), unique("old-"), unique("new-")
    seq = 1
    before: dict[str, int] = {}
    if history == "node with an applied batch":
        await store.apply_batch(node, 1, {old: 10})
        seq, before = 2, {old: 10}
    trigger = await refuse_writes(db_url, "incrementer_nodes", f"NEW.node_id = '{node}'")
    try:
        with pytest.raises(BackendError, match="refused by the test trigger"):
            await store.apply_batch(node, seq, {old: 1, new: 5})
        assert await db_totals(db_url, [old, new]) == before
        assert await applied_seq_in_db(db_url, node) == (None if seq == 1 else seq - 1)
    finally:
        await allow_writes(db_url, "incrementer_nodes", trigger)
    assert (await store.apply_batch(node, seq, {old: 1, new: 5})).applied
    assert not (await store.apply_batch(node, seq, {old: 1, new: 5})).applied
    assert await db_totals(db_url, [old, new]) == {old: before.get(old, 0) + 1, new: 5}
    assert await applied_seq_in_db(db_url, node) == seq


async def test_a_refused_counter_write_leaves_the_ledger_unchanged(
    store: Store, db_url: str
) -> None:
    """When the database refuses one counter's write, the batch's other counters and its
    applied_seq are not committed either, and the retry lands exactly once."""
    node, good, poison = unique(), unique("good-"), unique("poison-")
    await store.apply_batch(node, 1, {good: 1})
    trigger = await refuse_writes(db_url, "counters", f"NEW.key = '{poison}'")
    try:
        with pytest.raises(BackendError, match="refused by the test trigger"):
            await store.apply_batch(node, 2, {good: 1, poison: 1})
        assert await db_totals(db_url, [good, poison]) == {good: 1}
        assert await applied_seq_in_db(db_url, node) == 1
    finally:
        await allow_writes(db_url, "counters", trigger)
    assert (await store.apply_batch(node, 2, {good: 1, poison: 1})).applied
    assert not (await store.apply_batch(node, 2, {good: 1, poison: 1})).applied
    assert await db_totals(db_url, [good, poison]) == {good: 2, poison: 1}


# --- load shedding -----------------------------------------------------------------------------


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def test_shed_increments_are_not_logged_so_a_restart_does_not_apply_them(
    tmp_path: Path, sqlite_url: str
) -> None:
    """An increment refused with 503 (--max-pending-keys spent) is not in the WAL: after kill -9
    and a restart the database holds exactly the increments that got 202, by every route."""
    prefix = unique()
    pending = [f"{prefix}-pending-{i}" for i in range(6)]
    refused = [f"{prefix}-refused-{i}" for i in range(4)]
    # No flush but the one --flush-max-keys triggers, and that one cannot commit.
    args = serve_args(
        tmp_path,
        sqlite_url,
        flush_interval="600",
        lag_bound="3600",
        flush_max_keys="3",
        max_pending_keys="6",
        max_pending_keys_per_client="6",  # one client here: the whole budget is its share
    )
    expected = {key: i + 1 for i, key in enumerate(pending)}
    with spawned(args) as server:
        ledger = await refuse_writes(sqlite_url, "incrementer_nodes", "1")
        async with httpx.AsyncClient(base_url=server.url) as client:
            for key in pending[:3]:
                resp = await client.post("/increment", json={"key": key, "value": expected[key]})
                assert resp.status_code == 202, resp.text
            # The three keys were cut into a batch that keeps failing: in flight from now on.
            await wait_until(lambda: _flush_failures(client))
            for key in pending[3:]:
                resp = await client.post("/increment", json={"key": key, "value": expected[key]})
                assert resp.status_code == 202, resp.text
            shed = [
                await client.post("/increment", json={"key": refused[0], "value": 100}),
                await client.post(
                    "/increment", content=f"key={refused[1]}&value=100", headers=FORM
                ),
                await client.post(
                    "/increments",
                    json=[{"key": pending[4], "value": 100}, {"key": refused[2], "value": 1}],
                ),
                await client.post("/increments", json=[{"key": refused[3], "value": 100}]),
            ]
            assert [r.status_code for r in shed] == [503] * 4, [r.text for r in shed]
            assert all(r.json()["error"] == "overloaded" for r in shed)
            # Keys waiting in the buffer cost no memory: still accepted, and must survive.
            resp = await client.post("/increment", json={"key": pending[4], "value": 1000})
            assert resp.status_code == 202
            resp = await client.post("/increments", json=[{"key": pending[5], "value": 1000}])
            assert resp.status_code == 202
            expected[pending[4]] += 1000
            expected[pending[5]] += 1000
        kill(server.proc)
    await allow_writes(sqlite_url, "incrementer_nodes", ledger)
    with spawned(args) as server:  # replays the WAL, and flushes it on the way out
        server.stop_cleanly()
    assert await db_totals(sqlite_url, pending + refused) == expected


async def _flush_failures(client: httpx.AsyncClient) -> bool:
    """Whether a flush has failed yet, from the server's own /metrics."""
    for line in (await client.get("/metrics")).text.splitlines():
        name, _, value = line.partition(" ")
        if name == "incrementer_flush_failures_total":
            return float(value) > 0
    raise AssertionError("/metrics has no incrementer_flush_failures_total")


def _sized_flushes(tmp_path: Path, sqlite_url: str, max_pending_keys: int) -> Settings:
    """Settings whose only flushes are cut at 4 keys (the interval far away), for one client
    holding the whole --max-pending-keys budget."""
    return settings_for(
        tmp_path,
        sqlite_url,
        flush_interval=600.0,
        lag_bound=3600.0,
        flush_max_keys=4,
        max_pending_keys=max_pending_keys,
        max_pending_keys_per_client=max_pending_keys,
    )


async def test_a_batch_of_new_keys_counts_the_keys_already_pending(
    tmp_path: Path, sqlite_url: str
) -> None:
    """POST /increments is refused when the keys already pending plus the batch's new keys would
    pass --max-pending-keys, and accepted when they exactly reach it (duplicates and pending
    keys in the batch cost nothing); a refused batch changes nothing."""
    prefix = unique()
    pending = [f"{prefix}-pending-{i}" for i in range(3)]
    new = [f"{prefix}-new-{i}" for i in range(6)]
    # No flush during the test: the interval is far away and the buffer stays under
    # --flush-max-keys until the last batch, so the three pending keys are all in the buffer.
    settings = _sized_flushes(tmp_path, sqlite_url, max_pending_keys=8)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        for key in pending:
            assert (
                await client.post("/increment", json={"key": key, "value": 1})
            ).status_code == 202
        assert len(svc.buffer.deltas) == 3
        too_many = await client.post("/increments", json=[{"key": k, "value": 1} for k in new])
        assert too_many.status_code == 503, too_many.text  # 3 pending + 6 new > 8
        assert too_many.headers["retry-after"] == "1"
        assert sorted(svc.buffer.deltas) == sorted(pending)
        assert (await client.get(f"/counters/{new[0]}")).status_code == 404
        exactly = [*pending, new[0], new[0], *new[1:5]]  # 3 pending + 5 new == 8
        resp = await client.post("/increments", json=[{"key": k, "value": 1} for k in exactly])
        assert resp.status_code == 202, resp.text
    assert await db_totals(sqlite_url, pending + new) == {
        pending[0]: 2,
        pending[1]: 2,
        pending[2]: 2,
        new[0]: 2,
        new[1]: 1,
        new[2]: 1,
        new[3]: 1,
        new[4]: 1,
    }


async def test_an_idempotent_batch_holds_its_keys_twice_against_the_budget(
    tmp_path: Path, sqlite_url: str
) -> None:
    """An idempotent batch counts its keys against --max-pending-keys twice until its flush
    commits (its new keys, and what it holds for a replay). Batch A's 4 keys, cut into a flush
    the database refuses, leave room for 10 - 4 - 4 = 2; batch B's 1 key fills it (1 + 1) and
    a new key is refused. Once A commits, B, still in the buffer, leaves 10 - 1 to the keys."""
    prefix = unique()
    settings = _sized_flushes(tmp_path, sqlite_url, max_pending_keys=10)
    a = [{"key": f"{prefix}-a{i}", "value": 1} for i in range(4)]
    b = [{"key": f"{prefix}-b", "value": 1}]
    refused = f"{prefix}-refused"
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        ledger = await refuse_writes(sqlite_url, "incrementer_nodes", "1")
        resp = await client.post("/increments", json=a, headers={"Idempotency-Key": f"{prefix}a"})
        assert resp.status_code == 202, resp.text
        await wait_until(lambda: _flush_failures(client))
        assert svc.flusher is not None and svc.flusher.inflight is not None
        resp = await client.post("/increments", json=b, headers={"Idempotency-Key": f"{prefix}b"})
        assert resp.status_code == 202, resp.text
        resp = await client.post("/increment", json={"key": refused, "value": 1})
        assert resp.status_code == 503, resp.text
        await allow_writes(sqlite_url, "incrementer_nodes", ledger)
        flusher = svc.flusher
        await wait_until(lambda: flusher.inflight is None)  # A committed, B still buffered
        assert flusher.intake.key_budget == 10 - 1
    expected = {item["key"]: 1 for item in a + b}
    assert await db_totals(sqlite_url, [*expected, refused]) == expected


# --- reads and readiness while the database refuses or is gone --------------------------------


async def test_a_read_counts_the_persisted_value_the_batch_in_flight_and_the_buffer(
    tmp_path: Path, sqlite_url: str
) -> None:
    """While a flush keeps failing, GET /counters/{key} is the persisted value plus the batch in
    flight plus the buffer, readyz says why it is not ready and how old the oldest increment
    is; once the database accepts the batch, it lands once and the read is unchanged."""
    key, other = unique("read-"), unique("other-")
    settings = settings_for(tmp_path, sqlite_url, lag_bound=1.0)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        assert (await client.post("/increment", json={"key": key, "value": 10})).status_code == 202
        await wait_until(lambda: totals_are(sqlite_url, {key: 10}))
        ledger = await refuse_writes(sqlite_url, "incrementer_nodes", "1")
        assert (await client.post("/increment", json={"key": key, "value": 3})).status_code == 202
        await wait_until(lambda: svc.flusher.inflight is not None and svc.metrics.flush_failures)
        # The buffer is empty: the lag is the batch in flight's alone.
        await wait_until(lambda: _not_ready_because(client, "lag_above_bound"))
        assert (await client.post("/increment", json={"key": key, "value": 4})).status_code == 202
        assert (await client.post("/increment", json={"key": other, "value": 1})).status_code == 202
        assert (await client.get(f"/counters/{key}")).json() == {"key": key, "value": 17}
        assert (await client.get(f"/counters/{other}")).json() == {"key": other, "value": 1}
        ready = (await client.get("/readyz")).json()
        assert ready["pending_keys"] == 3  # key in the batch and in the buffer, other in the buffer
        assert ready["lag_seconds"] > settings.lag_bound
        assert "database_unavailable" in [r["code"] for r in ready["reasons"]], ready
        assert "refused by the test trigger" in (svc.flusher.db_error or "")
        await allow_writes(sqlite_url, "incrementer_nodes", ledger)
        await wait_until(lambda: totals_are(sqlite_url, {key: 17, other: 1}))
        assert (await client.get(f"/counters/{key}")).json() == {"key": key, "value": 17}
        await wait_until(lambda: _ready(client))


async def test_readyz_follows_an_idle_database_going_away_and_back(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing to flush, the service still notices the database going away (readyz 503,
    database unavailable, one log line saying why however many pings fail) and coming back
    (readyz 200, one line)."""
    async with (
        proxy_to(pg_url) as (proxy, via_proxy),
        run_service(settings_for(tmp_path, via_proxy)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        await wait_until(lambda: _ready(client))
        with caplog.at_level("INFO", logger="incrementer.flush"):
            await proxy.cut()
            await wait_until(lambda: _not_ready_because(client, "database_unavailable"))
            assert (svc.flusher.db_error or "").startswith("PostgreSQL at"), svc.flusher.db_error
            assert svc.flusher.pending_keys() == 0
            failed = svc.metrics.flush_failures
            await asyncio.sleep(2.5)  # two more pings fail
            await proxy.restore()
            await wait_until(lambda: _ready(client))
    said = [r.getMessage() for r in caplog.records if r.name == "incrementer.flush"]
    assert len(said) == 2 and failed == svc.metrics.flush_failures == 0, said
    assert said[0].startswith("database unreachable: PostgreSQL at postgresql://"), said
    assert said[1] == "database reachable again"


async def _ready(client: httpx.AsyncClient) -> bool:
    resp = await client.get("/readyz")
    return resp.status_code == 200 and resp.json()["reasons"] == []


async def _not_ready_because(client: httpx.AsyncClient, code: str) -> bool:
    resp = await client.get("/readyz")
    return resp.status_code == 503 and code in [r["code"] for r in resp.json()["reasons"]]


@pytest.mark.parametrize("route", ["json", "form", "batch"])
async def test_every_route_coalesces_and_starts_the_lag_clock_at_the_oldest_increment(
    tmp_path: Path, sqlite_url: str, route: str
) -> None:
    """Increments of one key by JSON (the fast path), form or batch add up in the buffer, and the
    lag readyz reports runs from the first of them: not before it was sent, not after it was
    acknowledged."""
    key = unique("coalesce-")
    settings = settings_for(tmp_path, sqlite_url, flush_interval=600.0, lag_bound=3600.0)

    async def send(client: httpx.AsyncClient, value: int) -> None:
        if route == "json":
            resp = await client.post("/increment", json={"key": key, "value": value})
        elif route == "form":
            resp = await client.post("/increment", content=f"key={key}&value={value}", headers=FORM)
        else:
            resp = await client.post("/increments", json=[{"key": key, "value": value}])
        assert resp.status_code == 202, resp.text

    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        first_sent = time.monotonic()
        await send(client, 2)
        first_acked = time.monotonic()
        await asyncio.sleep(0.05)  # so that a clock restarted by a later increment shows
        await send(client, 3)
        assert (await client.post("/increment", json={"key": key, "value": 5})).status_code == 202
        assert svc.flusher.commits == 0
        assert (await client.get(f"/counters/{key}")).json() == {"key": key, "value": 10}
        before = time.monotonic()
        lag = (await client.get("/readyz")).json()["lag_seconds"]
        after = time.monotonic()
        assert round(before - first_acked, 3) - 0.001 <= lag <= round(after - first_sent, 3) + 0.001
    assert await db_totals(sqlite_url, [key]) == {key: 10}


async def test_wal_fsync_mode_acknowledges_only_after_the_fsync(
    tmp_path: Path, db_url: str, error_log: ErrorLog
) -> None:
    """In --durability wal-fsync, pipelined increments on many connections are all answered 202
    through the fsync worker, every fsync covers what was written before it, and the totals are
    exact."""
    prefix = unique()
    items = [(f"{prefix}-{i % 50}", 1 + i % 3) for i in range(3000)]
    settings = settings_for(tmp_path, db_url, durability="wal-fsync")
    async with run_service(settings) as svc:
        result = await load(svc.url, items, connections=8, pipeline=16)
        assert result.statuses == {202: len(items)}
        assert svc.wal is not None and svc.wal.synced_bytes == svc.wal.written_bytes > 0
    expected: dict[str, int] = {}
    for key, value in items:
        expected[key] = expected.get(key, 0) + value
    assert await db_totals(db_url, expected) == expected
    assert error_log.since(0) == []


async def test_wal_mode_fsyncs_on_its_interval(tmp_path: Path, sqlite_url: str) -> None:
    """In --durability wal, what was written to the WAL is fdatasynced by the periodic sync
    (--fsync-interval) without any request waiting for it, again after each new write, and
    not at all while nothing new was written."""
    settings = settings_for(tmp_path, sqlite_url, durability="wal", fsync_interval=0.05)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        wal = svc.wal
        assert wal is not None
        for value in (1, 2):
            resp = await client.post("/increment", json={"key": "periodic", "value": value})
            assert resp.status_code == 202
            written = wal.written_bytes
            await wait_until(lambda: wal.synced_bytes >= written > 0)  # noqa: B023
            gate = svc.gate
            assert gate is not None
            await wait_until(lambda: not gate._syncing)  # noqa: B023 (its callback has run)
            fsyncs = sum(svc.metrics.fsync_seconds.counts)
            await asyncio.sleep(0.3)  # six idle intervals
            assert sum(svc.metrics.fsync_seconds.counts) == fsyncs, "synced nothing new"
    assert await db_totals(sqlite_url, ["periodic"]) == {"periodic": 3}


async def test_a_stop_while_the_database_refuses_keeps_the_batch_for_the_next_start(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A graceful stop while every flush fails gives up at the shutdown deadline instead of
    hanging, and the next start replays the WAL and applies the batch exactly once."""
    key = unique("stop-")
    settings = settings_for(tmp_path, sqlite_url, shutdown_timeout=0.5)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        ledger = await refuse_writes(sqlite_url, "incrementer_nodes", "1")
        assert (await client.post("/increment", json={"key": key, "value": 7})).status_code == 202
        await wait_until(lambda: svc.metrics.flush_failures > 0)
    assert await db_totals(sqlite_url, [key]) == {}
    await allow_writes(sqlite_url, "incrementer_nodes", ledger)
    async with run_service(settings):
        pass  # replay, then the final flush on the way out
    assert await db_totals(sqlite_url, [key]) == {key: 7}


async def test_the_buffer_is_cut_when_it_holds_flush_max_keys_keys(
    tmp_path: Path, sqlite_url: str
) -> None:
    """With the interval far away, the buffer is flushed as soon as it holds --flush-max-keys
    distinct keys, not one key later, and not before."""
    prefix = unique()
    settings = settings_for(
        tmp_path, sqlite_url, flush_interval=600.0, lag_bound=3600.0, flush_max_keys=3
    )
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        for i in range(3):
            resp = await client.post("/increment", json={"key": f"{prefix}-{i}", "value": 1})
            assert resp.status_code == 202
            if i < 2:
                assert svc.flusher.commits == 0 and svc.flusher.inflight is None
        await wait_until(lambda: svc.flusher.commits == 1)
        assert await db_totals(sqlite_url, [f"{prefix}-{i}" for i in range(3)]) == {
            f"{prefix}-{i}": 1 for i in range(3)
        }


async def test_flush_failures_are_counted_and_logged_first_and_every_20th(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While the database is gone every failed flush is counted, and logged on the first attempt
    and every 20th with what failed; the batch lands once the database is back."""
    key = unique("failing-")
    async with (
        proxy_to(pg_url) as (proxy, via_proxy),
        run_service(settings_for(tmp_path, via_proxy)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        await proxy.cut()
        with caplog.at_level("WARNING", logger="incrementer.flush"):
            assert (await client.post("/increment", json={"key": key, "value": 3})).status_code
            await wait_until(lambda: "(attempt 20)" in caplog.text, timeout=30)
            await proxy.restore()
            await wait_until(lambda: totals_are(pg_url, {key: 3}), timeout=15)
        failures = svc.metrics.flush_failures
    attempts = [r.getMessage() for r in caplog.records if "flush failed" in r.getMessage()]
    assert attempts[0].startswith("flush failed (attempt 1), retrying with backoff: PostgreSQL at")
    assert [a.split(")")[0] for a in attempts] == [
        f"flush failed (attempt {n}" for n in [1, *range(20, failures + 1, 20)]
    ]
    assert 20 <= failures < 40 or len(attempts) > 2, failures


@pytest.mark.parametrize("applied", [False, True], ids=["before-the-commit", "after-the-commit"])
async def test_a_bug_in_a_flush_is_logged_whole_and_the_batch_retried_exactly_once(
    tmp_path: Path,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    applied: bool,
) -> None:
    """An exception of ours while a batch is applied (not a database error) is logged with its
    traceback and counted as a failed flush; the flusher keeps the batch and retries it. Raised
    after the commit (the answer lost), the retry finds the batch applied and skips it, saying
    so. Either way the key counts once, the recovery is said once, and the next flushes are plain."""
    key = unique("bug-")
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        apply_batch = svc.store.apply_batch
        calls = 0

        async def buggy(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                return await apply_batch(*args, **kwargs)
            if applied:
                await apply_batch(*args, **kwargs)
            raise RuntimeError("a bug")

        monkeypatch.setattr(svc.store, "apply_batch", buggy)
        with caplog.at_level("INFO", logger="incrementer.flush"):
            for value, total in ((5, 5), (7, 12), (1, 13)):
                resp = await client.post("/increment", json={"key": key, "value": value})
                assert resp.status_code == 202
                await wait_until(lambda: totals_are(sqlite_url, {key: total}))  # noqa: B023
        flusher = svc.flusher
        assert flusher is not None
        await wait_until(lambda: flusher.inflight is None)  # the last commit recorded too
        metrics = svc.metrics
        assert (metrics.flush_failures, metrics.skipped_batches) == (1, int(applied))
        assert metrics.flushed_keys == (2 if applied else 3)
    assert calls == 4
    said = [r.getMessage() for r in caplog.records]
    [bug] = [r for r in caplog.records if r.getMessage().startswith("internal error applying")]
    assert bug.exc_info is not None and bug.exc_info[0] is RuntimeError
    assert [m for m in said if "flush failed" in m] == [
        "flush failed (attempt 1), retrying with backoff: internal error: RuntimeError('a bug')"
    ]
    assert said.count("database reachable again, flushing resumed") == 1
    seq = bug.getMessage().removeprefix("internal error applying batch seq=")
    skipped = f"batch seq={seq} was already applied; skipped (exactly-once)"
    assert said.count(skipped) == int(applied)


async def test_a_flush_the_database_never_answers_is_reported_within_the_timeout(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A database that takes the flush and never answers (frozen link): after --database-timeout
    the log says so and /readyz says database_unresponsive while the flush still waits; once the
    statement bound abandons it, the batch is retried on a new connection and lands once."""
    key = unique("silent-")
    async with proxy_to(pg_url) as (proxy, via_proxy):
        settings = settings_for(tmp_path, via_proxy, database_timeout=0.5)
        async with (
            run_service(settings) as svc,
            httpx.AsyncClient(base_url=svc.url) as client,
        ):
            proxy.freeze()
            with caplog.at_level("WARNING", logger="incrementer.flush"):
                await client.post("/increment", json={"key": key, "value": 2})
                await wait_until(lambda: _not_ready_because(client, "database_unresponsive"))
                said = [r.getMessage() for r in caplog.records]
                assert any(
                    m.startswith("database unresponsive: no answer to the flush of batch seq=")
                    and m.endswith("within 0.5 s (--database-timeout); still waiting")
                    for m in said
                ), said
                assert svc.flusher.inflight is not None
                proxy.frozen = False
                await wait_until(lambda: totals_are(pg_url, {key: 2}), timeout=20)
                await wait_until(lambda: _ready(client))


async def test_an_idle_database_that_stops_answering_pings_is_unresponsive(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing to flush, a database whose link goes silent fails the next ping after
    --database-timeout: /readyz says database_unresponsive and the log says why."""
    async with proxy_to(pg_url) as (proxy, via_proxy):
        settings = settings_for(tmp_path, via_proxy, database_timeout=0.5)
        async with (
            run_service(settings) as svc,
            httpx.AsyncClient(base_url=svc.url) as client,
        ):
            await wait_until(lambda: _ready(client))
            with caplog.at_level("WARNING", logger="incrementer.flush"):
                proxy.freeze()
                await wait_until(lambda: _not_ready_because(client, "database_unresponsive"))
            assert svc.flusher.db_error == "no answer to a ping within 0.5 s (--database-timeout)"
            reasons = (await client.get("/readyz")).json()["reasons"]
            assert reasons[0]["for_seconds"] < 10, reasons  # since the failure, not the boot
            said = [r.getMessage() for r in caplog.records if r.name == "incrementer.flush"]
            assert said == [
                "database unresponsive: no answer to a ping within 0.5 s (--database-timeout)"
            ]


async def test_a_projection_adds_each_pending_delta_by_the_rule_the_flush_applies(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Flusher.project(), which reads answer with: the batch in flight counts only when its seq is
    above the snapshot's applied seq; a delta landing a counter exactly on a 64-bit bound is
    added, one past it is set aside as overflow, and the overflows of the batch in flight and of
    the buffer add up; a key with nothing pending is not pending."""
    key, low, high = unique("proj-"), unique("low-"), unique("high-")
    settings = settings_for(tmp_path, sqlite_url, allow_negative=True)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        ledger = await refuse_writes(sqlite_url, "incrementer_nodes", "1")
        assert (await client.post("/increment", json={"key": key, "value": 5})).status_code == 202
        await wait_until(lambda: svc.flusher.inflight is not None and svc.metrics.flush_failures)
        for name, value in ((key, 7), (low, INT64_MIN), (high, INT64_MAX)):
            answer = await client.post("/increment", json={"key": name, "value": value})
            assert answer.status_code == 202
        flusher = svc.flusher
        assert flusher.inflight is not None
        seq = flusher.inflight.seq
        assert flusher.project(key, seq - 1, 0) == (12, 0, True)
        assert flusher.project(key, seq, 0) == (7, 0, True)
        assert flusher.project(key, seq, INT64_MAX - 7) == (INT64_MAX, 0, True)
        assert flusher.project(key, seq, INT64_MAX - 6) == (INT64_MAX - 6, 7, True)
        assert flusher.project(key, seq - 1, INT64_MAX) == (INT64_MAX, 12, True)
        assert flusher.project(low, seq, 0) == (INT64_MIN, 0, True)
        assert flusher.project(high, seq, 0) == (INT64_MAX, 0, True)
        assert flusher.project(unique(), seq - 1, 3) == (3, 0, False)
        await allow_writes(sqlite_url, "incrementer_nodes", ledger)
        await wait_until(lambda: totals_are(sqlite_url, {key: 12, low: INT64_MIN, high: INT64_MAX}))


async def test_a_bucket_projection_adds_each_pending_delta_where_the_flush_will(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Flusher.project_buckets(), which series reads answer with: each pending delta lands in its
    own bucket, only for buckets inside the window, the batch in flight only when its seq is above
    the snapshot's; a part the flush would set aside for overflow (its total off the 64-bit
    range, or a coalesced delta that alone leaves it) adds to no bucket, judged against the value
    the parts before it leave."""
    key, low, high = unique("projb-"), unique("low-"), unique("high-")
    mixed, top = unique("mixed-"), unique("top-")
    settings = settings_for(tmp_path, sqlite_url, allow_negative=True, buckets="minute,hour")
    now = int(time.time())
    then, later = now - 1800, now - 60
    m_then, m_later = then - then % 60, later - later % 60
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        ledger = await refuse_writes(sqlite_url, "incrementer_nodes", "1")
        first = await client.post(
            "/increments",
            json=[{"key": k, "value": 5, "at": then} for k in (key, mixed)],
        )
        assert first.status_code == 202
        await wait_until(lambda: svc.flusher.inflight is not None and svc.metrics.flush_failures)
        later_ones = [(key, 7), (low, INT64_MIN), (high, INT64_MAX), (high, INT64_MAX)]
        for name, value in [*later_ones, (mixed, -7), (top, INT64_MAX)]:
            answer = await client.post(
                "/increment", json={"key": name, "value": value, "at": later}
            )
            assert answer.status_code == 202
        flusher = svc.flusher
        assert flusher.inflight is not None
        seq = flusher.inflight.seq

        def minutes(start: int, end: int) -> Window:
            return Window(60, start, end)

        whole = minutes(m_then, m_later + 60)
        assert flusher.project_buckets(key, whole, seq - 1, 0) == {m_then: 5, m_later: 7}
        assert flusher.project_buckets(key, whole, seq, 0) == {m_later: 7}
        assert flusher.project_buckets(key, minutes(m_then + 60, m_later + 60), seq - 1, 0) == {
            m_later: 7
        }
        assert flusher.project_buckets(key, minutes(m_then, m_later), seq - 1, 0) == {m_then: 5}
        hours: dict[int, int] = {}
        for at, value in ((then, 5), (later, 7)):
            hours[at - at % 3600] = hours.get(at - at % 3600, 0) + value
        day = Window(3600, now - 86400, now + 3600)
        assert flusher.project_buckets(key, day, seq - 1, 0) == hours
        assert flusher.project_buckets(key, whole, seq, INT64_MAX - 7) == {m_later: 7}
        assert flusher.project_buckets(key, whole, seq, INT64_MAX - 6) == {}
        assert flusher.project_buckets(key, whole, seq - 1, INT64_MAX - 12) == {
            m_then: 5,
            m_later: 7,
        }
        assert flusher.project_buckets(key, whole, seq - 1, INT64_MAX - 11) == {m_then: 5}
        assert flusher.project_buckets(key, whole, seq - 1, INT64_MIN) == {m_then: 5, m_later: 7}
        assert flusher.project_buckets(low, whole, seq, 0) == {m_later: INT64_MIN}
        assert flusher.project_buckets(low, whole, seq - 1, 0) == {m_later: INT64_MIN}
        assert flusher.project_buckets(top, whole, seq, 0) == {m_later: INT64_MAX}
        # the batch in flight would overflow (set aside), the buffer's -7 then fits
        assert flusher.project_buckets(mixed, whole, seq - 1, INT64_MAX - 2) == {m_later: -7}
        assert flusher.project_buckets(low, whole, seq, -1) == {}
        assert flusher.buffer.deltas[high] == 2 * INT64_MAX  # coalesced past 64 bits
        assert flusher.project_buckets(high, whole, seq, -INT64_MAX) == {}
        assert flusher.project_buckets(unique(), whole, seq - 1, 0) == {}
        await allow_writes(sqlite_url, "incrementer_nodes", ledger)
        await wait_until(lambda: totals_are(sqlite_url, {key: 12, low: INT64_MIN, mixed: -2}))
