"""The image, built from the Dockerfile with Debian's podman on a debootstrap base, runs as the
Dockerfile promises: non-root, read-only root file system, keys required, its WAL on the volume;
SIGTERM drains everything into PostgreSQL; kill -9 and a new container on the same volume replay
the WAL, and the totals are exact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from support import (
    add_api_key,
    db_totals,
    free_port,
    pg_database,
    skip_or_fail,
    totals_are,
    unique,
    violations,
    wait_until,
)

from bench.harness.containers import DATA, IMAGE, Podman, missing_tools


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    """podman with this machine's settings (bench/harness/containers.py says which and why)."""
    missing = missing_tools()
    if missing:
        skip_or_fail(
            f"{', '.join(missing)} not installed (Debian: apt-get install -y podman runc "
            "debootstrap)"
        )
    return Podman(tmp_path_factory.mktemp("podman") / "containers.conf")


@pytest.fixture(scope="session")
def image(podman: Podman) -> str:
    """The repository's Dockerfile built on the Debian 12 base (cached by podman between runs)."""
    podman.build(IMAGE)
    return IMAGE


@pytest.fixture
def database(pg_admin_url: str) -> Iterator[str]:
    """A PostgreSQL database of this test's own, dropped after it."""
    with pg_database(pg_admin_url, unique("incrementer_container_")) as url:
        yield url


@pytest.fixture
def volume(podman: Podman) -> Iterator[str]:
    """A named volume for the container's data dir, removed after the test."""
    name = unique("incrementer-data-")
    podman.run("volume", "create", name)
    try:
        yield name
    finally:
        podman.run("volume", "rm", "--force", name, check=False)


@contextlib.contextmanager
def container(
    podman: Podman, image: str, volume: str, env: dict[str, str]
) -> Iterator[tuple[str, str]]:
    """The image started (Podman.start) with `volume` and `env`: (name, URL) once /readyz
    answers 200. Removed on leaving."""
    name, port = unique("incrementer-test-"), free_port()
    settings = {"INCREMENTER_PORT": str(port), "INCREMENTER_LOG_LEVEL": "info", **env}
    podman.start(image, name, volume, settings)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(podman, name, url)
        yield name, url
    finally:
        podman.run("rm", "--force", "--time=0", name, check=False)


