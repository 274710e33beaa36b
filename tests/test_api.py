"""The HTTP API contract against the real service, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest
from support import (
    ErrorLog,
    counter_path,
    db_execute,
    db_totals,
    load,
    run_service,
    settings_for,
    totals_are,
    unique,
    wait_until,
)

from incrementer.ingest.validate import Validator

INT64_MAX = 2**63 - 1


async def test_increment_then_read_then_persisted(tmp_path: Path, db_url: str) -> None:
    """A 202 increment is readable at once and reaches the database."""
    key = unique()
    async with (
        run_service(settings_for(tmp_path, db_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        for value in (3, 4):
            resp = await client.post("/increment", json={"key": key, "value": value})
            assert resp.status_code == 202
            assert resp.content == b""
        resp = await client.get(counter_path(key))
        assert resp.status_code == 200
        assert resp.json() == {"key": key, "value": 7}
        await wait_until(lambda: totals_are(db_url, {key: 7}))
        assert (await client.get(counter_path(key))).json()["value"] == 7


async def test_form_body_accepted(tmp_path: Path, sqlite_url: str) -> None:
    """application/x-www-form-urlencoded bodies count like JSON ones."""
    key = "form key/é"
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        resp = await client.post("/increment", data={"key": key, "value": "5"})
        assert resp.status_code == 202
        assert (await client.get(counter_path(key))).json() == {"key": key, "value": 5}


async def test_batch_endpoint_is_all_or_nothing(tmp_path: Path, sqlite_url: str) -> None:
    """POST /increments applies every item, or none when one item is bad."""
    a, b = unique(), unique()
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        resp = await client.post(
            "/increments",
            json=[{"key": a, "value": 1}, {"key": b, "value": 2}, {"key": a, "value": 3}],
        )
        assert resp.status_code == 202
        bad = await client.post(
            "/increments", json=[{"key": a, "value": 1}, {"key": b, "value": 0}]
        )
        assert bad.status_code == 400
        assert bad.json()["error"] == "invalid_value"
        assert (await client.get(counter_path(a))).json()["value"] == 4
        assert (await client.get(counter_path(b))).json()["value"] == 2


BAD_BODIES = [
    ("application/json", b"{", 400, "malformed_json"),
    ("application/json", b"", 400, "malformed_json"),
    ("application/json", b"[]", 400, "invalid_body"),
    ("application/json", b'{"key":"a"}', 400, "missing_field"),
    ("application/json", b'{"value":1}', 400, "missing_field"),
    ("application/json", b'{"key":"a","value":1,"extra":1}', 400, "unknown_field"),
    ("application/json", b'{"key":"","value":1}', 400, "invalid_key"),
    ("application/json", b'{"key":"a\\u0000b","value":1}', 400, "invalid_key"),
    ("application/json", b'{"key":"a\\nb","value":1}', 400, "invalid_key"),
    ("application/json", b'{"key":"a\\u0085b","value":1}', 400, "invalid_key"),
    ("application/json", b'{"key":1,"value":1}', 400, "invalid_key"),
    ("application/json", b'{"key":"a","value":1.5}', 400, "invalid_value"),
    ("application/json", b'{"key":"a","value":1.0}', 400, "invalid_value"),
    ("application/json", b'{"key":"a","value":"1"}', 400, "invalid_value"),
    ("application/json", b'{"key":"a","value":true}', 400, "invalid_value"),
    ("application/json", b'{"key":"a","value":null}', 400, "invalid_value"),
    ("application/json", b'{"key":"a","value":0}', 400, "invalid_value"),
    ("application/json", b'{"key":"a","value":-1}', 400, "invalid_value"),
    ("application/json", b'{"key":"a","value":9223372036854775808}', 400, "value_out_of_range"),
    ("application/json", b'{"key":"\\ud800","value":1}', 400, "malformed_json"),
    ("application/json", b"\xff\xfe", 400, "malformed_json"),
    ("application/json", ('{"key":"%s","value":1}' % ("x" * 257)).encode(), 400, "key_too_long"),
    ("application/json", ('{"key":"%s","value":1}' % ("é" * 129)).encode(), 400, "key_too_long"),
    ("application/x-www-form-urlencoded", b"key=a", 400, "missing_field"),
    ("application/x-www-form-urlencoded", b"key=a&value=1.5", 400, "invalid_value"),
    ("application/x-www-form-urlencoded", b"key=a&value=x", 400, "invalid_value"),
    ("application/x-www-form-urlencoded", b"key=a&value=1&x=2", 400, "unknown_field"),
    ("application/x-www-form-urlencoded", b"key=a&key=b&value=1", 400, "duplicate_field"),
    ("application/x-www-form-urlencoded", b"key=%ff&value=1", 400, "malformed_form"),
    ("application/x-www-form-urlencoded", b"garbage", 400, "malformed_form"),
    ("text/plain", b'{"key":"a","value":1}', 415, "unsupported_media_type"),
    ("", b'{"key":"a","value":1}', 415, "unsupported_media_type"),
]


async def test_bad_input_rejected_and_changes_nothing(tmp_path: Path, db_url: str) -> None:
    """Every malformed body gets its 4xx and error code; no counter changes."""
    async with (
        run_service(settings_for(tmp_path, db_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        for content_type, body, status, code in BAD_BODIES:
            headers = {"Content-Type": content_type} if content_type else {}
            resp = await client.post("/increment", content=body, headers=headers)
            assert resp.status_code == status, (content_type, body, resp.text)
            payload = resp.json()
            assert payload["error"] == code, (body, payload)
            assert payload["detail"]
        assert (await client.get("/counters/a")).status_code == 404
        assert svc.flusher is not None and svc.flusher.pending_keys() == 0
    assert await db_totals(db_url, ["a"]) == {}


async def test_limits_and_options(tmp_path: Path, sqlite_url: str) -> None:
    """--max-key-bytes and --allow-negative change what is accepted."""
    settings = settings_for(tmp_path, sqlite_url, max_key_bytes=4, allow_negative=True)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        assert (
            await client.post("/increment", json={"key": "abcd", "value": -5})
        ).status_code == 202
        assert (
            await client.post("/increment", json={"key": "abcde", "value": 1})
        ).status_code == 400
        assert (
            await client.post("/increment", json={"key": "abcd", "value": 0})
        ).status_code == 202
        assert (await client.get("/counters/abcd")).json()["value"] == -5


async def test_routes_methods_and_probes(tmp_path: Path, sqlite_url: str) -> None:
    """404 for unknown paths and keys, 405 with Allow for wrong methods, probes answer."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        assert (await client.get("/nope")).status_code == 404
        resp = await client.get("/increment")
        assert resp.status_code == 405
        assert resp.headers["allow"] == "POST"
        assert (await client.post("/counters/x")).status_code == 405
        assert (await client.get("/counters/never-seen")).status_code == 404
        assert (await client.get("/counters/%ff")).status_code == 400
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert b"incrementer_flushes_total" in metrics.content
        assert (await client.get("/openapi.json")).json()["openapi"].startswith("3.1")


