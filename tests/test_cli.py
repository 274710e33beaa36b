"""The command line as an operator meets it: every failure is one line on stderr with exit 2
(usage) or 1 (run time) and no traceback; --config, INCREMENTER_* and -h on every command;
read-only commands create nothing; `wal inspect` tells applied from pending."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import click
import httpx
import pytest
from click.testing import CliRunner
from fleet import spawn_group
from support import free_port, run_cli, serve_args

from incrementer.cli import main as cli
from incrementer.ingest.wal import WriteAheadLog
from incrementer.store import open_store
from incrementer.store.migrate import migrate

USAGE, RUNTIME = 2, 1


def one_line_failure(proc: subprocess.CompletedProcess[str], status: int) -> str:
    """The failure's one line (asserting there is exactly one, and no traceback)."""
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("incrementer: ")
    return lines[0]


def test_unreachable_postgres_is_one_line(tmp_path: Path) -> None:
    """migrate and keys list against a PostgreSQL nobody answers on: one line naming the
    address (and never the password), exit 1."""
    url = f"postgresql://root:hunter2@127.0.0.1:{free_port()}/x"
    for command in (["migrate"], ["keys", "list"]):
        line = one_line_failure(run_cli(*command, "--database-url", url, cwd=tmp_path), RUNTIME)
        assert "127.0.0.1" in line and "hunter2" not in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["keys", "list", "--database-url", "mysql://x"], "unsupported database URL 'mysql://x'"),
        (
            ["serve", "--database-url", "postgresql://root@127.0.0.1:notaport/x"],
            "port must be a number",
        ),
        (["migrate", "--database-url", "postgresql://"], "names no host"),
        (["serve", "--database-url", "postgresql://"], "names no host"),
        (["keys", "create", "a", "--database-url", "postgresql://127.0.0.1:5432"], "no database"),
        (["keys", "create", "a", "--database-url", "postgres://127.0.0.1/"], "no database"),
        (["serve", "--prot", "3"], "No such option"),
        (["keys", "create"], "Missing argument"),
        (["keys", "create", "  "], "not blank"),
        (["keys", "create", "tab\there"], "control characters"),
        (["keys", "rotate", "a", "--grace", "-1"], "--grace"),
        (["serve", "--max-key-bytes", "0"], "max-key-bytes=0"),
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], says: str) -> None:
    """A bad flag, argument or database URL is refused before anything is tried (a bare
    postgresql:// no longer falls through to libpq's defaults): one line, exit 2."""
    assert says in one_line_failure(run_cli(*args, cwd=tmp_path), USAGE)
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing migrated


def test_runtime_failures_are_one_line_exit_1(tmp_path: Path) -> None:
    """A data dir that is not there, a key that does not exist, a corrupt config file path:
    one line, exit 1 (or 2 for the config), no traceback."""
    assert "no data dir at incrementer-data" in one_line_failure(
        run_cli("wal", "inspect", cwd=tmp_path), RUNTIME
    )
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert "no active API key named 'nobody'" in one_line_failure(
        run_cli("keys", "revoke", "nobody", "--database-url", url, cwd=tmp_path), RUNTIME
    )
    assert "no API key named 'nobody' to rotate" in one_line_failure(
        run_cli("keys", "rotate", "nobody", "--database-url", url, cwd=tmp_path), RUNTIME
    )
    missing = tmp_path / "nope.toml"
    assert "cannot read config file" in one_line_failure(
        run_cli("migrate", "--config", str(missing), cwd=tmp_path), USAGE
    )


def test_config_errors_name_their_source(tmp_path: Path) -> None:
    """A bad value names where it was set: the TOML file and key, the environment variable,
    the flag; a host that cannot be bound is named too."""
    config = tmp_path / "bad.toml"
    config.write_text('port = "abc"\n')
    line = one_line_failure(run_cli("serve", "--config", str(config), cwd=tmp_path), USAGE)
    assert f"in {config}, key port" in line and "'abc'" in line
    config.write_text("[incrementer]\nmax-key-bytes = 0\n")
    line = one_line_failure(run_cli("serve", "--config", str(config), cwd=tmp_path), USAGE)
    assert f"in {config}, key max-key-bytes" in line
    line = one_line_failure(run_cli("serve", cwd=tmp_path, env={"INCREMENTER_PORT": "abc"}), USAGE)
    assert "INCREMENTER_PORT" in line and "'abc'" in line
    line = one_line_failure(
        run_cli("serve", cwd=tmp_path, env={"INCREMENTER_PORT": "70000"}), USAGE
    )
    assert "port=70000 (from INCREMENTER_PORT)" in line
    line = one_line_failure(run_cli("serve", "--host", "no such host", cwd=tmp_path), USAGE)
    assert "host='no such host' (from --host)" in line
    # 192.0.2.1 (TEST-NET-1) is nobody's address: the bind fails after the start-up checks.
    proc = run_cli(
        "serve", "--host", "192.0.2.1", "--data-dir", "d", "--log-level", "error", cwd=tmp_path
    )
    assert "cannot listen on 192.0.2.1:3333: no interface" in one_line_failure(proc, RUNTIME)


