"""GET /status in headless Chromium while a load runs: a key typed once, figures that move, nothing
loaded from anywhere but the server, a screenshot kept in test-artifacts/ (gitignored)."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fleet import spawn_group
from live_server import keyed_server, load_while
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright
from support import serve_args, skip_or_fail, spawned

from incrementer.api.pages import StatusPage

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # gitignored
# As root (CI) Chromium's sandbox cannot start; the rest keeps it from calling out to anything.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        skip_or_fail("chromium is not installed (Debian: apt-get install -y chromium)")
    assert found is not None
    return found


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    """Debian's Chromium, driven by playwright (never `playwright install`: no browser download)."""
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, chromium_sandbox=False
        )
        try:
            yield launched
        finally:
            await launched.close()


class Watched:
    """A page with everything it requested and every error it logged (CSP refusals included)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.requests: list[str] = []
        self.errors: list[str] = []  # console errors: failed loads, CSP refusals
        self.exceptions: list[str] = []  # the page's script failing
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.exceptions.append(str(exc)))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    async def figure(self, name: str) -> float | None:
        raw = await self.page.get_attribute(f"#fig-{name}", "data-value")
        return float(raw) if raw else None

    async def updates(self) -> int:
        return int(await self.page.get_attribute("body", "data-updates") or 0)

    async def wait_updates(self, count: int, timeout: float = 15) -> None:
        # A function, not an expression string: the page's policy forbids eval.
        await self.page.wait_for_function(
            "n => Number(document.body.dataset.updates) >= n", arg=count, timeout=timeout * 1000
        )


async def open_status(browser: Browser, url: str) -> Watched:
    page = await browser.new_page()
    watched = Watched(page)
    response = await page.goto(url + "/status")
    assert response is not None and response.status == 200
    return watched


async def test_status_page_shows_live_figures_after_the_key_is_typed_once(
    tmp_path: Path, browser: Browser
) -> None:
    """With keys required the page asks for one (a wrong key is refused), then shows requests/s,
    accepted increments, lag, pending keys, flushes and the WAL moving under a load, as charts,
    from its own origin only."""
    with keyed_server(tmp_path) as (server, key):
        stop = asyncio.Event()
        load = asyncio.create_task(load_while(server.url, key, stop))
        try:
            status = await open_status(browser, server.url)
            page = status.page
            await page.wait_for_selector("#key-form:not([hidden])", timeout=10_000)
            assert await status.updates() == 0  # no figures without a key

            await page.fill("#key-input", "ik_000000000000.wrong")
            await page.click("#key-form button")
            await page.wait_for_function(
                "() => document.getElementById('key-message').textContent.includes('refused')",
                timeout=10_000,
            )
            assert await status.updates() == 0

            await page.fill("#key-input", key)
            await page.click("#key-form button")
            await status.wait_updates(2)
            assert await page.is_hidden("#key-form")
            assert await page.text_content("#readiness") == "ready"
            first_total = await status.figure("accepted_total")
            first_chart = await page.get_attribute("polyline[data-figure=accepted_per_s]", "points")
            await status.wait_updates(await status.updates() + 3)
            figures = {
                name: await status.figure(name)
                for name in (
                    "requests_per_s",
                    "accepted_per_s",
                    "rejected_per_s",
                    "lag_seconds",
                    "pending_keys",
                    "flush_ms",
                    "flush_keys",
                    "wal_bytes",
                    "connections",
                )
            }
            later_total = await status.figure("accepted_total")
            later_chart = await page.get_attribute("polyline[data-figure=accepted_per_s]", "points")
            # Kept where a person can look at it after the run (pytest rotates its tmp dirs).
            ARTIFACTS.mkdir(exist_ok=True)
            screenshot = ARTIFACTS / "status-page.png"
            await page.screenshot(path=str(screenshot), full_page=True)
            in_session = await page.evaluate("sessionStorage.getItem('incrementer-api-key')")
        finally:
            stop.set()
            accepted = await load
    print(f"status page screenshot: {screenshot}")
    assert accepted > 0
    assert figures["requests_per_s"] and figures["requests_per_s"] > 0, figures
    assert figures["accepted_per_s"] and figures["accepted_per_s"] > 0, figures
    assert figures["rejected_per_s"] == 0, figures
    assert first_total is not None and later_total is not None and later_total > first_total
    assert first_chart != later_chart
    assert len((later_chart or "").split()) >= 4  # one point per update
    for name in ("lag_seconds", "pending_keys", "connections"):
        assert figures[name] is not None and figures[name] >= 0, figures
    assert figures["flush_ms"] and figures["flush_ms"] > 0, figures
    assert figures["flush_keys"] and figures["flush_keys"] >= 1, figures
    assert figures["wal_bytes"] and figures["wal_bytes"] > 0, figures
    assert in_session == key
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    origin = urlsplit(server.url).netloc
    assert {urlsplit(url).netloc for url in status.requests} == {origin}, status.requests
    assert {urlsplit(url).path for url in status.requests} == {"/status", "/metrics", "/readyz"}
    # The wrong key's 401s are the only errors the page may log.
    assert status.exceptions == []
    assert all("401" in error for error in status.errors), status.errors


NOT_READY = {
    "status": "not_ready",
    "reasons": [{"code": "database_unavailable", "for_seconds": 12.5}],
    "lag_seconds": 12.5,
    "lag_bound_seconds": 10,
    "pending_keys": 3,
    "overflowed_keys": 0,
}


async def test_status_page_needs_no_key_when_keys_are_off(tmp_path: Path, browser: Browser) -> None:
    """On a loopback bind with keys off, the figures show without a prompt; a 503 from /readyz
    shows as not ready with its reasons; when the server goes away the page says it is
    unreachable."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    args = serve_args(tmp_path, database_url)
    with spawned(args) as server:
        status = await open_status(browser, server.url)
        await status.wait_updates(2)
        assert await status.page.is_hidden("#key-form")
        assert await status.figure("requests_per_s") is not None
        assert await status.page.text_content("#readiness") == "ready"

        async def not_ready(route: Any) -> None:
            await route.fulfill(status=503, json=NOT_READY)

        await status.page.route("**/readyz", not_ready)
        await status.page.wait_for_selector("#readiness[data-state=not_ready]", timeout=10_000)
        assert await status.page.text_content("#readiness") == "not ready"
        assert await status.page.text_content("#reasons") == "database_unavailable for 12.50 s"
        await status.page.unroute("**/readyz")
        server.stop()
        await status.page.wait_for_selector("#readiness[data-state=unreachable]", timeout=10_000)
    assert status.exceptions == []
    assert all("Failed to load resource" in error for error in status.errors), status.errors


