"""The store of a fleet's shared limits going away and coming back: limits fail open (each
process allows its share) or closed (429), as --rate-limit-store-down says, with a log line,
a metric and a /readyz warning either way; its password never shown."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from redis_server import own_redis
from support import add_api_key, run_cli, serve_args, spawned, unique, wait_until

SECRET = unique("redis-secret-")


def scraped(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_going_away_and_back(tmp_path: Path, sqlite_url: str, mode: str) -> None:
    """Redis killed under a fleet's instance: one log line, incrementer_rate_limit_store_up 0,
    failed exchanges counted, /readyz still 200 with the warning rate_limit_store_unavailable;
    the limited key gets some 202s (open: the instance's share) or only 429 with Retry-After: 1
    (closed), while a key without a limit is untouched. Redis back: one log line, all clear."""
    limited = await add_api_key(sqlite_url, unique("limited-"), rate=5, burst=5)
    ops = await add_api_key(sqlite_url, unique("ops-"))
    with own_redis(tmp_path / "redis", SECRET) as store:
        args = serve_args(tmp_path, sqlite_url, "--auth", "required", "--log-level", "info",
                          "--rate-limit-store", store.url, "--rate-limit-store-down", mode)  # fmt: skip
        with spawned(args) as server:
            async with httpx.AsyncClient(base_url=server.url) as client:

                async def metric(series: str) -> float | None:
                    resp = await client.get("/metrics", headers={"Authorization": f"Bearer {ops}"})
                    return scraped(resp.text, series)

                assert await metric("incrementer_rate_limit_store_up") == 1.0
                store.kill()
                await wait_until(lambda: "unreachable" in server.read_log(), timeout=15)
                assert await metric("incrementer_rate_limit_store_up") == 0.0
                failed = 'incrementer_rate_limit_syncs_total{result="failed"}'
                assert (await metric(failed) or 0) > 0
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.text
                assert [w["code"] for w in ready.json()["warnings"]] == [
                    "rate_limit_store_unavailable"
                ]
                details = await client.get("/readyz", headers={"Authorization": f"Bearer {ops}"})
                assert details.json()["details"]["rate_limit_store_error"]
                assert SECRET not in details.text
                answers = []
                for _ in range(20):
                    answers.append(
                        await client.post(
                            "/increment",
                            json={"key": "down", "value": 1},
                            headers={"Authorization": f"Bearer {limited}"},
                        )
                    )
                statuses = {a.status_code for a in answers}
                if mode == "open":
                    assert 202 in statuses and 429 in statuses, statuses
                else:
                    assert statuses == {429}
                    assert all(a.headers["retry-after"] == "1" for a in answers)
                    assert all(a.headers["ratelimit"].endswith(";r=0;t=1") for a in answers)
                free = await client.post(
                    "/increment",
                    json={"key": "down", "value": 1},
                    headers={"Authorization": f"Bearer {ops}"},
                )
                assert free.status_code == 202
                store.start()
                await wait_until(lambda: "reachable again" in server.read_log(), timeout=15)
                assert await metric("incrementer_rate_limit_store_up") == 1.0
                assert (await client.get("/readyz")).json()["warnings"] == []
            server.stop_cleanly()
    log = server.read_log()
    assert f"limits fail {mode}" in log
    assert ":***@127.0.0.1" in log
    assert SECRET not in log


def test_a_bad_store_url_is_refused_without_its_password(tmp_path: Path) -> None:
    """A Redis URL without a host, of another scheme or with a database that is not a number:
    one line naming the option and the URL, its password as ***; exit 2."""
    for url, why in (
        (f"redis://:{SECRET}@/0", "names no host"),
        (f"http://:{SECRET}@h:1/0", "unsupported rate-limit store URL"),
        (f"redis://:{SECRET}@h:6379/zero", "the database must be a number"),
    ):
        proc = run_cli("serve", "--rate-limit-store", url, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("incrementer: invalid rate-limit-store='"), proc.stderr
        assert why in proc.stderr and ":***@" in proc.stderr
        assert SECRET not in proc.stderr


async def test_a_store_refusing_the_password_fails_over_to_the_local_share(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A wrong Redis password at start: the instance starts anyway (failing open), says why in
    one line without the password it was given, and limits its key to its own share."""
    limited = await add_api_key(sqlite_url, unique("limited-"), rate=5, burst=5)
    with own_redis(tmp_path / "redis", "the-right-one") as store:
        url = f"redis://:{SECRET}@127.0.0.1:{store.port}/0"
        args = serve_args(tmp_path, sqlite_url, "--auth", "required", "--log-level", "info",
                          "--rate-limit-store", url)  # fmt: skip
        with spawned(args) as server:
            async with httpx.AsyncClient(base_url=server.url) as client:
                statuses = [
                    (
                        await client.post(
                            "/increment",
                            json={"key": "pw", "value": 1},
                            headers={"Authorization": f"Bearer {limited}"},
                        )
                    ).status_code
                    for _ in range(12)
                ]
            assert 202 in statuses and 429 in statuses
            server.stop_cleanly()
    log = server.read_log()
    assert "unreachable" in log and SECRET not in log
