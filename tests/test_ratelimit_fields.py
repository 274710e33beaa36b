"""The RateLimit-Policy and RateLimit header fields (draft-ietf-httpapi-ratelimit-headers) on
every answer a limit applies to, fast path and general path alike, in the syntax the OpenAPI
document gives; Retry-After equal to the wait on a 429; nothing on answers no limit applies to."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import httpx
from support import (
    Response,
    add_api_key,
    exchange,
    increment_request,
    run_service,
    settings_for,
    unique,
)

HEADERS = json.loads(resources.files("incrementer.api").joinpath("openapi.json").read_bytes())[
    "components"
]["headers"]
POLICY = re.compile(HEADERS["RateLimitPolicy"]["schema"]["pattern"])
STATE = re.compile(HEADERS["RateLimit"]["schema"]["pattern"])


def fields(resp: httpx.Response | Response) -> tuple[str, str] | None:
    policy, state = resp.headers.get("ratelimit-policy"), resp.headers.get("ratelimit")
    if policy is None and state is None:
        return None
    assert policy is not None and state is not None, resp.headers
    assert POLICY.fullmatch(policy) and STATE.fullmatch(state), (policy, state)
    return policy, state


def remaining(state: str) -> int:
    return int(re.search(r";r=(\d+)", state).group(1))  # type: ignore[union-attr]


async def test_a_keys_answers_count_down_to_a_429_that_says_when(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A key rated 1/s with a burst of 3: its 202s (the fast path's) say the policy (3 per 3 s)
    and 2, 1, 0 requests left; the 429 after them says 0 left, t=1, and Retry-After: 1; a read
    (general path) carries the fields too."""
    key = await add_api_key(sqlite_url, unique("slow-"), rate=1, burst=3)
    settings = settings_for(tmp_path, sqlite_url, auth="required")
    auth = {"Authorization": f"Bearer {key}"}
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        answers = [
            await client.post("/increment", json={"key": "f", "value": 1}, headers=auth)
            for _ in range(4)
        ]
        assert [a.status_code for a in answers] == [202, 202, 202, 429]
        seen = [fields(a) for a in answers]
        assert all(f is not None and f[0] == '"per-key";q=3;w=3' for f in seen)
        assert [remaining(f[1]) for f in seen if f] == [2, 1, 0, 0]
        refused = answers[3]
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["ratelimit"].endswith(";t=1")
        read = await client.get("/counters/f", headers=auth)
        assert read.status_code in (200, 429) and fields(read) is not None


async def test_the_general_path_and_every_connection_form_carry_the_fields(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A form body and a batch (general path), and the fast path's 202 on an HTTP/1.0
    keep-alive connection and with Connection: close, all carry the fields (the last two keep
    their Connection field)."""
    key = await add_api_key(sqlite_url, unique("many-"), rate=100, burst=100)
    settings = settings_for(tmp_path, sqlite_url, auth="required")
    auth = {"Authorization": f"Bearer {key}"}
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        form = await client.post("/increment", data={"key": "g", "value": "1"}, headers=auth)
        batch = await client.post("/increments", json=[{"key": "g", "value": 1}], headers=auth)
        for resp in (form, batch):
            assert resp.status_code == 202 and fields(resp) is not None
        raw = increment_request("g", 1).replace(
            b"Host: t\r\n", b"Host: t\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
        )
        http10 = raw.replace(b"HTTP/1.1", b"HTTP/1.0").replace(
            b"Host: t\r\n", b"Host: t\r\nConnection: keep-alive\r\n"
        )
        closing = raw.replace(b"Host: t\r\n", b"Host: t\r\nConnection: close\r\n")
        kept, second = await exchange(svc.url, http10 * 2, 2)
        assert kept.status == second.status == 202
        assert kept.headers["connection"] == "keep-alive" and fields(kept) is not None
        (closed,) = await exchange(svc.url, closing, 1)
        assert closed.status == 202 and closed.headers["connection"] == "close"
        assert fields(closed) is not None
        assert remaining(fields(closed)[1]) < remaining(fields(form)[1])  # type: ignore[index]


async def test_no_limit_no_fields_and_a_client_address_limit_says_per_ip(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Without a limit, no answer carries the fields (the pre-built 202 is unchanged); with
    keys off and --rate-limit, the policy is per client address."""
    async with run_service(settings_for(tmp_path, sqlite_url)) as svc:
        async with httpx.AsyncClient(base_url=svc.url) as client:
            plain = await client.post("/increment", json={"key": "n", "value": 1})
            form = await client.post("/increment", data={"key": "n", "value": "1"})
        assert plain.status_code == form.status_code == 202
        assert fields(plain) is None and fields(form) is None
    limited = settings_for(tmp_path / "ip", sqlite_url, rate_limit=10, rate_burst=20)
    async with run_service(limited) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        resp = await client.post("/increment", json={"key": "n", "value": 1})
        found = fields(resp)
        assert found is not None and found[0] == '"per-ip";q=20;w=2'


def test_a_202_with_fields_is_the_one_build_would_make() -> None:
    """The fast path's 202 with a limit's fields, put together from pre-built parts, is byte for
    byte what responses.build makes, kept alive, closing, and for HTTP/1.0."""
    from incrementer.http import responses

    clock = responses.Clock(0.0)
    fields = b'RateLimit-Policy: "per-key";q=5;w=1\r\nRateLimit: "per-key";r=4;t=1\r\n'
    for close, http10 in ((False, False), (True, False), (False, True)):
        headers = fields + responses.KEEP_ALIVE if http10 else fields
        expected = responses.build(clock, 202, headers=headers, close=close)
        assert responses.accepted(clock, fields, close, http10) == expected
