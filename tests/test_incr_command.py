"""`incrementer incr` as a new user meets it: HOST:PORT taken as a URL, what cannot succeed
refused at once, progress on stderr while it retries what may, and "gave up" when time is out."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import keyed_server
from support import db_totals, free_port, run_cli, serve_args, skip_or_fail, spawned, unique
from test_deploy import self_signed

# Long enough that a retried permanent error would outlast the subprocess's own timeout (run_cli:
# 90 s): a command that returns at all did not retry it.
PATIENT = "600"


def totals(database_url: str, keys: list[str]) -> dict[str, int]:
    return asyncio.run(db_totals(database_url, keys))


def test_host_port_is_a_url(tmp_path: Path) -> None:
    """`--url 127.0.0.1:PORT` (no scheme) and INCREMENTER_URL=localhost:PORT count at once,
    once each, and say nothing."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    key = unique()
    with spawned(serve_args(tmp_path, database_url, "--flush-interval", "0.05")) as server:
        host_port = server.url.removeprefix("http://")
        bare = run_cli("incr", key, "5", "--url", host_port, "--timeout", PATIENT)
        port = host_port.rsplit(":", 1)[1]
        from_env = run_cli("incr", key, env={"INCREMENTER_URL": f"localhost:{port}"})
        server.stop_cleanly()
    assert (bare.returncode, bare.stderr) == (0, ""), bare.stderr
    assert (from_env.returncode, from_env.stderr) == (0, ""), from_env.stderr
    assert totals(database_url, [key]) == {key: 6}


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://127.0.0.1:3333", "must start with http:// or https://"),
        ("http://", "names no host"),
        ("127.0.0.1:99999", "port 99999 is not between 1 and 65535"),
        ("http://127.0.0.1:3333/?x=1", "must not have a query"),
    ],
)
def test_an_unusable_url_is_a_usage_error_at_once(url: str, says: str) -> None:
    """A URL the client cannot send to is refused before any attempt: exit 2, one line."""
    done = run_cli("incr", "k", "--url", url, "--timeout", PATIENT)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "--url" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_a_refusal_fails_at_once(tmp_path: Path) -> None:
    """A server that answers 401 (no key) or 400 (a value it refuses) is not retried: exit 1
    with the server's reason, however long --timeout is."""
    with keyed_server(tmp_path) as (server, key):
        no_key = run_cli("incr", "k", "--url", server.url, "--timeout", PATIENT)
        refused = run_cli(
            "incr", "k", "0", "--url", server.url, "--api-key", key, "--timeout", PATIENT
        )
    assert no_key.returncode == 1
    assert f"{server.url} refused the increment: 401 unauthorized" in no_key.stderr
    assert refused.returncode == 1 and "400 invalid_value" in refused.stderr
    for done in (no_key, refused):
        assert len(done.stderr.splitlines()) == 1, done.stderr


@contextlib.contextmanager
def tls_listener(tmp_path: Path) -> Iterator[int]:
    """A port that completes TLS handshakes with a self-signed certificate (and then closes):
    what a client that does not trust the certificate meets."""
    if shutil.which("openssl") is None:
        skip_or_fail("openssl is not installed (Debian: apt-get install -y openssl)")
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_an_untrusted_certificate_fails_at_once(tmp_path: Path) -> None:
    """An https URL whose certificate this client does not trust cannot pass by retrying: exit
    1 at once, saying so."""
    with tls_listener(tmp_path) as port:
        done = run_cli("incr", "k", "--url", f"https://127.0.0.1:{port}", "--timeout", PATIENT)
    assert done.returncode == 1, done.stderr
    assert "cannot send to https://127.0.0.1" in done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr and "no retry gets past it" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_no_server_shows_progress_then_gives_up() -> None:
    """With nothing listening, incr says on stderr why it is still trying while it retries,
    then "gave up" (never "still retrying") when --timeout is spent: exit 1."""
    port = free_port()
    done = run_cli("incr", "k", "5", "--url", f"127.0.0.1:{port}", "--timeout", "3")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    progress = [line for line in lines if "not acknowledged yet" in line]
    assert progress, done.stderr
    assert "Connection refused (is the server running there?)" in progress[0]
    assert "retrying for" in progress[0]
    assert re.match(r"incrementer: gave up after \d+ s and \d+ attempts: ", lines[-1]), lines
    assert "the last one failed: ConnectError" in lines[-1]
    assert "still retrying" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_server_that_comes_up_while_it_retries_counts_once(tmp_path: Path) -> None:
    """incr started before the server: progress lines while nothing listens, then the server
    starts on that port, the increment is acknowledged, counted once, and incr says so."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    key, port = unique(), free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "incrementer", "incr", key, "7", "--url", f"127.0.0.1:{port}"],
        stderr=subprocess.PIPE,
        text=True,
    ) as incr:
        try:
            assert incr.stderr is not None
            first = incr.stderr.readline()  # the first progress line: it is retrying
            assert "not acknowledged yet" in first, first
            args = serve_args(
                tmp_path, database_url, "--port", str(port), "--flush-interval", "0.05"
            )
            with spawned(args) as server:
                rest = incr.stderr.read()
                assert incr.wait(60) == 0, first + rest
                server.stop_cleanly()
        finally:
            if incr.poll() is None:
                incr.kill()
    assert rest.splitlines()[-1].startswith("incrementer: acknowledged on attempt ")
    assert totals(database_url, [key]) == {key: 7}
