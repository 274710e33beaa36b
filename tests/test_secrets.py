"""Secrets never leave the process: database passwords in every URL form are redacted wherever a
URL is printed, and the unauthenticated /readyz names no host, user, database or counter."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from proxy import proxy_to
from support import add_api_key, run_service, serve_args, settings_for, spawned, unique, wait_until

from incrementer.urls import redact_url, scrub

SECRET = unique("hunter2-")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db?password=pw", "postgresql://u@h/db?password=***"),
        (
            "postgresql://h/db?sslmode=require&sslpassword=pw",
            "postgresql://h/db?sslmode=require&sslpassword=***",
        ),
        ("postgres://h/db?PASSWORD=pw&x=1", "postgres://h/db?PASSWORD=***&x=1"),
        ("postgresql://h/db?pass%77ord=pw", "postgresql://h/db?pass%77ord=***"),
        ("postgresql://u:pw@h/db?password=pw2", "postgresql://u:***@h/db?password=***"),
        ("postgresql://u:@h/db", "postgresql://u:***@h/db"),
        ("sqlite:///counters.db", "sqlite:///counters.db"),
        ("postgresql://u@h/db?passfile=/x", "postgresql://u@h/db?passfile=/x"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://default:pw@h:6380/2", "rediss://default:***@h:6380/2"),
        ("redis://h:6379/0?password=pw", "redis://h:6379/0?password=***"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_every_url_form_is_redacted(url: str, shown: str) -> None:
    """The userinfo password and the password/sslpassword query parameters become ***."""
    assert redact_url(url) == shown


def test_scrub_removes_secrets_quoted_in_a_message() -> None:
    """A driver message quoting the URL's secrets, raw or decoded, loses them."""
    url = "postgresql://u:p%40ss@h/db?sslpassword=k%26y"
    assert scrub("bad p@ss and p%40ss, k&y", url) == "bad *** and ***, ***"


async def test_password_in_the_query_is_never_logged_nor_shown(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With ?password= (trust auth ignores it), neither the start log, the flush-failure lines
    nor /readyz show the secret; /readyz shows no host, user, database or counter name without a
    key, and the details with one."""
    async with proxy_to(pg_url) as (proxy, via_proxy):
        url = f"{via_proxy}?password={SECRET}"
        parts = urlsplit(url)
        key = await add_api_key(url)
        settings = settings_for(tmp_path, url, auth="required", flush_interval=0.05)
        caplog.set_level(logging.INFO)
        async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
            good = {"Authorization": f"Bearer {key}"}
            resp = await client.post("/increment", json={"key": "s", "value": 1}, headers=good)
            assert resp.status_code == 202
            await proxy.cut()

            async def failing() -> bool:
                await client.post("/increment", json={"key": "s", "value": 1}, headers=good)
                return (await client.get("/readyz")).status_code == 503

            await wait_until(failing, timeout=20)
            anonymous = (await client.get("/readyz")).text
            for private in (parts.hostname, str(parts.port), parts.username, parts.path[1:]):
                assert private and private not in anonymous, private
            detailed = (await client.get("/readyz", headers=good)).json()
            assert detailed["details"]["database_error"], detailed
            assert SECRET not in str(detailed)
            await proxy.restore()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "flush failed" in logged or "database unreachable" in logged
    assert SECRET not in logged


def test_start_log_of_a_subprocess_hides_the_query_password(tmp_path: Path, pg_url: str) -> None:
    """The start-up line names the database without its password."""
    url = f"{pg_url}?password={SECRET}"
    with spawned(serve_args(tmp_path, url)) as server:
        server.stop_cleanly()
    log = server.read_log()
    assert "password=***" in log
    assert SECRET not in log
