"""Files the service writes are its owner's alone, whatever the umask it is started with: 0600 for
every file (the SQLite file holds the API keys' hashes; the WAL holds every increment not yet
flushed), 0700 for every directory it creates."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleet import spawn_group
from support import run_cli, serve_args, spawned, unique, wait_until

UMASKS = [0o022, 0o000]


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """This process's umask for the block: the processes it starts inherit it."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Every file and directory under root (root included), by path relative to it: its mode."""
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


def not_private(found: dict[str, str], root: Path) -> dict[str, str]:
    """Those of `found` that are not 0700 (a directory) or 0600 (anything else)."""
    wrong = {}
    for name, mode in found.items():
        wanted = "0o700" if (root / name).is_dir() else "0o600"
        if mode != wanted:
            wrong[name] = mode
    return wrong


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_a_served_data_dir_and_database_are_owner_only(tmp_path: Path, mask: int) -> None:
    """Guards item: file modes. A server started under umask 022 or 000 creates its data dir,
    WAL directory and segments, lock file, node id and its SQLite file with -wal and -shm
    readable by its owner only (today they come out 0644 or 0666, and 0755 or 0777)."""
    database = tmp_path / "db" / "counters.db"
    database.parent.mkdir()
    url = f"sqlite:///{database}"
    with umask(mask), spawned(serve_args(tmp_path, url, "--flush-interval", "0.05")) as server:
        response = httpx.post(f"{server.url}/increment", json={"key": unique(), "value": 1})
        assert response.status_code == 202
        data = tmp_path / "data"
        wanted = {"LOCK", "node_id", "wal", "DATABASE"}
        assert wanted <= set(modes(data)), modes(data)
        assert any(name.startswith("wal/") for name in modes(data)), modes(data)
        assert not_private(modes(data), data) == {}
        db_files = modes(database.parent)
        assert {"counters.db", "counters.db-wal", "counters.db-shm"} <= set(db_files), db_files
        assert not_private(db_files, database.parent) == {".": db_files["."]}  # not ours
        server.stop_cleanly()


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_a_database_made_by_a_command_is_owner_only(tmp_path: Path, mask: int) -> None:
    """Guards item: file modes. `incrementer keys create` on a new SQLite file (a command,
    not the server) makes the file that holds the key's hash 0600, as does `migrate`."""
    for command in (["migrate"], ["keys", "create", "alice"]):
        database = tmp_path / f"{command[0]}.db"
        url = f"sqlite:///{database}"
        with umask(mask):
            done = run_cli(*command, "--database-url", url)
        assert done.returncode == 0, done.stderr
        assert oct(stat.S_IMODE(database.stat().st_mode)) == "0o600", command


async def test_a_workers_run_dir_is_owner_only(tmp_path: Path) -> None:
    """Guards item: file modes. A `--workers 2` group under umask 000: its run dir (the
    workers' metrics files and readiness) and every worker's data dir are owner only."""
    url = f"sqlite:///{tmp_path / 'counters.db'}"
    with umask(0o000):
        group = spawn_group(serve_args(tmp_path, url), 2)
    try:
        data = tmp_path / "data"
        await wait_until(lambda: any((data / "run" / "metrics").glob("*.db")))
        await wait_until(lambda: any((data / "run" / "ready").glob("*.json")))
        assert not_private(modes(data), data) == {}
    finally:
        group.stop_cleanly()
