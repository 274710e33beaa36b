"""An SQLite file deleted or replaced under the running service: the flush refuses rather than
writing into a file no one will read again, /readyz says why, the increments wait in the WAL,
and once the file is back they land exactly once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from support import run_service, settings_for, totals_are, unique, wait_until


@pytest.mark.parametrize("change", ["deleted", "replaced"])
async def test_a_database_file_gone_from_its_path_stops_the_flush(
    tmp_path: Path, change: str
) -> None:
    """The file moved away (deleted, as the path sees it) or a copy put in its place: increments
    are still acknowledged, the flush refuses, /readyz is 503 database_unavailable and the
    flusher's error names what happened; the original file put back, the waiting increments
    are flushed, each once."""
    path = tmp_path / "counters.db"
    url = f"sqlite:///{path}"
    key = unique("file-")
    settings = settings_for(tmp_path, url)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        assert (await client.post("/increment", json={"key": key, "value": 1})).status_code == 202
        await wait_until(lambda: totals_are(url, {key: 1}))
        aside = tmp_path / "aside.db"
        os.rename(path, aside)
        if change == "replaced":
            shutil.copy(aside, path)
        assert (await client.post("/increment", json={"key": key, "value": 2})).status_code == 202

        async def refused() -> bool:
            ready = await client.get("/readyz")
            codes = [r["code"] for r in ready.json()["reasons"]]
            return ready.status_code == 503 and codes == ["database_unavailable"]

        await wait_until(refused, timeout=15)
        assert svc.flusher is not None and svc.flusher.db_error is not None
        assert f"was {change}" in svc.flusher.db_error
        assert svc.metrics.flush_failures >= 1
        os.replace(aside, path)
        await wait_until(lambda: totals_are(url, {key: 3}), timeout=15)
        await wait_until(lambda: _ready(client), timeout=15)


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200