def leaf_commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += leaf_commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


def test_every_command_documents_config_environment_and_h() -> None:
    """Each command, whoever adds it, answers -h and --help, and its help names --config and
    the INCREMENTER_* variable of every setting it reads."""
    commands = leaf_commands(cli.main)
    assert {("serve",), ("migrate",), ("wal", "inspect"), ("keys", "rotate")} <= set(commands)
    for path in commands:
        for flag in ("-h", "--help"):
            result = CliRunner().invoke(cli.main, [*path, flag], terminal_width=200)
            assert result.exit_code == 0, (path, result.output)
            assert "--config" in result.output, path
            assert "[env: INCREMENTER_CONFIG]" in result.output, path
            assert "environment variable shown with it" in result.output, path
    assert CliRunner().invoke(cli.main, ["-h"]).exit_code == 0


def test_client_commands_describe_the_server_they_talk_to() -> None:
    """`top -h` and `incr -h` describe --host and --port as where the server is, not what to
    bind, and every option that reads a variable names it (incr --api-key too)."""
    for command in (["top"], ["incr"]):
        result = CliRunner().invoke(cli.main, [*command, "-h"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "Address of the server to talk to" in result.output, command
        assert "Port of the server to talk to" in result.output, command
        assert "to bind" not in result.output and "picks a free one" not in result.output
        assert "[env: INCREMENTER_API_KEY]" in result.output, command
    serve = CliRunner().invoke(cli.main, ["serve", "-h"], terminal_width=200).output
    assert "Address to bind." in serve and "0 picks a free one" in serve


def test_config_file_and_environment_reach_every_subcommand(tmp_path: Path) -> None:
    """migrate, keys create/list/rotate/revoke and wal inspect take their settings from
    --config and from INCREMENTER_*, the variable winning over the file."""
    from_file, from_env = tmp_path / "from-file.db", tmp_path / "from-env.db"
    config = tmp_path / "incrementer.toml"
    config.write_text(
        f'database_url = "sqlite:///{from_file}"\ndata-dir = "{tmp_path / "file-data"}"\n'
    )
    with_file = ("--config", str(config))
    assert run_cli("migrate", *with_file, cwd=tmp_path).returncode == 0
    assert from_file.exists()
    assert run_cli("keys", "create", "filed", *with_file, cwd=tmp_path).returncode == 0
    assert run_cli("keys", "rotate", "filed", *with_file, cwd=tmp_path).returncode == 0
    listed = run_cli("keys", "list", "--json", *with_file, cwd=tmp_path)
    assert [k["name"] for k in json.loads(listed.stdout)] == ["filed", "filed"]
    assert run_cli("keys", "revoke", "filed", *with_file, cwd=tmp_path).returncode == 0
    line = one_line_failure(run_cli("wal", "inspect", *with_file, cwd=tmp_path), RUNTIME)
    assert "file-data" in line  # the data dir the file named

    env = {"INCREMENTER_CONFIG": str(config), "INCREMENTER_DATABASE_URL": f"sqlite:///{from_env}"}
    assert run_cli("keys", "create", "envied", cwd=tmp_path, env=env).returncode == 0
    listed = run_cli("keys", "list", "--json", cwd=tmp_path, env=env)
    assert [k["name"] for k in json.loads(listed.stdout)] == ["envied"]
    assert "filed" not in run_cli("keys", "list", cwd=tmp_path, env=env).stdout


def test_read_only_commands_create_nothing(tmp_path: Path) -> None:
    """keys list and wal inspect never create a database file, a data dir or a schema."""
    one_line_failure(run_cli("keys", "list", cwd=tmp_path), RUNTIME)
    elsewhere = tmp_path / "sub" / "k.db"
    line = one_line_failure(
        run_cli("keys", "list", "--database-url", f"sqlite:///{elsewhere}", cwd=tmp_path), RUNTIME
    )
    assert f"no SQLite database at {elsewhere}" in line
    one_line_failure(run_cli("wal", "inspect", "--data-dir", "d", cwd=tmp_path), RUNTIME)
    assert list(tmp_path.iterdir()) == []

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # a file, with no schema
    line = one_line_failure(
        run_cli("keys", "list", "--database-url", f"sqlite:///{empty}", cwd=tmp_path), RUNTIME
    )
    assert "incrementer migrate" in line
    with sqlite3.connect(empty) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


async def _data_dir_with_frames(data_dir: Path, frames: int) -> str:
    """A data dir as the service leaves it: a node id and a WAL of `frames` frames, 2
    increments each."""
    data_dir.mkdir()
    node_id = "inspect-node"
    (data_dir / "node_id").write_text(node_id + "\n")
    with WriteAheadLog.open(data_dir / "wal") as wal:
        for i in range(frames):
            wal.append(f"k{i}".encode(), 1)
            wal.append(b"shared", 2)
            wal.write()
    return node_id


async def test_wal_inspect_tells_applied_from_pending(tmp_path: Path, db_url: str) -> None:
    """With a database URL, wal inspect reads the node's applied seq from the ledger and counts
    the frames above it as pending; without one it calls nothing pending."""
    data_dir = tmp_path / "data"
    node_id = await _data_dir_with_frames(data_dir, 5)
    await asyncio.to_thread(migrate, db_url)
    store = open_store(db_url)
    await store.open()
    try:
        await store.apply_batch(node_id, 3, {})  # frames 1..3 applied, 4 and 5 not
    finally:
        await store.close()

    args = ("wal", "inspect", "--data-dir", str(data_dir))
    told = run_cli(*args, "--database-url", db_url, cwd=tmp_path)
    assert told.returncode == 0, told.stderr
    assert "applied up to seq 3 (node inspect-node)" in told.stdout
    assert "2 frames with 4 increments pending, 3 frames applied" in told.stdout
    as_json = json.loads(run_cli(*args, "--json", "--database-url", db_url, cwd=tmp_path).stdout)
    assert (as_json["applied_seq"], as_json["pending_frames"], as_json["pending_records"]) == (
        3,
        2,
        4,
    )
    assert as_json["node_id"] == node_id and as_json["frames"] == 5

    unknown = run_cli(*args, cwd=tmp_path)
    assert unknown.returncode == 0, unknown.stderr
    assert "5 frames, 10 increments" in unknown.stdout
    assert "pending" not in unknown.stdout
    assert "give --database-url" in unknown.stdout
    assert json.loads(run_cli(*args, "--json", cwd=tmp_path).stdout)["pending_frames"] is None


def test_wal_inspect_reads_every_worker_of_a_workers_data_dir(tmp_path: Path) -> None:
    """On the data dir of a `--workers 2` group (no WAL of its own), wal inspect reports each
    worker-N's WAL, applied and pending per node with a database URL, in text and JSON."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    data_dir = tmp_path / "data"
    group = spawn_group(serve_args(tmp_path, database_url), 2)
    try:
        for _ in range(20):  # new connections: the kernel spreads them over both workers
            assert httpx.post(f"{group.url}/increment", json={"key": "w", "value": 1}).is_success
    finally:
        group.stop_cleanly()
    assert not (data_dir / "wal").exists()
    args = ("wal", "inspect", "--data-dir", str(data_dir), "--database-url", database_url)
    told = run_cli(*args, cwd=tmp_path)
    assert told.returncode == 0, told.stderr
    assert told.stdout.startswith(f"{data_dir}: a --workers group's data dir; each worker's WAL:")
    for index in (0, 1):
        assert f"WAL in {data_dir / f'worker-{index}' / 'wal'}: " in told.stdout
    assert told.stdout.count("frames with 0 increments pending") == 2  # drained: all applied
    payload = json.loads(run_cli(*args, "--json", cwd=tmp_path).stdout)
    assert (payload["frames"], payload["node_id"]) == (0, None)
    workers = payload["workers"]
    assert [w["path"] for w in workers] == [str(data_dir / "worker-0"), str(data_dir / "worker-1")]
    assert sum(w["records"] for w in workers) == 20
    assert all(w["pending_records"] == 0 and w["node_id"] for w in workers)


def test_shell_completion_script_is_there(tmp_path: Path) -> None:
    """click's completion, as documented: the installed command prints a bash script."""
    command = Path(sys.executable).with_name("incrementer")
    proc = subprocess.run(
        [str(command)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "_INCREMENTER_COMPLETE": "bash_source"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "_INCREMENTER_COMPLETE" in proc.stdout and "complete " in proc.stdout
