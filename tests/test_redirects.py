"""The API key goes only to the origin it was given for: `incrementer top`, `incrementer incr`
and the Python client never carry it to another origin when a server answers with a redirect."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from incrementer_client import AsyncClient, Client, Refused
from support import run_cli

from incrementer.cli.top import fetch

API_KEY = "inc_" + "k" * 43
METRICS = b"# HELP incrementer_up x\n# TYPE incrementer_up gauge\nincrementer_up 1\n"


@dataclass
class Seen:
    """What one test server was asked: (method, path, Authorization or None) per request."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def authorizations(self) -> list[str | None]:
        return [auth for _, _, auth in self.requests]


@contextlib.contextmanager
def http_server(redirect_to: str | None) -> Iterator[tuple[str, Seen]]:
    """A server on a free loopback port: with redirect_to, every request below /real/ is
    answered by itself, and every other one gets a 307 to redirect_to + its path (which may
    be this server's own origin: its URL is then formatted in); without it, answers
    everything: /metrics a metrics page, anything else `{}`. Yields its URL and what it saw."""
    seen = Seen()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            seen.requests.append((self.command, self.path, self.headers.get("Authorization")))
            if redirect_to is not None and not self.path.startswith("/real/"):
                target = redirect_to.format(self_url=url)
                self.send_response(307)
                self.send_header("Location", target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = METRICS if self.path.endswith("/metrics") else b"{}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url, seen
    finally:
        server.shutdown()
        server.server_close()


def test_top_does_not_send_the_key_to_another_origin() -> None:
    """Guards item: redirects. `incrementer top` follows a redirect to another port without
    the API key (urllib's default handler copied the Authorization field there)."""
    with http_server(None) as (elsewhere, other), http_server(elsewhere) as (url, first):
        fetch(url, API_KEY)
    assert first.authorizations() == [f"Bearer {API_KEY}"] * 2
    assert [path for _, path, _ in other.requests] == ["/metrics", "/readyz"]
    assert other.authorizations() == [None, None]


def test_top_keeps_the_key_on_a_redirect_to_the_same_origin() -> None:
    """A redirect within the origin the key was given for (a proxy's path prefix) still
    carries it: top keeps working there."""
    with http_server("{self_url}/real") as (url, seen):
        fetch(url, API_KEY)
    assert [path for _, path, _ in seen.requests] == [
        "/metrics",
        "/real/metrics",
        "/readyz",
        "/real/readyz",
    ]
    assert seen.authorizations() == [f"Bearer {API_KEY}"] * 4


def test_client_does_not_follow_a_redirect() -> None:
    """The client answers a redirect as a refusal and never sends to where it points, with
    or without the key."""
    with http_server(None) as (elsewhere, other), http_server(elsewhere) as (url, first):
        client = Client(url, API_KEY, close_at_exit=None, retry_for=2)
        try:
            client.incr("k", 1)
            with pytest.raises(Refused, match="307"):
                client.flush(timeout=5)
        finally:
            client.close(0)
        assert client.stats.acknowledged == 0
        assert [method for method, _, _ in first.requests] == ["POST"]
    assert other.requests == []


async def test_async_client_does_not_follow_a_redirect() -> None:
    """The async client, likewise: nothing reaches the redirect's target."""
    with http_server(None) as (elsewhere, other), http_server(elsewhere) as (url, first):
        client = AsyncClient(url, API_KEY, retry_for=2)
        try:
            await client.incr("k", 1)
            with pytest.raises(Refused, match="307"):
                await client.flush(timeout=5)
        finally:
            await client.aclose(0)
        assert client.stats.acknowledged == 0
        assert [method for method, _, _ in first.requests] == ["POST"]
    assert other.requests == []


@pytest.mark.parametrize("redirected", ["elsewhere", "same origin"])
def test_incr_does_not_send_the_key_to_another_origin(redirected: str) -> None:
    """`incrementer incr` reports a redirect as a refusal (exit 1) and never sends the key
    to where it points."""
    with http_server(None) as (elsewhere, other):
        target = elsewhere if redirected == "elsewhere" else "{self_url}/real"
        with http_server(target) as (url, first):
            done = run_cli("incr", "k", "1", "--url", url, "--api-key", API_KEY, "--timeout", "5")
    assert done.returncode == 1, done.stderr
    assert "307" in done.stderr, done.stderr
    assert first.authorizations() == [f"Bearer {API_KEY}"]
    assert other.requests == []
