"""`serve --workers N`: the supervisor, its workers, and what a group shows as one server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
from importlib import resources
from pathlib import Path

import httpx
import pytest
from fleet import alive, one_per_worker, spawn_group, worker_pids
from support import (
    LoadResult,
    Spawned,
    db_totals,
    load,
    merge,
    run_cli,
    serve_args,
    spawn,
    unique,
    violations,
    wait_until,
)
from test_config import resolved

from incrementer.config import usable_cpus


def group_args(tmp_path: Path, db_url: str, *more: str) -> list[str]:
    return serve_args(tmp_path, db_url, "--log-level", "info", *more)


# configuration


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0", "must be at least 1"),
        ("-3", "must be at least 1"),
        ("many", "expected a whole number or auto"),
        ("2.5", "expected a whole number or auto"),
        ("100000", "far above the"),
    ],
)
def test_bad_workers_values_are_refused_naming_the_option(
    tmp_path: Path, value: str, why: str
) -> None:
    """--workers 0, negative, not a number, or far above the CPUs: one line naming the flag,
    exit 2, nothing started."""
    proc = run_cli("serve", "--workers", value, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line
    shown = re.escape(value)
    assert re.match(rf"incrementer: invalid workers='?{shown}'? \(from --workers\): ", proc.stderr)
    assert why in proc.stderr
    assert not (tmp_path / "incrementer-data").exists()


def test_workers_from_flag_env_file_and_auto(tmp_path: Path) -> None:
    """--workers, INCREMENTER_WORKERS and the `workers` key all set it; auto is the CPUs this
    process may use."""

    def workers(args: list[str], env: dict[str, str]) -> int:
        with pytest.MonkeyPatch.context() as patch:
            return resolved(args, env, patch).workers

    assert workers(["--workers", "2"], {}) == 2
    assert workers([], {"INCREMENTER_WORKERS": "auto"}) == usable_cpus()
    config = tmp_path / "incrementer.toml"
    config.write_text('workers = "auto"\n')
    assert workers(["--config", str(config)], {}) == usable_cpus()
    config.write_text("workers = 3\n")
    assert workers(["--config", str(config)], {}) == 3
    assert workers([], {}) == 1


# the supervisor


async def test_sigint_drains_every_worker_and_exits_0(tmp_path: Path, db_url: str) -> None:
    """SIGINT to the supervisor under load (durability memory, so only the final flushes can
    save the increments): every worker drains and flushes, the group exits 0, and the database
    holds every acknowledged increment."""
    keys = [unique(f"drain-{i}-") for i in range(100)]
    args = group_args(tmp_path, db_url, "--durability", "memory", "--flush-interval", "5")
    group = await asyncio.to_thread(spawn_group, args, 3)
    try:
        items = [(random.choice(keys), 1) for _ in range(60_000)]
        task = asyncio.create_task(
            load(group.url, items, connections=24, pipeline=16, stop_on_error=False)
        )
        await wait_until(lambda: _accepted(group.url, 3000), timeout=30)
        group.proc.send_signal(signal.SIGINT)
        seen = await task
        code = await asyncio.to_thread(group.proc.wait, 30)
    finally:
        group.stop(signal.SIGKILL)
    log = group.read_log()
    assert code == 0, log[-3000:]
    assert log.count("stopped after draining") == 3, log[-3000:]
    assert "stopped 3 workers" in log
    assert violations(seen.acked, seen.in_flight, await db_totals(db_url, keys)) == []


async def _accepted(url: str, at_least: int) -> bool:
    async with httpx.AsyncClient(base_url=url) as client:
        for line in (await client.get("/metrics")).text.splitlines():
            if line.startswith("incrementer_accepted_increments_total "):
                return float(line.split()[1]) >= at_least
    return False


def test_a_group_refuses_a_port_something_listens_on(tmp_path: Path, sqlite_url: str) -> None:
    """The supervisor binds the port alone before its workers share it: a port already in use
    (even by SO_REUSEPORT listeners of the same user, a stray group) stops the start: one line,
    exit 1 (a failure at run time)."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(
            "serve", "--workers", "2", "--port", str(port), *group_args(tmp_path, sqlite_url)
        )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"incrementer: cannot start: cannot listen on 127.0.0.1:{port}")
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "data" / "worker-0").exists()


@pytest.mark.parametrize("ending", ["second signal", "deadline"])
async def test_a_worker_that_does_not_drain_is_killed(
    tmp_path: Path, sqlite_url: str, ending: str
) -> None:
    """A worker that cannot drain (frozen with SIGSTOP) does not hold the group forever: a
    second SIGTERM kills the workers at once, and without one they are killed past their own
    shutdown deadline; the supervisor exits 1 either way."""
    args = group_args(tmp_path, sqlite_url, "--shutdown-timeout", "1")
    group = await asyncio.to_thread(spawn_group, args, 2)
    frozen = worker_pids(group)[1]
    try:
        os.kill(frozen, signal.SIGSTOP)
        group.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "draining 2 workers" in group.read_log())
        if ending == "second signal":
            group.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(group.proc.wait, 30)
    finally:
        group.stop(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)
    log = group.read_log()
    assert code == 1, log[-2000:]
    expected = (
        "received SIGTERM again" if ending == "second signal" else "past the shutdown deadline"
    )
    assert expected in log, log[-2000:]
    await wait_until(lambda: not alive(frozen))


