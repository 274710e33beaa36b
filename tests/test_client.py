"""The Python client (clients/python) against the real server: counts coalesce, every increment
counts exactly once through dropped answers, 429s and refusals, memory stays bounded, the caller
never waits on the network; the async client on the caller's loop; `incrementer incr`."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chaos_proxy import chaos_proxy
from incrementer_client import AsyncClient, Client, Full, Refused, _batching
from incrementer_client._batching import INT64_MAX, Backoff, Pending, retry_after
from support import (
    RekeyingTransport,
    Spawned,
    add_api_key,
    db_totals,
    run_cli,
    run_service,
    settings_for,
    sqlite_server,
    unique,
)


def totals(database_url: str, keys: list[str]) -> dict[str, int]:
    return asyncio.run(db_totals(database_url, keys))


def eventually(read: Callable[[], Any], expected: Any, timeout: float = 15) -> Any:
    """read() once it equals expected (the server flushes within its interval), else its last
    value, for the assertion to show."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Spawned, str]]:
    """One server for the tests that need nothing special of it (each uses its own keys)."""
    with sqlite_server(tmp_path_factory.mktemp("client")) as found:
        yield found


def requests_to_increments(url: str) -> int:
    text = httpx.get(url + "/metrics").text
    prefix = 'incrementer_http_requests_total{route="increments",status="202"} '
    return sum(
        int(float(row[len(prefix) :])) for row in text.splitlines() if row.startswith(prefix)
    )


# --- the sync client ----------------------------------------------------------------------------


def test_increments_coalesce_into_few_requests_and_count_exactly(
    shared: tuple[Spawned, str],
) -> None:
    """40,000 incr() calls from four threads on five keys: a handful of requests, exact totals."""
    srv, database_url = shared
    keys = [unique() for _ in range(5)]
    before = requests_to_increments(srv.url)
    with Client(srv.url) as client:

        def work(offset: int) -> None:
            for i in range(10_000):
                client.incr(keys[(i + offset) % 5], 1 + i % 3)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        client.flush()
        stats = client.stats
    expected = {key: 0 for key in keys}
    for offset in range(4):
        for i in range(10_000):
            expected[keys[(i + offset) % 5]] += 1 + i % 3
    assert eventually(lambda: totals(database_url, keys), expected) == expected
    assert stats.acknowledged == 40_000 and stats.pending == 0 and stats.dropped == 0
    assert requests_to_increments(srv.url) - before < 200  # not one request per call


def test_retries_through_dropped_answers_count_exactly_once(shared: tuple[Spawned, str]) -> None:
    """Half the answers never arrive (the connection is reset after the server got the batch):
    the client retries under the same key, and every increment counts exactly once."""
    srv, database_url = shared
    keys = [unique() for _ in range(50)]
    with chaos_proxy([srv.url], seed=1) as proxy:
        proxy.drop_after = 0.5
        with Client(proxy.url, max_batch=10, flush_interval=0.01) as client:
            for round_number in range(5):
                for key in keys:
                    client.incr(key, round_number + 1)
                client.flush()
            stats = client.stats
    expected = {key: 15 for key in keys}
    assert proxy.dropped_after > 0
    assert stats.replayed > 0 and stats.retries >= proxy.dropped_after
    assert eventually(lambda: totals(database_url, keys), expected) == expected


def test_the_harness_catches_retries_under_new_keys(shared: tuple[Spawned, str]) -> None:
    """The same run with a client that changes the key on every attempt double counts: what the
    test above checks would fail without idempotent retries."""
    srv, database_url = shared
    keys = [unique() for _ in range(50)]
    with chaos_proxy([srv.url], seed=1) as proxy:
        proxy.drop_after = 0.5
        with Client(
            proxy.url, max_batch=2, flush_interval=0.01, transport=RekeyingTransport()
        ) as client:
            for key in keys:
                client.incr(key, 1)
            client.flush()
    time.sleep(0.5)
    found = totals(database_url, keys)
    assert sum(found.values()) > len(keys)