async def test_many_clients_exact_totals(tmp_path: Path, db_url: str) -> None:
    """Tens of thousands of increments over thousands of keys from concurrent clients land
    exactly."""
    rng = random.Random(7)
    prefix = unique("many-")
    keys = [f"{prefix}-{i}" for i in range(3000)]
    items = [(rng.choice(keys), rng.randint(1, 1000)) for _ in range(30_000)]
    expected: dict[str, int] = {}
    for key, value in items:
        expected[key] = expected.get(key, 0) + value
    async with run_service(settings_for(tmp_path, db_url, flush_max_keys=500)) as svc:
        result = await load(svc.url, items, connections=24, pipeline=16)
        assert result.acked == expected
        await wait_until(lambda: totals_are(db_url, expected), timeout=10)
        assert svc.metrics.flushes > 1


async def test_overflowing_key_is_isolated(tmp_path: Path, db_url: str) -> None:
    """A key whose total would overflow int64 is kept aside; the rest of its batch lands."""
    big, small = unique("big-"), unique("small-")
    await _migrate(db_url)
    await db_execute(
        db_url, "INSERT INTO counters (key, value) VALUES ($1, $2)", big, INT64_MAX - 5
    )
    async with (
        run_service(settings_for(tmp_path, db_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        assert (await client.post("/increment", json={"key": big, "value": 10})).status_code == 202
        assert (await client.post("/increment", json={"key": small, "value": 1})).status_code == 202
        await wait_until(lambda: totals_are(db_url, {small: 1}))
        # The database shows the commit a moment before the flusher, resumed, records it.
        await wait_until(lambda: svc.metrics.overflowed_keys == 1)
        assert await db_totals(db_url, [big]) == {big: INT64_MAX - 5}
        ready = (await client.get("/readyz")).json()
        assert ready["overflowed_keys"] == 1
        assert "details" not in ready and big not in str(ready)  # names only with a key
        assert svc.metrics.overflowed_keys == 1


async def test_an_overflowed_counter_reads_the_same_before_and_after_its_flush(
    tmp_path: Path, db_url: str
) -> None:
    """A read shows the in-range value and the isolated excess, the same while the increments
    are pending and once the flush has set them aside, also for a key whose first batch
    overflowed (no row in counters)."""
    near, fresh, plain = unique("near-"), unique("fresh-"), unique("plain-")
    await _migrate(db_url)
    await db_execute(
        db_url, "INSERT INTO counters (key, value) VALUES ($1, $2)", near, INT64_MAX - 5
    )
    settings = settings_for(tmp_path, db_url, flush_interval=2.0)
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        batch = [
            {"key": near, "value": 3},
            {"key": near, "value": 4},
            {"key": fresh, "value": INT64_MAX},
            {"key": fresh, "value": INT64_MAX},
            {"key": plain, "value": 2},
        ]
        assert (await client.post("/increments", json=batch)).status_code == 202
        expected = {
            near: {"key": near, "value": INT64_MAX - 5, "overflow": "7"},
            fresh: {"key": fresh, "value": 0, "overflow": str(2 * INT64_MAX)},
            plain: {"key": plain, "value": 2},
        }
        assert svc.flusher is not None and svc.flusher.buffer.deltas, "read before the flush"
        before = {key: (await client.get(counter_path(key))).json() for key in expected}
        assert before == expected
        await wait_until(lambda: totals_are(db_url, {plain: 2}))
        after = {key: (await client.get(counter_path(key))).json() for key in expected}
        assert after == expected
        await wait_until(lambda: svc.metrics.flushes == 1)
        # Flushed keys count only the keys written: the two set aside count as overflowed.
        assert (svc.metrics.flushed_keys, svc.metrics.overflowed_keys) == (1, 2)
        assert await db_totals(db_url, expected) == {near: INT64_MAX - 5, plain: 2}


async def _migrate(db_url: str) -> None:
    import asyncio

    from incrementer.store.migrate import migrate

    await asyncio.to_thread(migrate, db_url)


async def test_two_instances_share_one_database(tmp_path: Path, db_url: str) -> None:
    """Two nodes adding to the same keys of one database: totals are exact (deltas commute)."""
    prefix = unique("shared-")
    keys = [f"{prefix}-{i}" for i in range(50)]
    rng = random.Random(3)
    first = [(rng.choice(keys), rng.randint(1, 5)) for _ in range(5000)]
    second = [(rng.choice(keys), rng.randint(1, 5)) for _ in range(5000)]
    expected: dict[str, int] = {}
    for key, value in first + second:
        expected[key] = expected.get(key, 0) + value
    a = settings_for(tmp_path / "a", db_url)
    b = settings_for(tmp_path / "b", db_url)
    async with run_service(a) as one, run_service(b) as two:
        assert one.data_dir.node_id != two.data_dir.node_id
        results = await asyncio.gather(load(one.url, first), load(two.url, second))
        assert sum(sum(r.acked.values()) for r in results) == sum(expected.values())
        await wait_until(lambda: totals_are(db_url, expected), timeout=15)


@pytest.mark.parametrize("path", ["/increment", "/increments"])
async def test_a_bug_answers_500_and_the_service_keeps_serving(
    tmp_path: Path,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    error_log: ErrorLog,
    path: str,
) -> None:
    """An exception inside request handling (a bug, injected into the decoding of the fast path
    and of the batch route) is logged with its traceback and answered 500 with the connection
    closed; the next request is served."""

    def injected(*args: object) -> None:
        raise RuntimeError("injected bug")

    body: object = {"key": "bug", "value": 1}
    if path == "/increments":
        body = [body]
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        # The intake is compiled (mypyc): its methods cannot be patched, but its decoder (fast
        # path) and the validator (batch route, plain Python) can.
        if path == "/increment":
            assert svc.flusher is not None
            monkeypatch.setattr(svc.flusher.intake, "_decode", injected)
        else:
            monkeypatch.setattr(Validator, "json_many", injected)
        resp = await client.post(path, json=body)
        assert resp.status_code == 500
        assert resp.json()["error"] == "internal_error"
        assert resp.headers["connection"] == "close"
        assert any(r.exc_info and "injected bug" in str(r.exc_info[1]) for r in error_log.records)
        monkeypatch.undo()
        assert (await client.post(path, json=body)).status_code == 202
