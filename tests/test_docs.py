"""The docs a new user follows hold: docs/testing.md lists every file under tests/, the
runbook's recipe without systemd runs as written, its command list names every command, no
variable is used before it is set, and a figure quoted next to a benchmark report is in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from support import free_port, skip_or_fail, unique

from incrementer.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
OPERATIONS = ROOT / "docs" / "operations.md"
RESULTS = ROOT / "bench" / "results"


def section(path: Path, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of its level or above (lines
    inside code blocks are not headings)."""
    lines = path.read_text().splitlines(keepends=True)
    level = len(heading.split(" ", 1)[0])
    start = lines.index(heading + "\n")
    fenced = False
    for end in range(start + 1, len(lines)):
        line = lines[end]
        fenced ^= line.startswith("```")
        marks = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < marks <= level and line[marks : marks + 1] == " ":
            return "".join(lines[start:end])
    return "".join(lines[start:])


def code_blocks(text: str, language: str = "sh") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def test_testing_md_lists_every_file_under_tests() -> None:
    """Each file under tests/ (its path from there, __init__.py aside) is named in the first
    column of docs/testing.md's table, and the table names no file that is gone."""
    table = section(ROOT / "docs" / "testing.md", "## How the suite is organised")
    named: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            named.update(re.findall(r"`([^`]+\.py)`", line.split("|")[1]))
    present = {
        str(path.relative_to(TESTS))
        for path in TESTS.rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }
    assert sorted(present - named) == [], "add a row to docs/testing.md for each"
    assert sorted(named - present) == [], "docs/testing.md names files that are gone"


def test_the_command_list_names_every_command() -> None:
    """The runbook's command list has every command `incrementer -h` knows, subcommands too."""
    listed = code_blocks(section(OPERATIONS, "## The command line"))[0]
    for name, command in cli.main.commands.items():
        assert re.search(rf"\b{name}\b", listed), name
        for sub in getattr(command, "commands", {}):
            assert re.search(rf"\b{sub}\b", listed), f"{name} {sub}"
    assert CliRunner().invoke(cli.main, ["-h"]).exit_code == 0


def test_no_variable_is_used_before_it_is_set() -> None:
    """In the runbook's and the README's shell blocks, every $VARIABLE is set earlier in the
    same document (an `export NAME=` or `NAME=`), or by the environment file they source."""
    env_file = (ROOT / "deploy" / "systemd" / "incrementer.env").read_text()
    from_env_file = set(re.findall(r"^#?\s*([A-Z_]+)=", env_file, re.MULTILINE))
    for doc in (OPERATIONS, ROOT / "README.md"):
        set_so_far = set(from_env_file)
        for block in code_blocks(doc.read_text()):
            for line in block.splitlines():
                for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", line):
                    assert name in set_so_far, f"{doc.name}: ${name} is never set: {line}"
                set_so_far.update(re.findall(r"(?:^|\s|export )([A-Za-z_][A-Za-z0-9_]*)=", line))


# A figure with its unit, as the docs quote them: "9,481 requests/s", "1.54 µs".
FIGURE = re.compile(r"\b\d[\d,]*(?:\.\d+)?(?= ?(?:µs|requests/s|req/s)\b)")


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md"])
def test_figures_come_from_the_report_they_name(doc: str) -> None:
    """A paragraph that names one benchmark report (bench/results/<date>.md) quotes only
    figures that report holds, and every report the docs name exists: two places never give
    two numbers for one measurement."""
    paragraphs = (ROOT / doc).read_text().split("\n\n")
    citing = 0
    for paragraph in paragraphs:
        reports = set(re.findall(r"bench/results/([\w-]+\.md)", paragraph))
        for report in reports:
            assert (RESULTS / report).exists(), f"{doc} names {report}, which does not exist"
        if len(reports) != 1:
            continue
        citing += 1
        held = (RESULTS / reports.pop()).read_text()
        for figure in FIGURE.findall(" ".join(paragraph.split())):
            assert figure in held, f"{doc}: {figure} is not in the report it names"
    assert citing, f"{doc} quotes no dated report"


def test_every_report_named_in_performance_md_exists() -> None:
    """docs/performance.md's figures name their reports; each one is in bench/results."""
    text = (ROOT / "docs" / "performance.md").read_text()
    for report in set(re.findall(r"bench/results/([\w-]+\.md)", text)):
        assert (RESULTS / report).exists(), report


def test_the_recipe_without_systemd_runs_as_written(tmp_path: Path, pg_admin_url: str) -> None:
    """The runbook's "Without systemd" recipe, run in bash as written: a role and a database
    created, migrated, a key made, the service started, then the curl and incr steps count 2 on
    `home`. The test gives it a role, a database and a port of its own."""
    for tool in ("bash", "curl", "psql", "createdb"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed (Debian: curl, postgresql-client)")
    setup, serve, try_it = code_blocks(
        section(OPERATIONS, "### Without systemd: a first run on PostgreSQL")
    )
    role, database, port = unique("docrole_"), unique("docdb_"), free_port()
    renames = {
        "ROLE incrementer ": f"ROLE {role} ",
        "--owner incrementer counters": f"--owner {role} {database}",
        "postgresql://incrementer:change-me@127.0.0.1:5432/counters": (
            f"postgresql://{role}:change-me@127.0.0.1:5432/{database}"
        ),
    }
    for old, new in renames.items():
        assert old in setup, f"{old!r} is no longer in the recipe"
        setup = setup.replace(old, new)
    assert "localhost:3333" in try_it
    try_it = try_it.replace("localhost:3333", f"localhost:{port}")
    admin = re.match(r"postgresql://(?P<user>[^@/]+)@(?P<host>[^:/]+):(?P<port>\d+)", pg_admin_url)
    assert admin is not None
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PGHOST": admin["host"],
        "PGPORT": admin["port"],
        "PGUSER": admin["user"],
        "PGDATABASE": "postgres",
        "INCREMENTER_PORT": str(port),
    }
    script = f"""set -euo pipefail
{setup}
{serve.strip()} --log-level warning &
server=$!
trap 'kill $server; wait $server' EXIT
for _ in $(seq 100); do curl -sf localhost:{port}/healthz >/dev/null && break; sleep 0.1; done
{try_it}
"""
    try:
        done = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    finally:
        with psycopg.connect(pg_admin_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            db.execute(f'DROP ROLE IF EXISTS "{role}"')
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HTTP/1.1 202 Accepted" in done.stdout
    assert done.stdout.rstrip().endswith('{"key":"home","value":2}'), done.stdout
