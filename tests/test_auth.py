"""API keys, the insecure-bind refusal, and token-bucket rate limits."""

from __future__ import annotations

import hmac
import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from support import (
    add_api_key,
    exchange,
    increment_request,
    run_cli,
    run_service,
    settings_for,
    unique,
    wait_until,
)

from incrementer.auth.keyring import KeyRing, TokenBucket, new_key
from incrementer.config import ConfigError, Settings
from incrementer.store import open_store
from incrementer.store.base import ApiKey


def test_auth_off_on_public_bind_is_refused() -> None:
    """--auth off with a non-loopback host fails, naming the override flag."""
    with pytest.raises(ConfigError, match="insecure-no-auth"):
        Settings(host="0.0.0.0", auth="off")
    Settings(host="0.0.0.0", auth="off", insecure_no_auth=True)
    Settings(host="127.0.0.1", auth="off")
    result = run_cli("serve", "--host", "0.0.0.0", "--auth", "off")
    assert result.returncode == 2
    assert "--insecure-no-auth" in result.stderr


def test_auth_auto_requires_keys_off_loopback() -> None:
    """The default (auto) needs keys on a public bind and not on loopback."""
    assert Settings(host="0.0.0.0").auth_required
    assert not Settings(host="127.0.0.1").auth_required
    assert not Settings(host="::1").auth_required
    assert Settings(host="127.0.0.1", auth="required").auth_required


