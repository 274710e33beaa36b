"""What a start says when the port, the data dir or the SQLite path is wrong: one line, the same
with and without --workers, saying what to do, and nothing created on the way."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from support import db_totals, run_cli, spawned, unique

RUNTIME = 1


def failure_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line of a run-time failure (exit 1, no traceback)."""
    assert proc.returncode == RUNTIME, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("incrementer: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_port_in_use_reads_the_same_with_and_without_workers(tmp_path: Path) -> None:
    """A port something listens on stops `serve` and `serve --workers 2` with the same
    sentence, which says what to do about it."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lines = [
            failure_line(
                run_cli(
                    *("serve", "--port", str(port), "--database-url", database_url),
                    *("--data-dir", f"data-{workers}", "--workers", workers),
                    cwd=tmp_path,
                )
            )
            for workers in ("1", "2")
        ]
    said = (
        f"incrementer: cannot start: cannot listen on 127.0.0.1:{port}: address already in use: "
        "another process listens on that port (an incrementer still running?); stop it, or "
        "choose another --port"
    )
    assert lines == [said, said]


@pytest.mark.parametrize(
    "command",
    [["serve"], ["serve", "--workers", "2"], ["wal", "inspect"], ["wal", "drain"]],
)
def test_a_data_dir_that_is_a_file_is_not_a_directory(tmp_path: Path, command: list[str]) -> None:
    """--data-dir naming a regular file (the database file, say) is refused as "not a
    directory" by every command that takes one, and the file is left alone."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    (tmp_path / "afile").write_text("mine\n")
    proc = run_cli(
        *command, "--data-dir", "afile", "--database-url", database_url, cwd=tmp_path
    )  # fmt: skip
    assert "data dir afile is not a directory" in failure_line(proc)
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.parametrize(
    "command", [["serve", "--data-dir", "data"], ["migrate"], ["keys", "create", "k"]]
)
def test_an_sqlite_file_in_a_missing_directory_is_refused(
    tmp_path: Path, command: list[str]
) -> None:
    """`sqlite:///nonexistent/dir/x.db` is refused, naming the directory, rather than creating
    it: a mistyped path must not quietly start an empty database. Nothing is created."""
    proc = run_cli(*command, "--database-url", "sqlite:///nonexistent/dir/x.db", cwd=tmp_path)
    said = "SQLite database nonexistent/dir/x.db: its directory nonexistent/dir does not exist"
    assert said in failure_line(proc)
    assert not (tmp_path / "nonexistent").exists()


def test_a_data_dir_is_refused_by_a_database_it_did_not_write_for(
    tmp_path: Path, pg_url: str
) -> None:
    """The README's SQLite quickstart, then PostgreSQL in the same directory: the data dir's WAL
    still holds the frames SQLite applied, and the new database has applied none of them, so
    `serve` and `wal drain` refuse rather than count them again; the same PostgreSQL database
    reached under another host name is the same database, and starts."""
    sqlite = f"sqlite:///{tmp_path / 'counters.db'}"
    key = unique()
    with spawned(["--database-url", sqlite, "--data-dir", "data"], cwd=tmp_path) as first:
        assert (
            httpx.post(f"{first.url}/increment", json={"key": key, "value": 2}).status_code == 202
        )
        first.stop_cleanly()
    for command in (["serve"], ["wal", "drain"]):
        proc = run_cli(*command, "--database-url", pg_url, "--data-dir", "data", cwd=tmp_path)
        line = failure_line(proc)
        assert "data dir data belongs to another database (sqlite:///" in line, line
        assert "Give this database its own --data-dir" in line
    assert asyncio.run(db_totals(pg_url, [key])) == {}

    own = ["--data-dir", "pg-data", "--database-url", pg_url]
    with spawned(own, cwd=tmp_path) as on_postgres:
        assert httpx.post(f"{on_postgres.url}/increment", json={"key": key, "value": 5}).is_success
        on_postgres.stop_cleanly()
    renamed = pg_url.replace("@127.0.0.1:", "@localhost:")
    assert renamed != pg_url
    with spawned(["--data-dir", "pg-data", "--database-url", renamed], cwd=tmp_path) as again:
        again.stop_cleanly()
    assert asyncio.run(db_totals(pg_url, [key])) == {key: 5}