async def test_a_killed_supervisor_takes_its_workers_with_it(
    tmp_path: Path, sqlite_url: str
) -> None:
    """SIGKILL of the supervisor: its workers get SIGTERM from the kernel, drain (their
    increments reach the database) and exit; none keeps serving the port."""
    key = unique("orphan-")
    group = await asyncio.to_thread(spawn_group, group_args(tmp_path, sqlite_url), 2)
    pids = worker_pids(group)
    conns = await one_per_worker(group.url, 2)
    for conn in conns.values():
        assert await conn.increment(key, 5) == 202
        await conn.close()
    group.stop(signal.SIGKILL)
    await wait_until(lambda: not any(alive(pid) for pid in pids), timeout=30)
    assert await db_totals(sqlite_url, [key]) == {key: 10}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(group.url.rsplit(":", 1)[1])), 2)


async def test_a_worker_that_keeps_dying_is_restarted_with_a_growing_delay(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A worker killed again and again soon after each start is restarted each time, the later
    restarts after a delay, and the log says so; the other worker serves throughout."""
    group = await asyncio.to_thread(spawn_group, group_args(tmp_path, sqlite_url), 2)
    try:
        victim = worker_pids(group)[0]
        for round_ in range(1, 4):
            os.kill(victim, signal.SIGKILL)
            victim = await _new_worker_pid(group, 0, round_)
        log = group.read_log()
        assert "restarting it in 0.5 s (it keeps dying)" in log
        assert "restarting it in 1 s (it keeps dying)" in log
        async with httpx.AsyncClient(base_url=group.url) as client:
            assert (await client.get("/healthz")).status_code == 200
    finally:
        assert group.stop(signal.SIGTERM) == 0


async def _new_worker_pid(group: Spawned, index: int, restarts: int) -> int:
    """The pid of worker `index` once it serves again after its `restarts`-th restart."""
    pattern = re.compile(rf"worker {index} serving again \(pid (\d+)\)")
    await wait_until(lambda: len(pattern.findall(group.read_log())) >= restarts)
    return int(pattern.findall(group.read_log())[restarts - 1])


# one server, seen from outside


async def test_metrics_describe_the_whole_group(tmp_path: Path, sqlite_url: str) -> None:
    """One scrape, from any worker: counters summed over the workers, open connections per
    worker, the supervisor's worker count."""
    group = await asyncio.to_thread(spawn_group, group_args(tmp_path, sqlite_url), 2)
    try:
        conns = await one_per_worker(group.url, 2)
        for index, count in ((0, 7), (1, 4)):
            for _ in range(count):
                assert await conns[index].increment(unique("m-"), 1) == 202

        async def scraped() -> dict[str, float]:
            text = (await conns[0].request("GET", "/metrics")).body.decode()
            return {
                series: float(value)
                for line in text.splitlines()
                if line and not line.startswith("#")
                for series, value in [line.rsplit(" ", 1)]
            }

        await wait_until(
            lambda: _has(scraped(), "incrementer_accepted_increments_total", 11), timeout=10
        )
        samples = await scraped()
        assert samples['incrementer_http_requests_total{route="increment",status="202"}'] == 11
        assert samples['incrementer_open_connections{worker="0"}'] >= 1
        assert samples['incrementer_open_connections{worker="1"}'] >= 1
        assert samples["incrementer_workers"] == 2
        assert samples["incrementer_worker_restarts_total"] == 0
        for conn in conns.values():
            await conn.close()
    finally:
        group.stop_cleanly()


async def _has(samples: object, series: str, value: float) -> bool:
    return (await samples).get(series) == value  # type: ignore[attr-defined,no-any-return]


READINESS = json.loads(resources.files("incrementer.api").joinpath("openapi.json").read_bytes())[
    "components"
]["schemas"]["Readiness"]


def _conforms(body: dict[str, object]) -> None:
    """The fields and reason codes the OpenAPI document's Readiness allows, and all it needs."""
    assert set(READINESS["required"]) <= body.keys() <= READINESS["properties"].keys()
    item = READINESS["properties"]["reasons"]["items"]
    reasons = body["reasons"]
    assert isinstance(reasons, list)
    for reason in reasons:
        assert set(item["required"]) <= reason.keys() <= item["properties"].keys()
        assert reason["code"] in item["properties"]["code"]["enum"]


async def test_readyz_answers_for_the_whole_group(tmp_path: Path, sqlite_url: str) -> None:
    """/readyz gives the same verdict from every worker: a worker that stops publishing (here
    frozen with SIGSTOP) makes every other one answer 503 worker_unresponsive, naming it;
    once it runs again, 200 from all. Every answer is the OpenAPI document's Readiness."""
    group = await asyncio.to_thread(spawn_group, group_args(tmp_path, sqlite_url), 3)
    frozen = worker_pids(group)[2]
    try:
        conns = await one_per_worker(group.url, 3)
        for conn in conns.values():
            assert (await conn.request("GET", "/readyz")).status == 200
        os.kill(frozen, signal.SIGSTOP)

        async def verdict(index: int) -> tuple[int, dict[str, object]]:
            resp = await conns[index].request("GET", "/readyz")
            body = json.loads(resp.body)
            _conforms(body)
            return resp.status, body

        await wait_until(lambda: _status_is(verdict(0), 503), timeout=15)
        for index in (0, 1):
            status, body = await verdict(index)
            assert status == 503
            assert body["worker"] == index
            reasons = body["reasons"]
            assert isinstance(reasons, list)
            assert {"worker_unresponsive"} == {r["code"] for r in reasons}
            assert {2} == {r["worker"] for r in reasons}
        os.kill(frozen, signal.SIGCONT)
        await wait_until(lambda: _status_is(verdict(0), 200), timeout=15)
        assert (await verdict(1))[0] == 200
        assert (await verdict(2))[0] == 200
        for conn in conns.values():
            await conn.close()
    finally:
        os.kill(frozen, signal.SIGCONT)
        group.stop_cleanly()


async def _status_is(answer: object, status: int) -> bool:
    return (await answer)[0] == status  # type: ignore[index,misc,no-any-return]


async def test_a_read_adds_only_the_answering_workers_unflushed_delta(
    tmp_path: Path, sqlite_url: str
) -> None:
    """GET /counters/{key} is the database value plus the answering worker's pending delta,
    and the answer names that worker: another worker's increments show once they are flushed
    (within the flush interval)."""
    args = group_args(tmp_path, sqlite_url, "--flush-interval", "5", "--flush-interval-max", "5")
    group = await asyncio.to_thread(spawn_group, args, 2)
    try:
        conns = await one_per_worker(group.url, 2)
        assert await conns[0].increment("read", 1) == 202
        assert await conns[1].increment("read", 2) == 202

        async def value(index: int) -> int:
            answer = json.loads((await conns[index].request("GET", "/counters/read")).body)
            assert answer["worker"] == index
            return int(answer["value"])

        assert await value(0) == 1
        assert await value(1) == 2
        # Each worker flushes on its own clock: the first to show 3 may still count its own
        # delta unflushed, which the other worker sees only after that worker's flush.
        for index in (0, 1):
            await wait_until(lambda index=index: _equals(value(index), 3), timeout=15)
        assert [await value(0), await value(1)] == [3, 3]
        for conn in conns.values():
            await conn.close()
    finally:
        group.stop_cleanly()


async def _equals(got: object, want: int) -> bool:
    return await got == want  # type: ignore[misc,no-any-return]


# shrinking and growing


async def test_growing_and_shrinking_strand_nothing(tmp_path: Path, db_url: str) -> None:
    """A lone process, then 3 workers, then 2, then a lone process again on one data dir, each
    killed with SIGKILL while everything it acknowledged is still only in its WALs: each start
    drains the dirs it will not serve from (the lone process's, worker-2, then worker-0 and
    worker-1), so the database ends with exactly every acknowledged increment."""
    keys = [unique(f"shrink-{i}-") for i in range(100)]
    # No flush while a phase runs: what a phase accepts is in its WALs when it is killed.
    args = group_args(tmp_path, db_url, "--flush-interval", "9", "--flush-interval-max", "9",
                      "--lag-bound", "30")  # fmt: skip
    seen = LoadResult()

    async def phase(url: str) -> None:
        items = [(random.choice(keys), random.randint(1, 9)) for _ in range(3000)]
        merge(seen, await load(url, items, connections=16, pipeline=16))

    lone = await asyncio.to_thread(spawn, args)
    await phase(lone.url)
    lone.stop(signal.SIGKILL)
    logs = []
    for workers in (3, 2):
        group = await asyncio.to_thread(spawn_group, args, workers)
        await phase(group.url)
        group.proc.send_signal(signal.SIGSTOP)  # no restarts while its workers are killed
        for pid in worker_pids(group):
            os.kill(pid, signal.SIGKILL)
        group.stop(signal.SIGKILL)
        logs.append(group.read_log())
    lone = await asyncio.to_thread(spawn, args)
    await phase(lone.url)
    assert lone.stop(signal.SIGTERM) == 0
    data = tmp_path / "data"

    def drained(log: str, path: Path) -> bool:
        return (
            re.search(rf"retired {re.escape(str(path))} \(node \w+\): applied \d+", log) is not None
        )

    assert drained(logs[0], data)
    assert drained(logs[1], data / "worker-2")
    assert drained(lone.read_log(), data / "worker-0")
    assert drained(lone.read_log(), data / "worker-1")
    assert all((data / f"worker-{i}" / "RETIRED").exists() for i in range(3))
    assert not (data / "RETIRED").exists()  # the lone process serves from it again
    assert await db_totals(db_url, keys) == seen.acked