def wait_ready(podman: Podman, name: str, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        if inspect(podman, name)["State"]["Status"] != "running":
            break
        time.sleep(0.1)
    raise AssertionError(f"{name} did not become ready:\n{logs(podman, name)}")


def inspect(podman: Podman, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(podman.run("inspect", name).stdout)
    return found[0]


def logs(podman: Podman, name: str) -> str:
    done = podman.run("logs", name, check=False)
    return done.stdout + done.stderr


def send(url: str, key: str, items: list[tuple[str, int]]) -> dict[str, int]:
    """POST each increment with the API key over one keep-alive connection: the sums that were
    acknowledged (202), by key."""
    acked: dict[str, int] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        for name, value in items:
            response = client.post("/increment", json={"key": name, "value": value})
            assert response.status_code == 202, response.text
            acked[name] = acked.get(name, 0) + value
    return acked


def workload(prefix: str, count: int = 600) -> list[tuple[str, int]]:
    return [(f"{prefix}{i % 7}", i % 5 + 1) for i in range(count)]


def test_the_image_is_what_the_dockerfile_promises(podman: Podman, image: str) -> None:
    """Non-root (a numeric user), SIGTERM to stop, a HEALTHCHECK on /healthz, the data dir a
    volume, `incrementer serve` on 0.0.0.0 by default; the hot path compiled; no compiler, build
    tree or the machine's pip configuration left in the image."""
    found = inspect(podman, image)
    config = found["Config"]
    assert config["User"] == "10001:10001"
    assert config["StopSignal"] == "SIGTERM"
    assert "/healthz" in " ".join(found["Healthcheck"]["Test"])
    assert DATA in config["Volumes"]
    assert (config["Entrypoint"], config["Cmd"]) == (["incrementer"], ["serve"])
    assert "INCREMENTER_HOST=0.0.0.0" in config["Env"]
    assert f"INCREMENTER_DATA_DIR={DATA}/data" in config["Env"]
    probe = (
        "from incrementer import build; import shutil, os; print(build.compiled(), "
        "shutil.which('gcc'), shutil.which('pip'), "
        "[p for p in ('/etc/pip.conf', '/etc/xdg/pip', '/src', '/wheels') if os.path.exists(p)])"
    )
    seen = podman.run("run", "--rm", "--entrypoint=python3", image, "-c", probe).stdout
    assert seen.split() == ["True", "None", "None", "[]"], seen


def test_sigterm_drains_the_increments_into_postgresql(
    podman: Podman, image: str, database: str, volume: str
) -> None:
    """Keys are required on 0.0.0.0 by default (401 without one); with one, the container takes
    increments; the HEALTHCHECK passes; `podman stop` (SIGTERM) flushes every acknowledged
    increment into PostgreSQL over the host network and exits 0."""
    key = asyncio.run(add_api_key(database))
    prefix = unique("drain-")
    # Flushes every 9 s: what reaches the database is, in practice, the drain's final flush.
    slow = {"INCREMENTER_FLUSH_INTERVAL": "9", "INCREMENTER_FLUSH_INTERVAL_MAX": "9"}
    env = {"INCREMENTER_DATABASE_URL": database, **slow}
    with container(podman, image, volume, env) as (name, url):
        anonymous = httpx.post(f"{url}/increment", json={"key": prefix, "value": 1})
        assert anonymous.status_code == 401
        acked = send(url, key, workload(prefix))
        assert podman.run("healthcheck", "run", name, check=False).returncode == 0
        podman.run("stop", "--time=30", name, timeout=60)
        state = inspect(podman, name)["State"]
        assert state["ExitCode"] == 0, logs(podman, name)
        assert "received SIGTERM" in logs(podman, name)
    assert asyncio.run(db_totals(database, acked)) == acked


def test_kill_9_then_a_new_container_on_the_volume_replays_the_wal(
    podman: Podman, image: str, database: str, volume: str
) -> None:
    """Increments acknowledged while PostgreSQL cannot take the flush (the counters table locked)
    survive kill -9 in the WAL on the volume: a new container on it replays them and the totals
    are exact. A new container on an empty volume would lose them, and the check says so."""
    key = asyncio.run(add_api_key(database))
    prefix = unique("replay-")
    env = {"INCREMENTER_DATABASE_URL": database}
    with container(podman, image, volume, env) as (name, url):
        with counters_locked(database):
            acked = send(url, key, workload(prefix))
            podman.run("kill", "--signal=KILL", name)
            podman.run("wait", name, timeout=30)
        assert inspect(podman, name)["State"]["ExitCode"] == 137
    # The flush waited on the lock and its connection died with the process: nothing committed.
    assert asyncio.run(db_totals(database, acked)) == {}

    fresh = unique("incrementer-empty-")
    podman.run("volume", "create", fresh)
    try:
        with container(podman, image, fresh, env) as (name, _):
            podman.run("stop", "--time=30", name, timeout=60)
    finally:
        podman.run("volume", "rm", "--force", fresh, check=False)
    lost = violations(acked, {}, asyncio.run(db_totals(database, acked)))
    assert len(lost) == len(acked), "an empty data dir must not bring the increments back"

    with container(podman, image, volume, env) as (name, _):
        assert "replayed" in logs(podman, name), logs(podman, name)
        asyncio.run(wait_until(lambda: totals_are(database, acked), timeout=30))
        podman.run("stop", "--time=30", name, timeout=60)
        assert inspect(podman, name)["State"]["ExitCode"] == 0, logs(podman, name)
    assert asyncio.run(db_totals(database, acked)) == acked


@contextlib.contextmanager
def counters_locked(database: str) -> Iterator[None]:
    """The counters table locked against every write (and read) until leaving: a flush waits."""
    loop = asyncio.new_event_loop()
    conn: asyncpg.Connection = loop.run_until_complete(asyncpg.connect(database))
    try:
        loop.run_until_complete(conn.execute("BEGIN; LOCK TABLE counters IN ACCESS EXCLUSIVE MODE"))
        yield
        loop.run_until_complete(conn.execute("ROLLBACK"))
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