def scrape(clock: float, requests: int, workers: int | None) -> str:
    """A /metrics text as a group of `workers` (None: a lone process) would answer it."""
    lines = [
        f'incrementer_http_requests_total{{route="increment",status="202"}} {requests}',
        f"incrementer_accepted_increments_total {requests * 10}",
        "incrementer_rejected_increments_total 0",
        f"incrementer_clock_seconds {clock}",
        "incrementer_pending_keys 7",
    ]
    if workers is not None:
        lines.append(f"incrementer_workers {workers}")
    return "\n".join(lines) + "\n"


async def fake_server(page: Page, scrapes: list[str]) -> list[int]:
    """Serve the packaged page at http://status.test/status, and `scrapes` in turn as its
    /metrics (the last one again once they run out); how many were read, as a one-item list."""
    page_html = StatusPage.load()
    policy = re.search(rb"Content-Security-Policy: ([^\r]*)", page_html.headers)
    assert policy is not None
    served = [0]

    async def status(route: Any) -> None:
        headers = {"Content-Type": "text/html", "Content-Security-Policy": policy.group(1).decode()}
        await route.fulfill(status=200, body=page_html.body, headers=headers)

    async def metrics(route: Any) -> None:
        text = scrapes[min(served[0], len(scrapes) - 1)]
        served[0] += 1
        await route.fulfill(status=200, body=text, headers={"Content-Type": "text/plain"})

    async def readyz(route: Any) -> None:
        ready = {**NOT_READY, "status": "ready", "reasons": [], "lag_seconds": 0.0}
        await route.fulfill(status=200, json=ready)

    await page.route("http://status.test/status", status)
    await page.route("http://status.test/metrics", metrics)
    await page.route("http://status.test/readyz", readyz)
    return served


async def test_rates_use_the_servers_clock_when_the_tab_runs_slow(browser: Browser) -> None:
    """A throttled tab (its timers and clock advancing 1 s while the server's advance 2 s, as a
    background tab's do) still shows the rate the server counted: 600 requests in 2 server
    seconds is 300/s, not the 600/s the tab's own clock would make of it."""
    page = await browser.new_page()
    status = Watched(page)
    served = await fake_server(page, [scrape(1000.0 + 2 * i, 600 * i, workers=3) for i in range(4)])
    await page.clock.install(time=1_700_000_000)
    await page.clock.pause_at(1_700_000_010)
    await page.goto("http://status.test/status")
    await page.wait_for_function("() => document.getElementById('workers').textContent !== ''")
    for expected_updates in (1, 2, 3):
        await page.clock.run_for(1000)  # one tick of the page: one second by the tab's clock
        await status.wait_updates(expected_updates)
        assert await status.figure("requests_per_s") == 300.0, served
        assert await status.figure("accepted_per_s") == 3000.0
    assert await page.text_content("#workers") == "3 workers"
    assert status.exceptions == [] and status.errors == []