def test_keyring_uses_constant_time_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    """Key checks go through hmac.compare_digest, for known and unknown key ids alike."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    key, key_id, key_hash = new_key()
    ring = KeyRing(0, 0)
    ring.load([ApiKey("a", key_id, key_hash)], 0.0)
    assert ring.authenticate(b"Bearer " + key.encode()) is not None
    assert ring.authenticate(b"Bearer " + key.encode()[:-1] + b"x") is None
    assert ring.authenticate(b"Bearer ik_000000000000.nope") is None
    assert len(calls) == 3


def test_token_bucket_at_twice_its_rate_refuses_about_half() -> None:
    """A client sending at 2x its rate for 10 s gets about half 429s (simulated clock)."""
    bucket = TokenBucket(rate=50, burst=10, now=0.0)
    allowed = sum(1 for i in range(1000) if bucket.take(i / 100) == 0.0)
    assert 500 <= allowed <= 511  # 50/s for 10 s plus the initial burst of 10
    wait = TokenBucket(rate=2, burst=1, now=0.0)
    assert wait.take(0.0) == 0.0
    assert wait.take(0.0) == pytest.approx(0.5)


async def test_keys_required_lifecycle(tmp_path: Path, db_url: str) -> None:
    """401 without or with a bad key, 202 with a good one, 401 once revoked and refreshed."""
    name = unique("client-")
    key = await add_api_key(db_url, name)
    settings = settings_for(tmp_path, db_url, auth="required", auth_refresh=0.2)
    body = {"key": "guarded", "value": 1}
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        missing = await client.post("/increment", json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["error"] == "unauthorized"
        wrong = await client.post(
            "/increment", json=body, headers={"Authorization": "Bearer ik_x.y"}
        )
        assert wrong.status_code == 401
        good = {"Authorization": f"Bearer {key}"}
        assert (await client.post("/increment", json=body, headers=good)).status_code == 202
        assert (await client.get("/counters/guarded")).status_code == 401
        assert (await client.get("/counters/guarded", headers=good)).json()["value"] == 1
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=good)).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        store = open_store(db_url)
        await store.open()
        try:
            assert await store.revoke_api_key(name)
        finally:
            await store.close()

        async def rejected() -> bool:
            resp = await client.post("/increment", json=body, headers=good)
            return resp.status_code == 401

        await wait_until(rejected, timeout=5)
        assert (await client.get("/counters/guarded", headers=good)).status_code == 401


async def test_rate_limit_per_key(tmp_path: Path, sqlite_url: str) -> None:
    """Past its burst a key gets 429 with Retry-After; other keys are unaffected."""
    slow = await add_api_key(sqlite_url, "slow", rate=1, burst=5)
    other = await add_api_key(sqlite_url, "other")
    settings = settings_for(tmp_path, sqlite_url, auth="required")
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        statuses = []
        for _ in range(20):
            resp = await client.post(
                "/increment",
                json={"key": "r", "value": 1},
                headers={"Authorization": f"Bearer {slow}"},
            )
            statuses.append(resp.status_code)
            if resp.status_code == 429:
                assert int(resp.headers["retry-after"]) >= 1
                assert resp.json()["error"] == "rate_limited"
        assert 5 <= statuses.count(202) <= 7
        assert statuses.count(429) >= 13
        resp = await client.post(
            "/increment",
            json={"key": "r", "value": 1},
            headers={"Authorization": f"Bearer {other}"},
        )
        assert resp.status_code == 202
        assert svc.metrics.rejected["rate_limited"] == statuses.count(429)
        assert (
            await client.get("/counters/r", headers={"Authorization": f"Bearer {other}"})
        ).json()["value"] == statuses.count(202) + 1


@pytest.mark.parametrize("limit", ["key", "ip"])
async def test_a_declined_request_is_charged_once(
    tmp_path: Path, sqlite_url: str, limit: str
) -> None:
    """A bad body costs one token, not two: the fast path takes a token before it reads the
    body and gives it back when it declines, then the general path charges and answers 400.
    A burst of 3 (with no refill to speak of) answers exactly three requests."""
    headers = {"Content-Type": "application/json"}
    if limit == "key":
        key = await add_api_key(sqlite_url, "exact", rate=0.001, burst=3)
        headers["Authorization"] = f"Bearer {key}"
        settings = settings_for(tmp_path, sqlite_url, auth="required")
    else:
        settings = settings_for(tmp_path, sqlite_url, rate_limit=0.001, rate_burst=3)
    good, bad = b'{"key":"once","value":1}', b'{"key":"once","value":0}'
    async with (
        run_service(settings) as svc,
        httpx.AsyncClient(base_url=svc.url, headers=headers) as client,
    ):
        # The first request goes the general way (it caches the key / creates the IP's bucket);
        # the rest are the fast path's to take or decline.
        statuses = [
            (await client.post("/increment", content=body)).status_code
            for body in (good, bad, good, good)
        ]
        assert statuses == [202, 400, 202, 429]
        assert svc.metrics.accepted_requests == 2


async def test_rate_limit_per_ip_when_auth_off(tmp_path: Path, sqlite_url: str) -> None:
    """With auth off, --rate-limit applies per client address."""
    settings = settings_for(tmp_path, sqlite_url, rate_limit=1, rate_burst=3)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        codes = [
            (await client.post("/increment", json={"key": "ip", "value": 1})).status_code
            for _ in range(10)
        ]
        assert 3 <= codes.count(202) <= 4
        assert codes.count(429) >= 6


def test_keys_cli_create_list_revoke(tmp_path: Path) -> None:
    """keys create prints the key once; list never shows it; revoke marks it revoked."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    created = run_cli("keys", "create", "alice", "--rate", "100", "--database-url", url)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ik_") and len(key) > 50
    listed = run_cli("keys", "list", "--database-url", url)
    assert "alice" in listed.stdout and "active" in listed.stdout
    assert key.split(".")[1] not in listed.stdout
    duplicate = run_cli("keys", "create", "alice", "--database-url", url)
    assert duplicate.returncode != 0 and "already exists" in duplicate.stderr
    assert run_cli("keys", "revoke", "alice", "--database-url", url).returncode == 0
    assert "revoked" in run_cli("keys", "list", "--database-url", url).stdout
    assert run_cli("keys", "revoke", "alice", "--database-url", url).returncode != 0


def test_settings_replace_keeps_validation() -> None:
    """Settings built by replace() are validated again (tests rely on it)."""
    with pytest.raises(ConfigError, match="port"):
        replace(Settings(), port=70000)


