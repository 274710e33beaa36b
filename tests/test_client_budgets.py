"""Budgets per client (an API key's name, or the client IP with keys off): each client's share of
the pending new keys (--max-pending-keys-per-client), and a batch charged to the rate limit per
increment. Flushes are held back by a write lock on the real SQLite database, so what is pending
stays pending, as it does while a database is slow or down."""

from __future__ import annotations

from pathlib import Path

import httpx
from support import (
    add_api_key,
    db_totals,
    run_service,
    serve_args,
    settings_for,
    spawned,
    totals_are,
    unique,
    wait_until,
    writes_blocked,
)

# --max-pending-keys 40 gives each client 10 new keys between two cuts (a quarter); a cut comes
# at 20 dirty keys (--flush-max-keys) and never by time.
HELD = {"max_pending_keys": 40, "flush_max_keys": 20, "flush_interval": 600, "lag_bound": 3600}


def batch(keys: list[str]) -> list[dict[str, object]]:
    return [{"key": key, "value": 1} for key in keys]


async def test_one_key_spending_its_share_leaves_room_for_the_others(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Guards the shared --max-pending-keys: key A sending batch after batch of new keys is
    refused past its share (503 overloaded), B's new key is still taken, and a key already
    pending is still taken from A; everything taken lands once the database is back."""
    greedy = await add_api_key(sqlite_url, "greedy")
    other = await add_api_key(sqlite_url, "other")
    prefix = unique()
    settings = settings_for(tmp_path, sqlite_url, auth="required", **HELD)
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        taken: list[str] = []
        with writes_blocked(sqlite_url):
            statuses = []
            for round_ in range(6):
                keys = [f"{prefix}-a{round_}-{i}" for i in range(10)]
                resp = await client.post(
                    "/increments", json=batch(keys), headers={"Authorization": f"Bearer {greedy}"}
                )
                statuses.append(resp.status_code)
                if resp.status_code == 202:
                    taken += keys
                else:
                    assert resp.json()["error"] == "overloaded"
                    assert resp.headers["retry-after"] == "1"
            for i in range(3):
                resp = await client.post(
                    "/increment",
                    json={"key": f"{prefix}-b{i}", "value": 1},
                    headers={"Authorization": f"Bearer {other}"},
                )
                assert resp.status_code == 202, resp.text
            assert statuses == [202] + [503] * 5, statuses
            single = await client.post(
                "/increment",
                json={"key": f"{prefix}-a-single", "value": 1},
                headers={"Authorization": f"Bearer {greedy}"},
            )
            assert single.status_code == 503  # the fast path sheds it too
            again = await client.post(
                "/increment",
                json={"key": taken[0], "value": 1},
                headers={"Authorization": f"Bearer {greedy}"},
            )
            assert again.status_code == 202, again.text
    # The service flushed everything on its way out.
    expected = dict.fromkeys(taken, 1) | {f"{prefix}-b{i}": 1 for i in range(3)}
    expected[taken[0]] = 2
    assert await db_totals(sqlite_url, list(expected)) == expected


async def test_a_batch_costs_its_rate_limit_one_token_per_increment(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Guards a 10,000-item batch costing the rate limit what one increment does: with a burst
    of 100, a 60-item batch leaves 40, a second one puts the bucket in debt (still let in: it
    held a token), and the next request waits for the debt to be refilled (429). The same
    charge holds for a batch with an Idempotency-Key, taken after a database lookup."""
    settings = settings_for(tmp_path, sqlite_url, auth="off", rate_limit=1, rate_burst=100)
    prefix = unique()
    async with run_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        first = await client.post("/increments", json=batch([f"{prefix}-{i}" for i in range(60)]))
        assert first.status_code == 202
        assert first.headers["ratelimit-policy"] == '"per-ip";q=100;w=100'
        assert first.headers["ratelimit"] in ('"per-ip";r=40;t=1', '"per-ip";r=41;t=1')
        keyed = await client.post(
            "/increments",
            json=batch([f"{prefix}-k{i}" for i in range(30)]),
            headers={"Idempotency-Key": unique("order-")},
        )
        assert keyed.status_code == 202, keyed.text
        assert keyed.headers["ratelimit"].split(";")[1] in ("r=10", "r=11", "r=12")
        second = await client.post("/increments", json=batch([f"{prefix}-{i}" for i in range(60)]))
        assert second.status_code == 202
        assert second.headers["ratelimit"].startswith('"per-ip";r=0;t=')
        wait = int(second.headers["ratelimit"].rpartition("t=")[2])
        assert 45 <= wait <= 52, second.headers["ratelimit"]  # about 50 tokens owed, at 1/s
        refused = await client.post("/increment", json={"key": f"{prefix}-0", "value": 1})
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 45
        expected = {f"{prefix}-{i}": 2 for i in range(60)}
        expected |= {f"{prefix}-k{i}": 1 for i in range(30)}
        await wait_until(lambda: totals_are(sqlite_url, expected), timeout=20)


def _from(address: str) -> httpx.AsyncClient:
    """A client whose connections come from `address` (any of 127.0.0.0/8 reaches loopback)."""
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(local_address=address),
        headers={"Connection": "close"},  # a new connection each: the kernel spreads them
    )


async def test_each_worker_keeps_a_share_per_client_address(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Guards the share in a `--workers 2` group with keys off (the client is its address):
    127.0.0.1 sending batches of new keys on new connections is refused past its share in each
    worker, and 127.0.0.2's new keys are taken by whichever worker answers."""
    prefix = unique()
    args = serve_args(tmp_path, sqlite_url, workers="2", auth="off", **{
        name: str(value) for name, value in HELD.items()
    })  # fmt: skip
    with spawned(args) as server:
        url = server.url
        taken: list[str] = []
        async with _from("127.0.0.1") as greedy, _from("127.0.0.2") as other:
            with writes_blocked(sqlite_url):
                statuses = []
                for round_ in range(16):
                    keys = [f"{prefix}-a{round_}-{i}" for i in range(10)]
                    resp = await greedy.post(f"{url}/increments", json=batch(keys))
                    statuses.append(resp.status_code)
                    if resp.status_code == 202:
                        taken += keys
                for i in range(8):
                    resp = await other.post(
                        f"{url}/increment", json={"key": f"{prefix}-b{i}", "value": 1}
                    )
                    assert resp.status_code == 202, resp.text
                accepted = statuses.count(202)
                assert 1 <= accepted <= 2, statuses  # one batch per worker, at most
                assert statuses.count(503) == 16 - accepted
        server.stop_cleanly()  # the workers flush everything on their way out
    expected = dict.fromkeys(taken, 1) | {f"{prefix}-b{i}": 1 for i in range(8)}
    assert await db_totals(sqlite_url, list(expected)) == expected
