"""/metrics from the first scrape: every labelled counter at 0 for each label value the service
can produce, the process collector, and incrementer_build_info."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support import add_api_key, exchange, run_service, settings_for

from incrementer import build
from incrementer.api.routes import REJECT_REASONS, ROUTE_STATUSES

Labels = tuple[tuple[str, str], ...]


def labelled(text: str, name: str) -> dict[Labels, float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def requests_series(text: str) -> dict[tuple[str, str], float]:
    series = labelled(text, "incrementer_http_requests_total")
    return {(dict(k)["route"], dict(k)["status"]): v for k, v in series.items()}


def rejected_series(text: str) -> dict[str, float]:
    return {
        dict(k)["reason"]: v
        for k, v in labelled(text, "incrementer_rejected_increments_total").items()
    }


async def test_every_label_value_is_exported_at_zero_from_the_start(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The first scrape lists every route and status, and every refusal reason, at 0 (the
    scrape itself is the one request counted)."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        text = (await client.get("/metrics")).text
    requests = requests_series(text)
    expected = {(route, str(status)) for route, codes in ROUTE_STATUSES.items() for status in codes}
    assert set(requests) == expected
    assert requests.pop(("metrics", "200")) == 1
    assert set(requests.values()) == {0}
    assert rejected_series(text) == dict.fromkeys(REJECT_REASONS, 0)


async def test_the_declared_label_values_cover_what_happens(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A workload of refusals of every kind (bad bodies, media types, methods, paths, keys,
    encodings, HTTP errors, missing and rate-limited keys) adds no label value the first
    scrape did not already show."""
    limited = await add_api_key(sqlite_url, "limited", rate=0.001, burst=1)
    settings = settings_for(tmp_path, sqlite_url, auth="required", max_body_bytes=1000)
    auth = {"Authorization": f"Bearer {limited}"}
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        first = (await client.get("/metrics", headers=auth)).text
        bodies = [
            b"{",
            b'{"key":"a"}',
            b'{"key":"a","value":1,"x":1}',
            b'{"key":"","value":1}',
            b'{"key":"' + b"k" * 300 + b'","value":1}',
            b'{"key":"a","value":0}',
            b'{"key":"a","value":99999999999999999999}',
            b'{"key":1,"value":1}',
            b"[]",
        ]
        other = await add_api_key(sqlite_url, "other")
        good = {"Authorization": f"Bearer {other}"}
        for body in bodies:
            for path in ("/increment", "/increments"):
                await client.post(
                    path, content=body, headers={**good, "Content-Type": "application/json"}
                )
        await client.post(
            "/increments", content=b"[" + b'{"key":"a","value":1},' * 10_001 + b"]", headers=good
        )
        form = {**good, "Content-Type": "application/x-www-form-urlencoded"}
        for body in (b"key=a&key=b&value=1", b"key=a", b"key=a&value=x&z=1", b"%"):
            await client.post("/increment", content=body, headers=form)
        await client.post("/increments", content=b"key=a&value=1", headers=form)
        await client.post(
            "/increment", content=b"x", headers={**good, "Content-Type": "text/plain"}
        )
        await client.post("/increment", json={"key": "a", "value": 1})  # no key: 401
        await client.get("/counters/a", headers=auth)  # the bucket is spent: 429
        for path in ("/counters/%ZZ", "/counters/never", "/nope", "/increment", "/counters/"):
            await client.get(path, headers=good)
        reads = (
            "/counters/a/series?granularity=minute",  # 400: no buckets kept
            "/counters?key=a&key=",
            "/counters?prefix=a&order=value",
            "/counters?prefix=a&cursor=x",
            "/counters?key=a",
        )
        for path in reads:
            await client.get(path, headers=good)
            await client.get(path)  # no key: 401
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/counters/a", *reads):
            await client.post(path, headers=good)
        await exchange(svc.url, b"GET /healthz HTTP/1.1\r\n\r\n", 1)  # no Host: 400
        await exchange(
            svc.url, b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n", 1
        )
        last = (await client.get("/metrics", headers=good)).text
    assert set(requests_series(last)) == set(requests_series(first))
    assert set(rejected_series(last)) == set(rejected_series(first))
    moved = {k for k, v in requests_series(last).items() if v != requests_series(first)[k]}
    assert len(moved) >= 15  # the workload did reach most of them


def test_every_validation_code_is_a_declared_reason() -> None:
    """Each code ingest/validate.py can refuse an increment with is declared, so none appears
    only when it first happens."""
    source = (Path(__file__).parents[1] / "src/incrementer/ingest/validate.py").read_text()
    codes = set(re.findall(r'BadRequest\(\s*"(\w+)"', source))
    assert len(codes) >= 10
    assert codes <= set(REJECT_REASONS)


async def test_process_metrics_and_build_info(tmp_path: Path, sqlite_url: str) -> None:
    """process_* from prometheus-client's process collector, and incrementer_build_info with
    the version and which build runs."""
    async with (
        run_service(settings_for(tmp_path, sqlite_url)) as svc,
        httpx.AsyncClient(base_url=svc.url) as client,
    ):
        text = (await client.get("/metrics")).text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert labelled(text, name), name
    info = labelled(text, "incrementer_build_info")
    assert info == {(("build", build.name()), ("version", build.version())): 1.0}
    assert build.version() != "unknown"