def test_spelling_variants_of_one_key_do_not_evict_another() -> None:
    """Guards the auth cache: 10,000 spacing and case variants of an attacker's own key share
    one entry (or are refused), so the victim's cached entry stays; the cache is bounded, and
    past its limit the least recently used key goes, not the whole cache."""
    attacker, attacker_id, attacker_hash = new_key()
    victim, victim_id, victim_hash = new_key()
    ring = KeyRing(0, 0)
    ring.load(
        [ApiKey("attacker", attacker_id, attacker_hash), ApiKey("v", victim_id, victim_hash)], 0
    )
    victim_header = b"Bearer " + victim.encode()
    assert ring.authenticate(victim_header) is not None
    assert victim_header in ring.cache
    token = attacker.encode()
    for i in range(10_000):
        pad = b" " * (i % 50)
        variants = (b"Bearer " + pad + token + pad, b"bEaReR" + b"\t" * (i % 7 + 1) + token)
        ring.authenticate(variants[i % 2])
        ring.authenticate(bytes(c ^ 32 if i >> n & 1 and 65 <= c <= 122 else c for n, c in
                                enumerate(b"Bearer")) + b" " + token)  # fmt: skip
    assert victim_header in ring.cache
    assert len(ring.cache) <= 2


def test_the_cache_evicts_the_least_recently_used_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CACHE_LIMIT keys the least recently used entry goes, not the others."""
    from incrementer.auth import keyring

    monkeypatch.setattr(keyring, "CACHE_LIMIT", 4)
    monkeypatch.setattr(keyring, "CACHE_CROWDED", 2)
    made = [new_key() for _ in range(5)]
    ring = KeyRing(0, 0)
    ring.load([ApiKey(f"k{i}", key_id, h) for i, (_, key_id, h) in enumerate(made)], 0)
    headers = [b"Bearer " + key.encode() for key, _, _ in made]
    for header in headers[:4]:
        assert ring.authenticate(header) is not None
    assert ring.authenticate(headers[0]) is not None  # now the most recently used
    assert ring.authenticate(headers[4]) is not None  # evicts headers[1], the least recent
    assert set(ring.cache) == {headers[0], headers[2], headers[3], headers[4]}


async def test_one_bearer_form_is_accepted(tmp_path: Path, sqlite_url: str) -> None:
    """Guards the Authorization form: the scheme in any case, one space, the key; two spaces,
    a tab, a trailing space or anything after the key are refused 401."""
    key = await add_api_key(sqlite_url)
    settings = settings_for(tmp_path, sqlite_url, auth="required")
    body = {"key": unique("form-"), "value": 1}
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            for _ in range(2):
                answer = await client.post(
                    "/increment", json=body, headers={"Authorization": f"{scheme} {key}"}
                )
                assert answer.status_code == 202, scheme
        for padded in (f"Bearer  {key}", f"Bearer\t{key}", f"Bearer {key}, x", f"Bearer {key} x"):
            for _ in range(2):
                answer = await client.post(
                    "/increment", json=body, headers={"Authorization": padded}
                )
                assert answer.status_code == 401, padded
        for trailing in (b" ", b"\t", b"  "):  # kept by the parser; httpx will not send them
            request = increment_request(unique("form-"), 1).replace(
                b"Host: t\r\n",
                b"Host: t\r\nAuthorization: Bearer %s%s\r\n" % (key.encode(), trailing),
            )
            assert (await exchange(svc.url, request, 1))[0].status == 401, trailing


async def test_two_authorization_headers_get_400(tmp_path: Path, sqlite_url: str) -> None:
    """Guards the HTTP layer: a request with two Authorization fields (any spelling) is refused
    400 duplicate_authorization, whichever of them is valid (an empty first one too), and
    nothing is counted."""
    key = await add_api_key(sqlite_url)
    settings = settings_for(tmp_path, sqlite_url, auth="required")
    counter = unique("twice-")
    async with run_service(settings) as svc:
        for first, second in (
            (b"Authorization: Bearer " + key.encode(), b"Authorization: Bearer ik_x.y"),
            (b"Authorization: Bearer " + key.encode(), b"authorization: Bearer ik_x.y"),
            (b"Authorization: Bearer ik_x.y", b"Authorization: Bearer " + key.encode()),
            (b"Authorization:", b"Authorization: Bearer " + key.encode()),
            (b"authorization: ", b"AUTHORIZATION: Bearer " + key.encode()),
        ):
            request = increment_request(counter, 1).replace(
                b"Host: t\r\n", b"Host: t\r\n%s\r\n%s\r\n" % (first, second)
            )
            answers = await exchange(svc.url, request, 1)
            assert answers[0].status == 400
            assert json.loads(answers[0].body)["error"] == "duplicate_authorization"
        assert svc.metrics.accepted_requests == 0
