"""What a body must be, at its edges: the error codes openapi.json names and the exact limits."""

from __future__ import annotations

from pathlib import Path

import httpx
from support import db_totals, run_service, settings_for, unique

INT64_MAX = 2**63 - 1


async def test_batch_limits_and_codes(tmp_path: Path, sqlite_url: str) -> None:
    """An empty batch is 400 empty_batch; --max-batch-items items are accepted and one more is
    400 batch_too_large; a bad item is named by its index; refused batches change nothing."""
    prefix = unique()
    settings = settings_for(tmp_path, sqlite_url, max_batch_items=3)
    items = [{"key": f"{prefix}-{i}", "value": 1} for i in range(4)]
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        empty = await client.post("/increments", json=[])
        assert (empty.status_code, empty.json()["error"]) == (400, "empty_batch")
        over = await client.post("/increments", json=items)
        assert (over.status_code, over.json()["error"]) == (400, "batch_too_large")
        assert "at most 3" in over.json()["detail"]
        bad = await client.post(
            "/increments", json=[items[0], {"key": items[1]["key"], "value": 0}]
        )
        assert (bad.status_code, bad.json()["error"]) == (400, "invalid_value")
        assert bad.json()["detail"].startswith("item 1: ")
        assert (await client.post("/increments", json=items[:3])).status_code == 202
    assert await db_totals(sqlite_url, [i["key"] for i in items]) == {
        i["key"]: 1 for i in items[:3]
    }


async def test_key_and_value_limits_on_the_slow_check(tmp_path: Path, sqlite_url: str) -> None:
    """A non-ASCII key (the check's slow branch) of exactly --max-key-bytes UTF-8 bytes with the
    largest value is accepted; one byte more is 400 key_too_long, one more than the largest
    value is 400 value_out_of_range."""
    settings = settings_for(tmp_path, sqlite_url, max_key_bytes=16)
    exact = "é" * 8  # 16 bytes
    longer = exact + "x"
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        ok = await client.post("/increment", json={"key": exact, "value": INT64_MAX})
        assert ok.status_code == 202, ok.text
        form = await client.post(
            "/increment",
            content=b"key=%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9%C3%A9&value=-0",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert (form.status_code, form.json()["error"]) == (400, "invalid_value")
        too_long = await client.post("/increment", json={"key": longer, "value": 1})
        assert (too_long.status_code, too_long.json()["error"]) == (400, "key_too_long")
        too_big = await client.post("/increment", json={"key": exact, "value": INT64_MAX + 1})
        assert (too_big.status_code, too_big.json()["error"]) == (400, "value_out_of_range")
    assert await db_totals(sqlite_url, [exact, longer]) == {exact: INT64_MAX}