@pytest.mark.parametrize("honoured", [True, False])
def test_a_spent_rate_limit_holds_the_next_batch_and_a_429_is_retried(
    tmp_path: Path, honoured: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against --rate-limit 2 --rate-burst 1, each 202 says the quota is spent (RateLimit r=0,
    t=1): the client holds its next batch that long, so none is refused. With the RateLimit
    field ignored, the next batches get 429 with Retry-After, wait it out and are sent again.
    Either way everything counts once."""
    if not honoured:
        monkeypatch.setattr(_batching, "rate_limit_wait", lambda value: None)
    keys = [unique() for _ in range(6)]
    with sqlite_server(tmp_path, "--rate-limit", "2", "--rate-burst", "1") as (srv, database_url):
        with Client(srv.url, max_batch=2) as client:
            for key in keys:
                client.incr(key, 3)
            client.flush(timeout=60)
            stats = client.stats
        expected = {key: 3 for key in keys}
        assert eventually(lambda: totals(database_url, keys), expected) == expected
    assert stats.dropped == 0 and stats.batches == 3
    assert (stats.retries == 0) if honoured else (stats.retries >= 1)


def test_the_rate_limit_field_is_read_as_the_draft_says() -> None:
    """A RateLimit item with nothing left (r=0) and a wait (t) holds the client that long; one
    with quota left, without t, or malformed (ignored, as the draft asks) does not."""
    assert _batching.rate_limit_wait('"per-key";r=0;t=3') == 3.0
    assert _batching.rate_limit_wait('"a";r=5, "b";r=0;t=7') == 7.0
    assert _batching.rate_limit_wait('"per-key";r=2;t=1') is None
    assert _batching.rate_limit_wait('"per-key";r=0') is None
    assert _batching.rate_limit_wait("r=0;t=3") is None
    assert _batching.rate_limit_wait('"per-key";r=0;t=100000') == 300.0


def test_backoff_honours_retry_after_and_grows_with_jitter() -> None:
    """A pause is at least Retry-After; otherwise it doubles per attempt up to the maximum,
    drawn between half and all of it."""
    backoff = Backoff(initial=0.1, maximum=2.0)
    assert backoff.delay(1, asked=7.0) == 7.0
    pauses = [backoff.delay(attempt) for attempt in (1, 2, 3, 10) for _ in range(50)]
    first, second, third, late = (pauses[i * 50 : (i + 1) * 50] for i in range(4))
    assert all(0.1 <= p <= 0.2 for p in first) and all(0.2 <= p <= 0.4 for p in second)
    assert all(0.4 <= p <= 0.8 for p in third) and all(1.0 <= p <= 2.0 for p in late)
    assert len(set(first)) > 1  # jittered
    assert retry_after("3") == 3.0 and retry_after("junk") is None and retry_after(None) is None
    assert retry_after("100000") == 300.0


def test_a_refused_item_is_dropped_and_the_rest_of_its_batch_counts(
    shared: tuple[Spawned, str],
) -> None:
    """A key the server refuses (over its --max-key-bytes) in a batch of 40: the batch is halved
    until that item is alone; it is dropped and reported, the other 39 count."""
    srv, database_url = shared
    good = [unique() for _ in range(39)]
    bad = "k" * 300
    with Client(srv.url, max_batch=100, max_key_bytes=1000) as client:
        for key in good[:20]:
            client.incr(key)
        client.incr(bad)
        for key in good[20:]:
            client.incr(key)
        with pytest.raises(Refused, match="key_too_long"):
            client.flush()
        stats = client.stats
    expected = {key: 1 for key in good}
    assert eventually(lambda: totals(database_url, good), expected) == expected
    assert stats.dropped == 1 and stats.acknowledged == 39


def test_batches_over_the_server_limits_are_split(tmp_path: Path) -> None:
    """A server with smaller batch limits than the client's: the batches are halved and count."""
    keys = [unique() for _ in range(100)]
    with sqlite_server(tmp_path, "--max-batch-items", "7") as (srv, database_url):
        with Client(srv.url, max_batch=100) as client:
            for key in keys:
                client.incr(key, 2)
            client.flush()
            assert client.stats.dropped == 0
        expected = {key: 2 for key in keys}
        assert eventually(lambda: totals(database_url, keys), expected) == expected


def test_a_full_client_raises_or_blocks_until_there_is_room(shared: tuple[Spawned, str]) -> None:
    """With the server unreachable, a new key past max_pending raises Full (or, when_full="block",
    waits); keys already pending still count; once the server is back everything is sent."""
    srv, database_url = shared
    keys = [unique() for _ in range(4)]
    late = unique()
    with chaos_proxy([srv.url]) as proxy:
        proxy.refusing = True
        with Client(proxy.url, max_pending=4, flush_interval=0.01) as raising:
            for key in keys:
                raising.incr(key)
            with pytest.raises(Full):
                raising.incr(unique())
            raising.incr(keys[0], 5)  # pending already: costs no memory
            blocking = Client(proxy.url, max_pending=4, when_full="block", flush_interval=0.01)
            for key in keys:
                blocking.incr(key)
            waiter = threading.Thread(target=blocking.incr, args=(late, 7))
            waiter.start()
            waiter.join(0.5)
            assert waiter.is_alive()  # blocked: no room
            proxy.refusing = False
            waiter.join(30)
            assert not waiter.is_alive()
            blocking.close()
    expected = {keys[0]: 7, **{key: 2 for key in keys[1:]}, late: 7}
    assert eventually(lambda: totals(database_url, [*keys, late]), expected) == expected


def test_incr_never_waits_on_the_network() -> None:
    """A server that accepts connections and never answers: incr() still returns at once (the
    sending thread is the one stuck), and close(timeout) gives up at its deadline, without
    waiting out the read timeout of the request in flight, and says how many."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepted by the kernel, never answered
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        client = Client(url, flush_interval=0.01, timeout=3600)
        for i in range(100_000):
            client.incr(f"k{i % 100}")
        assert client.stats.pending == 100_000
        closing = threading.Thread(target=client.close, args=(0.5,))
        closing.start()
        closing.join(60)  # an hour's read timeout would hold it far past this
        assert not closing.is_alive()
        assert client.stats.dropped == 100_000 and client.stats.pending == 0
        assert client.stats.acknowledged == 0
        with pytest.raises(RuntimeError):
            client.incr("k0")
    finally:
        silent.close()


async def test_aclose_gives_up_on_a_request_in_flight_at_its_deadline() -> None:
    """The async client against a server that never answers: aclose(timeout) cancels the
    request in flight at the deadline instead of waiting out its read timeout, and counts what
    it gave up."""
    silent = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        client = AsyncClient(url, flush_interval=0.01, timeout=3600)
        for i in range(1_000):
            await client.incr(f"k{i % 10}")
        await asyncio.sleep(0.1)  # the batch is sent and its answer awaited
        await asyncio.wait_for(client.aclose(0.5), 60)  # not the hour of the read timeout
        assert client.stats.dropped == 1_000 and client.stats.pending == 0
    finally:
        silent.close()


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("", 1, ValueError),
        ("tab\tkey", 1, ValueError),
        ("k" * 257, 1, ValueError),
        (7, 1, TypeError),
        ("k", 1.5, TypeError),
        ("k", True, TypeError),
        ("k", 0, ValueError),
        ("k", -3, ValueError),
        ("k", 2**63, ValueError),
    ],
)
def test_bad_arguments_are_refused_at_once(key: Any, value: Any, error: type[Exception]) -> None:
    """What the server would refuse is refused by incr() itself, and nothing is held."""
    pending = Pending(100, 10, 10_000, 256, allow_negative=False)
    with pytest.raises(error):
        pending.add(key, value)
    assert len(pending) == 0 and pending.calls == 0


def test_sums_past_64_bits_are_sent_as_separate_items() -> None:
    """A key's local sum never leaves signed 64-bit: the part that would is cut as an item of
    its own (the server then isolates the overflow exactly)."""
    pending = Pending(100, 10, 10_000, 256, allow_negative=False)
    pending.add("k", INT64_MAX)
    pending.add("k", 5)
    (batch,) = pending.cut()
    assert sorted(batch.items) == [("k", 5), ("k", INT64_MAX)]


def test_an_api_key_is_sent_and_a_wrong_one_refused(tmp_path: Path) -> None:
    """With keys required, the client's api_key authenticates; a wrong one is refused (401),
    dropped, and flush says so."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    secret = "ik_c0ffee0000aa.client-test-key"
    asyncio.run(add_api_key(database_url, "client", key=secret))
    key = unique()
    with sqlite_server(tmp_path, "--auth", "required") as (srv, _):
        with Client(srv.url, api_key=secret) as client:
            client.incr(key, 4)
            client.flush()
        with Client(srv.url, api_key="ik_c0ffee0000aa.wrong") as client:
            client.incr(key, 100)
            with pytest.raises(Refused, match="401"):
                client.flush()
        assert eventually(lambda: totals(database_url, [key]), {key: 4}) == {key: 4}


def test_an_unclosed_client_is_flushed_at_exit(shared: tuple[Spawned, str]) -> None:
    """A process that never closes its client (a web app's worker) still sends its last counts
    when it exits normally."""
    srv, database_url = shared
    key = unique()
    script = (
        "from incrementer_client import Client\n"
        f"client = Client({srv.url!r}, flush_interval=60)\n"
        f"client.incr({key!r}, 6)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert eventually(lambda: totals(database_url, [key]), {key: 6}) == {key: 6}


# --- the async client ---------------------------------------------------------------------------


async def test_async_client_counts_exactly_on_the_callers_loop(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Many tasks on one loop (the server's too) incr through one AsyncClient: few requests,
    exact totals; a full client raises Full; closed, it refuses more."""
    keys = [unique() for _ in range(7)]
    async with run_service(settings_for(tmp_path, sqlite_url)) as service:
        async with AsyncClient(service.url, max_pending=7) as client:

            async def work(seed: int) -> None:
                for i in range(2_000):
                    await client.incr(keys[(i + seed) % 7])
                    if i % 100 == 0:
                        await asyncio.sleep(0)

            await asyncio.gather(*(work(n) for n in range(10)))
            with pytest.raises(Full):
                await client.incr(unique())
            await client.flush()
            stats = client.stats
        with pytest.raises(RuntimeError, match="closed"):
            await client.incr(keys[0])
        assert service.flusher is not None
        await asyncio.sleep(0.2)
    expected = dict.fromkeys(keys, 0)
    for seed in range(10):
        for i in range(2_000):
            expected[keys[(i + seed) % 7]] += 1
    assert await db_totals(sqlite_url, keys) == expected
    assert stats.acknowledged == 20_000 and stats.batches < 200


async def test_async_client_retries_through_dropped_answers(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The async client, too, retries blindly under the same key: exact totals, replays seen."""
    keys = [unique() for _ in range(30)]
    async with run_service(settings_for(tmp_path, sqlite_url)) as service:
        with chaos_proxy([service.url], seed=3) as proxy:
            proxy.drop_after = 0.5
            # 30 batches, half their answers lost: some are certainly retried.
            async with AsyncClient(proxy.url, max_batch=1, flush_interval=0.01) as client:
                for key in keys:
                    await client.incr(key, 2)
                await client.flush()
                stats = client.stats
        await asyncio.sleep(0.3)
    assert stats.replayed > 0
    assert await db_totals(sqlite_url, keys) == {key: 2 for key in keys}


async def test_a_full_async_client_waits_for_room_when_told_to(
    sqlite_url: str, tmp_path: Path
) -> None:
    """when_full="block": await incr() of a new key past max_pending waits, without holding up
    the loop, until the unreachable server is back and a batch is acknowledged."""
    keys = [unique() for _ in range(3)]
    async with run_service(settings_for(tmp_path, sqlite_url)) as service:
        with chaos_proxy([service.url]) as proxy:
            proxy.refusing = True
            async with AsyncClient(
                proxy.url, max_pending=2, when_full="block", flush_interval=0.01
            ) as client:
                await client.incr(keys[0])
                await client.incr(keys[1])
                waiting = asyncio.ensure_future(client.incr(keys[2], 5))
                await asyncio.sleep(0.3)
                assert not waiting.done()  # no room while nothing is acknowledged
                proxy.refusing = False
                await asyncio.wait_for(waiting, 30)
        await asyncio.sleep(0.3)
    assert await db_totals(sqlite_url, keys) == {keys[0]: 1, keys[1]: 1, keys[2]: 5}


# --- incrementer incr ---------------------------------------------------------------------------


def test_incr_command_counts_once_and_says_why_it_failed(shared: tuple[Spawned, str]) -> None:
    """`incrementer incr KEY VALUE --url URL`: exit 0 and counted; a refused value, a bad key
    and an unreachable server each exit non-zero with a one-line error."""
    srv, database_url = shared
    key = unique()
    ok = run_cli("incr", key, "5", "--url", srv.url)
    refused = run_cli("incr", key, "0", "--url", srv.url)
    bad_key = run_cli("incr", "", "--url", srv.url)
    unreachable = run_cli("incr", key, "--url", "http://127.0.0.1:1", "--timeout", "0.5")
    assert ok.returncode == 0, ok.stderr
    assert refused.returncode == 1 and "invalid_value" in refused.stderr
    assert bad_key.returncode == 2 and "must not be empty" in bad_key.stderr
    assert unreachable.returncode == 1
    assert "ConnectError" in unreachable.stderr and len(unreachable.stderr.splitlines()) == 1
    assert len(refused.stderr.splitlines()) == 1
    assert eventually(lambda: totals(database_url, [key]), {key: 5}) == {key: 5}


# --- the benchmark ------------------------------------------------------------------------------


def test_client_benchmark_runs_and_verifies_totals(tmp_path: Path, pg_admin_url: str) -> None:
    """python -m bench.client runs wrk and the client process against a real server and checks that the
    database holds every incr() call; no rate is asserted (a benchmark is not a test)."""
    import shutil

    from support import skip_or_fail

    if shutil.which("wrk") is None:
        skip_or_fail("wrk missing; install with: apt-get install -y wrk")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "bench.client", "--duration", "1", "--results-dir", str(tmp_path)],
        cwd=root,
        env={**os.environ, "BENCH_PG_ADMIN_URL": pg_admin_url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    (report,) = tmp_path.glob("client-*.md")
    rows = [line for line in report.read_text().splitlines() if line.startswith("| 10")]
    assert len(rows) == 2, report.read_text()  # 10 and 100,000 keys, each with a verdict
