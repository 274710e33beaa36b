"""The Python client's URL and the failures it does not retry: HOST:PORT taken as plain HTTP,
an unusable URL refused when the client is made, an untrusted certificate dropped at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from incrementer_client import AsyncClient, Client, Refused
from support import db_totals, serve_args, spawned, unique
from test_incr_command import tls_listener


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1:3333", "", "http://", "localhost:0", "http://h:70000", "h:1/?q=1"]
)
def test_an_unusable_url_is_refused_when_the_client_is_made(url: str) -> None:
    """Client and AsyncClient raise ValueError, naming the URL, for one they cannot send to,
    before any thread or task starts."""
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match="server URL"):
            make(url)


async def test_host_port_reaches_the_server_over_plain_http(tmp_path: Path) -> None:
    """Client("127.0.0.1:PORT") and AsyncClient("localhost:PORT") count as a full URL does."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    key = unique()
    with spawned(serve_args(tmp_path, database_url, "--flush-interval", "0.05")) as server:
        host_port = server.url.removeprefix("http://")
        with Client(host_port) as sync_client:
            sync_client.incr(key, 2)
        async with AsyncClient("localhost:" + host_port.rsplit(":", 1)[1]) as async_client:
            await async_client.incr(key, 3)
        server.stop_cleanly()
    assert await db_totals(database_url, [key]) == {key: 5}


def test_an_untrusted_certificate_is_not_retried(tmp_path: Path) -> None:
    """A TLS certificate the client does not trust is a failure no retry gets past: the batch
    is dropped at its first attempt and flush() raises Refused saying why (a retried one would
    end in flush's TimeoutError instead)."""
    with tls_listener(tmp_path) as port, Client(f"https://127.0.0.1:{port}") as client:
        client.incr("k")
        with pytest.raises(Refused, match="CERTIFICATE_VERIFY_FAILED"):
            client.flush(timeout=60)
        stats = client.stats
    assert (stats.dropped, stats.retries) == (1, 0)
