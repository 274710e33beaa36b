"""GET /counters: many keys by name, a prefix a page at a time, the top of a prefix; against the
real service on both engines."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
from support import run_service, settings_for, totals_are, unique, wait_until

from incrementer.api import listing


async def test_many_keys_read_their_totals_in_one_request(tmp_path: Path, db_url: str) -> None:
    """?key=...: each key's total in the order asked, unflushed increments included, an unknown
    key 0; more keys than --max-read-keys is 400."""
    a, b, missing = unique(), unique(), unique()
    settings = settings_for(tmp_path, db_url, max_read_keys=3, flush_interval=2.0)
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        await client.post("/increments", json=[{"key": a, "value": 2}, {"key": b, "value": 5}])
        for flushed in (False, True):
            if flushed:
                await wait_until(lambda: totals_are(db_url, {a: 2, b: 5}))
            resp = await client.get("/counters", params=[("key", b), ("key", missing), ("key", a)])
            assert resp.status_code == 200
            assert resp.json() == {
                "counters": [
                    {"key": b, "value": 5},
                    {"key": missing, "value": 0},
                    {"key": a, "value": 2},
                ]
            }
        resp = await client.get("/counters", params=[("key", a)] * 4)
        assert (resp.status_code, resp.json()["error"]) == (400, "too_many_keys")
        resp = await client.get("/counters", params={"key": a, "prefix": "x"})
        assert (resp.status_code, resp.json()["error"]) == (400, "unknown_parameter")
        resp = await client.get("/counters", params={"key": "", "granularity": "minute"})
        assert (resp.status_code, resp.json()["error"]) == (400, "invalid_key")


async def test_a_listing_lists_every_key_once_while_keys_are_added(
    tmp_path: Path, db_url: str
) -> None:
    """Page by page with the cursor while new keys land before and after it: every key that
    existed when the listing began is listed exactly once, in order, and only keys under the
    prefix are; a cursor from another prefix or made up is 400."""
    base = unique()
    rng = random.Random(3)
    existing = sorted(f"{base}:{rng.randrange(10**6):06d}" for _ in range(60))
    async with (
        run_service(settings_for(tmp_path, db_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        other = unique()
        body = [{"key": k, "value": 1} for k in [*existing, other]]
        assert (await client.post("/increments", json=body)).status_code == 202
        await wait_until(lambda: totals_are(db_url, {k: 1 for k in existing}))
        listed: list[str] = []
        cursor = None
        while True:
            params = {"prefix": f"{base}:", "limit": "7"}
            if cursor is not None:
                params["cursor"] = cursor
            page = (await client.get("/counters", params=params)).json()
            listed += [entry["key"] for entry in page["counters"]]
            cursor = page["next"]
            if cursor is None:
                break
            # New keys on both sides of where the listing is.
            fresh = [f"{base}:{rng.randrange(10**6):06d}x" for _ in range(3)]
            await client.post("/increments", json=[{"key": k, "value": 1} for k in fresh])
            landed = dict.fromkeys(fresh, 1)
            await wait_until(lambda landed=landed: totals_are(db_url, landed))
        assert listed == sorted(listed)
        assert len(listed) == len(set(listed))
        assert set(existing) <= set(listed)
        assert all(key.startswith(f"{base}:") for key in listed)
        for cursor in (listing._cursor("elsewhere", "elsewhere1"), "not-a-cursor", ""):
            resp = await client.get("/counters", params={"prefix": f"{base}:", "cursor": cursor})
            assert (resp.status_code, resp.json()["error"]) == (400, "invalid_cursor")


async def test_the_top_of_a_prefix_and_a_prefix_too_broad(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """order=value ranks the keys under the prefix by persisted value, ties by key; a prefix
    with more keys than the top may scan is 422 prefix_too_broad."""
    base = unique()
    values = {f"{base}a": 3, f"{base}b": 10, f"{base}c": 3, f"{base}d": 7}
    async with (
        run_service(settings_for(tmp_path, db_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        await client.post("/increments", json=[{"key": k, "value": v} for k, v in values.items()])
        await wait_until(lambda: totals_are(db_url, values))
        resp = await client.get(
            "/counters", params={"prefix": base, "order": "value", "limit": "3"}
        )
        assert resp.json() == {
            "counters": [
                {"key": f"{base}b", "value": 10},
                {"key": f"{base}d", "value": 7},
                {"key": f"{base}a", "value": 3},
            ]
        }
        monkeypatch.setattr(listing, "TOP_SCAN", 3)
        resp = await client.get("/counters", params={"prefix": base, "order": "value"})
        assert (resp.status_code, resp.json()["error"]) == (422, "prefix_too_broad")
        for params, code in (
            ({"prefix": base, "order": "size"}, "invalid_order"),
            ({"prefix": base, "limit": "0"}, "invalid_limit"),
            ({"prefix": base, "limit": "1e3"}, "invalid_limit"),
        ):
            resp = await client.get("/counters", params=params)
            assert (resp.status_code, resp.json()["error"]) == (400, code)
