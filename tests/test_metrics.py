"""/metrics moves exactly as a known workload says, and slow clients do not starve others."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support import host_port, load, run_service, settings_for, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_after_a_known_workload(tmp_path: Path, sqlite_url: str) -> None:
    """Counters and histograms report exactly the requests, refusals and flushes that happened."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        await load(svc.url, [(f"m-{i % 7}", 2) for i in range(300)])
        batch = [{"key": "m-b", "value": 1}] * 3
        assert (await client.post("/increments", json=batch)).status_code == 202
        for _ in range(4):
            await client.post("/increment", json={"key": "m", "value": 1.5})
        await client.post("/increment", content=b"x", headers={"Content-Type": "text/plain"})
        await client.get("/nope")
        await wait_until(lambda: svc.flusher is not None and svc.flusher.pending_keys() == 0)
        found = samples((await client.get("/metrics")).text)
    assert found[("incrementer_accepted_increments_total", ())] == 303
    assert (
        found[("incrementer_http_requests_total", (("route", "increments"), ("status", "202")))]
        == 1
    )
    assert (
        found[("incrementer_http_requests_total", (("route", "increment"), ("status", "202")))]
        == 300
    )
    assert (
        found[("incrementer_http_requests_total", (("route", "increment"), ("status", "400")))] == 4
    )
    assert found[("incrementer_rejected_increments_total", (("reason", "invalid_value"),))] == 4
    assert (
        found[("incrementer_rejected_increments_total", (("reason", "unsupported_media_type"),))]
        == 1
    )
    assert (
        found[("incrementer_http_requests_total", (("route", "unknown"), ("status", "404")))] == 1
    )
    flushes = found[("incrementer_flushes_total", ())]
    assert flushes >= 1
    assert found[("incrementer_persistence_lag_seconds_count", ())] == flushes
    assert found[("incrementer_flush_keys_count", ())] == flushes
    assert found[("incrementer_flushed_keys_total", ())] >= 7
    assert found[("incrementer_pending_keys", ())] == 0
    assert 0.05 <= found[("incrementer_flush_interval_seconds", ())] <= 0.5


async def test_slowloris_clients_do_not_starve_normal_ones(tmp_path: Path, sqlite_url: str) -> None:
    """Fifty connections dribbling a request and fifty sending garbage leave a normal client
    served, and the slow ones are cut off by the request timeout."""
    settings = settings_for(tmp_path, sqlite_url, request_timeout=1.0)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        host, port = host_port(svc.url)
        slow = []
        for _ in range(50):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
            slow.append((reader, writer))
        for _ in range(50):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 20)
            writer.close()
        for i in range(20):
            resp = await client.post("/increment", json={"key": "normal", "value": 1})
            assert resp.status_code == 202, i
        assert (await client.get("/counters/normal")).json()["value"] == 20
        answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in slow))
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers)
        for _, writer in slow:
            writer.close()


async def test_the_clock_gauge_is_the_servers_time_at_each_scrape(
    tmp_path: Path, sqlite_url: str
) -> None:
    """incrementer_clock_seconds is the host's monotonic clock at the scrape: one series, which
    grows between two scrapes by the time between them (what rates are computed over)."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        before = time.monotonic()
        first = samples((await client.get("/metrics")).text)[("incrementer_clock_seconds", ())]
        await asyncio.sleep(0.3)
        second = samples((await client.get("/metrics")).text)[("incrementer_clock_seconds", ())]
        after = time.monotonic()
    assert before <= first < second <= after
