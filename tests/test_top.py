"""`incrementer top`: a running server's figures in the terminal, read from its /metrics."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from live_server import keyed_server, load_while
from support import serve_args, spawned

from incrementer.cli.top import Scrape, figures

ENV = {**os.environ, "COLUMNS": "120", "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1"}


async def top(*args: str, api_key: str = "") -> subprocess.CompletedProcess[str]:
    env = {**ENV, "INCREMENTER_API_KEY": api_key} if api_key else ENV
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "incrementer", "top", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def shown(output: str, label: str) -> float:
    """The number on the row `label`, with its k/M/G suffix applied."""
    match = re.search(rf"^{re.escape(label)}\s+([\d.]+)([kMG]?)", output, re.MULTILINE)
    assert match is not None, output
    return float(match.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[match.group(2)]


async def test_top_once_shows_the_figures_of_a_server_under_load(tmp_path: Path) -> None:
    """With the key in INCREMENTER_API_KEY, `top --once` prints readiness and every figure, the
    rates positive while a load runs."""
    with keyed_server(tmp_path) as (server, key):
        stop = asyncio.Event()
        load = asyncio.create_task(load_while(server.url, key, stop))
        try:
            await asyncio.sleep(0.5)
            done = await top(server.url, "--once", api_key=key)
        finally:
            stop.set()
            await load
    assert done.returncode == 0, done.stderr
    assert f"incrementer at {server.url}  ready" in done.stdout
    assert shown(done.stdout, "requests/s") > 0
    assert shown(done.stdout, "increments accepted/s") > 0
    assert shown(done.stdout, "increments rejected/s") == 0
    assert shown(done.stdout, "accepted in all") > 0
    assert shown(done.stdout, "flushes/s") > 0
    assert shown(done.stdout, "keys per flush (mean)") >= 1
    for label in ("persistence lag", "pending keys", "flush duration (mean)", "WAL on disk",
                  "WAL fsync (mean)", "WAL failed writes", "open connections"):  # fmt: skip
        assert re.search(rf"^{re.escape(label)}\s+\S", done.stdout, re.MULTILINE), label


async def test_top_without_a_key_or_a_server_says_so_in_one_line(tmp_path: Path) -> None:
    """A server that wants a key, a wrong key, and nothing listening: exit 1 and one line on
    stderr saying what to do, never a traceback."""
    with keyed_server(tmp_path) as (server, _key):
        no_key = await top(server.url, "--once")
        wrong_key = await top(server.url, "--once", api_key="ik_000000000000.wrong")
    nothing = await top("http://127.0.0.1:1", "--once")
    for done in (no_key, wrong_key, nothing):
        assert done.returncode == 1
        assert done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("incrementer: top: "), done.stderr
    assert "401" in no_key.stderr and "--api-key" in no_key.stderr
    assert "401" in wrong_key.stderr
    assert "Connection refused" in nothing.stderr
    bad_interval = await top(server.url, "--interval", "0")
    assert bad_interval.returncode == 2
    assert "Traceback" not in bad_interval.stderr


async def test_top_finds_the_server_its_settings_describe(tmp_path: Path) -> None:
    """Without a URL, top reads the server's --host and --port where serve would: from
    INCREMENTER_PORT (as under the systemd environment file) or from a --config file."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    with spawned(serve_args(tmp_path, database_url)) as server:
        port = server.url.rsplit(":", 1)[1]
        config = tmp_path / "incrementer.toml"
        config.write_text(f'host = "0.0.0.0"\nport = {port}\n')
        env = {**ENV, "INCREMENTER_PORT": port}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "incrementer", "top", "--once", "--interval", "0.2",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        from_env, _ = await proc.communicate()
        from_file = await top("--once", "--interval", "0.2", "--config", str(config))
    assert f"incrementer at {server.url}  ready" in from_env.decode()
    assert f"incrementer at {server.url}  ready" in from_file.stdout, from_file.stderr


async def test_top_takes_host_port_as_its_url(tmp_path: Path) -> None:
    """`top 127.0.0.1:PORT` (no scheme), as `incr --url` takes it, reads that server."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    with spawned(serve_args(tmp_path, database_url)) as server:
        done = await top(server.url.removeprefix("http://"), "--once", "--interval", "0.2")
    assert done.returncode == 0, done.stderr
    assert f"incrementer at {server.url}  ready" in done.stdout


def test_top_keeps_redrawing_until_interrupted(tmp_path: Path) -> None:
    """Without --once, top redraws every interval, and Ctrl+C (SIGINT) ends it with status 0."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    with spawned(serve_args(tmp_path, database_url)) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "incrementer", "top", server.url, "--interval", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            # As a terminal's foreground job gets Ctrl+C: a test run started in the background
            # of a shell (`./scripts/test &`) has SIGINT ignored, and its children with it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "requests/s" in out


def test_a_restarted_server_counts_from_zero_not_below() -> None:
    """A counter lower than at the last reading (the server restarted) counts as all new, so a
    restart never shows a negative rate."""
    name = "incrementer_accepted_increments_total"
    before = Scrape(10.0, {name: [({}, 5000.0)]}, {})
    after = Scrape(12.0, {name: [({}, 300.0)]}, {})
    assert figures(before, after, {})["accepted_per_s"] == 150.0
    later = Scrape(14.0, {name: [({}, 700.0)]}, {})
    assert figures(after, later, {})["accepted_per_s"] == 200.0


def test_rates_are_over_the_servers_interval() -> None:
    """With incrementer_clock_seconds in both scrapes, a rate divides by the server's interval
    (4 s here), not by when this process happened to read them (1 s apart)."""
    name = "incrementer_accepted_increments_total"
    before = Scrape(10.0, {name: [({}, 0.0)], "incrementer_clock_seconds": [({}, 500.0)]}, {})
    after = Scrape(11.0, {name: [({}, 800.0)], "incrementer_clock_seconds": [({}, 504.0)]}, {})
    assert figures(before, after, {})["accepted_per_s"] == 200.0


def test_without_rich_top_says_how_to_install_it_from_a_checkout() -> None:
    """Where rich is missing, top says in one line how to get it from a checkout
    (`pip install '.[top]'`), which is where a new user stands (no package index has it)."""
    blocked = (
        "import sys; sys.modules['rich'] = None; from incrementer.cli.main import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked, "top", "--once"],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(
        "incrementer: top: needs rich, the top extra: pip install '.[top]'"
    )
    assert len(done.stderr.splitlines()) == 1, done.stderr