async def test_charts_have_axes_from_the_first_update(browser: Browser) -> None:
    """After the first interval, every chart has a value axis from 0 to a round maximum, a time
    axis of the last two minutes, and its point drawn; a lone process shows as one process."""
    page = await browser.new_page()
    status = Watched(page)
    await fake_server(page, [scrape(50.0, 0, None), scrape(51.0, 37, None)])
    await page.goto("http://status.test/status")
    await status.wait_updates(1)
    charts = await page.query_selector_all("section .chart")
    assert len(charts) == 8
    for chart in charts:
        axes = await chart.inner_text()
        assert "2 min ago" in axes and "now" in axes, axes
        maximum = await chart.query_selector(".y-max")
        assert maximum is not None and (await maximum.inner_text()).strip() not in ("", "0")
        dots = await chart.query_selector_all("circle[visibility=visible]")
        assert dots, await chart.inner_html()
    requests = await page.query_selector("section:first-child .y-max")
    assert requests is not None and await requests.inner_text() == "50"  # 37/s, rounded up
    assert await page.text_content("#workers") == "1 process"
    assert status.exceptions == []


def test_the_start_log_names_the_status_page(tmp_path: Path) -> None:
    """A lone process and a `--workers 2` group each log the status page's URL once they
    listen, where a new user reads the listening URL; the group's /metrics gives the page its
    worker count and one server clock."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    with spawned(serve_args(tmp_path, database_url, "--log-level", "info")) as alone:
        alone.stop_cleanly()
    group = spawn_group(serve_args(tmp_path, database_url, "--log-level", "info"), 2)
    try:
        metrics = httpx.get(f"{group.url}/metrics").text
    finally:
        group.stop_cleanly()
    # What the page reads from a group: its worker count, and one clock (the answering worker's).
    assert re.search(r"^incrementer_workers 2\.0$", metrics, re.MULTILINE), metrics
    assert len(re.findall(r"^incrementer_clock_seconds ", metrics, re.MULTILINE)) == 1
    for server in (alone, group):
        logged = server.read_log()
        assert logged.count(f"status page: {server.url}/status") == 1, logged


async def test_a_script_from_elsewhere_is_refused_by_the_page_policy(
    tmp_path: Path, browser: Browser
) -> None:
    """The Content-Security-Policy sent with /status lets only the page's own script run: the
    same page with one more inline script, or a script from another origin, gets neither run."""
    page_html = StatusPage.load()
    policy = re.search(rb"Content-Security-Policy: ([^\r]*)", page_html.headers)
    assert policy is not None
    tampered = page_html.body.replace(
        b"</body>",
        b"<script>document.title = 'injected'</script>"
        b'<script src="https://cdn.example/x.js"></script></body>',
    )

    async def serve(route: Any) -> None:
        await route.fulfill(
            status=200,
            body=tampered,
            headers={
                "Content-Type": "text/html; charset=utf-8",
                "Content-Security-Policy": policy.group(1).decode(),
            },
        )

    page = await browser.new_page()
    watched = Watched(page)
    await page.route("http://status.test/status", serve)
    await page.route(
        re.compile(r"https://cdn\.example/.*"),
        lambda route: route.fulfill(body="document.title = 'from elsewhere'"),
    )
    await page.goto("http://status.test/status")
    await page.wait_for_timeout(500)
    assert await page.title() == "incrementer status"
    refused = [error for error in watched.errors if "Content Security Policy" in error]
    assert any("inline script" in error for error in refused), watched.errors
    assert any("cdn.example" in error for error in refused), watched.errors


def test_status_route_answers_html_with_its_policy_and_counts_itself() -> None:
    """The packaged page loads: one script and one style, hashed into its policy; a page that
    grows a second script is refused at load, before it could be served unhashed."""
    page = StatusPage.load()
    assert page.body.startswith(b"<!doctype html>")
    assert b"script-src 'sha256-" in page.headers
    assert b"http://" not in page.body.replace(b"http://www.w3.org/2000/svg", b"")
    assert b"https://" not in page.body
    from incrementer.api.pages import content_security_policy

    with pytest.raises(ValueError, match="exactly one <script>"):
        content_security_policy(page.body.decode() + "<script>x()</script>")


async def test_status_is_public_but_its_figures_are_not(tmp_path: Path) -> None:
    """Without a key, /status answers the page (it holds no figures) and /metrics answers 401."""
    with keyed_server(tmp_path) as (server, key):
        async with httpx.AsyncClient(base_url=server.url) as http:
            page = await http.get("/status")
            metrics = await http.get("/metrics")
            allowed = await http.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert metrics.status_code == 401
    assert allowed.status_code == 200
    assert 'incrementer_http_requests_total{route="status",status="200"} 1.0' in allowed.text
