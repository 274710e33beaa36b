"""The servers under load: each started as a child process on a free port, always stopped after.

nginx runs from a generated nginx.conf, incrementer as `python -m incrementer serve`, the
comparison servers as `python -m bench.servers.lean` and `python -m bench.servers.naive` (from the
repository root, where the bench package is). Every target runs in its own process group, so
stopping it also stops whatever it spawned (nginx's worker). A target that does not come up in
time, or exits early, raises TargetError with the tail of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bench.harness import rawhttp
from bench.harness.machine import which
from bench.harness.paths import ROOT

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
KEY_RATE = 10_000_000  # requests/s and burst of the auth variant's API key: never refuses


def nginx_conf(tmp: str | Path, http: str, workers: int = 1) -> str:
    """An nginx.conf keeping everything (pid, logs, temp files) under tmp, with `http` (already
    indented) inside its http block."""
    return f"""\
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{http}}}
"""


def nginx_argv(workdir: str | Path, conf: str | Path) -> list[str]:
    """nginx in the foreground, its prefix and error log in `workdir`."""
    return [
        which("nginx") or "nginx",
        "-p",
        str(workdir),
        "-e",
        f"{workdir}/error.log",
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]


def flush_held(seconds: float, max_keys: int, lag_bound: float) -> tuple[str, ...]:
    """`incrementer serve` options that hold the flush off for `seconds`, and up to `max_keys`
    dirty keys (pending keys may reach twice that, the settings' rule)."""
    return (
        "--flush-interval", f"{seconds:g}", "--flush-interval-max", f"{seconds:g}",
        "--flush-max-keys", str(max_keys), "--max-pending-keys", str(2 * max_keys),
        # One load generator is one client: it may take the whole budget.
        "--max-pending-keys-per-client", str(2 * max_keys),
        "--lag-bound", f"{lag_bound:g}",
    )  # fmt: skip


# The ceiling: a constant 202. The services keep a connection open for any number of requests:
# so does the ceiling.
NGINX_CEILING = """\
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port}{reuseport};
        location / {{ return 202; }}
    }}
"""


class TargetError(Exception):
    """A target did not start or stop as it should; the message carries its log tail."""


@dataclass(frozen=True)
class Target:
    """One server to load: nginx, python-lean, incrementer in one durability mode, or naive."""

    name: str
    kind: str  # "nginx" | "lean" | "incrementer" | "naive"
    durability: str = ""
    auth: bool = False  # --auth required, with an API key created in the run's database
    flags: tuple[str, ...] = ()  # more `incrementer serve` options
    lagging: bool = False  # lags by design: left out of the lag plot, which it would flatten
    python: str = ""  # the interpreter whose incrementer is run; "" = this one (bench.budgets)
    workers: int = 1  # nginx worker_processes, or incrementer --workers

    @property
    def needs_database(self) -> bool:
        return self.kind in ("incrementer", "naive")

    @property
    def accepted_metric(self) -> str | None:
        """Counter of acknowledged increments in the target's /metrics, sampled every second."""
        return {
            "incrementer": "incrementer_accepted_increments_total",
            "naive": "naive_accepted_increments_total",
        }.get(self.kind)


NGINX = Target("nginx", "nginx")
LEAN = Target("python-lean", "lean")
INCREMENTER_MODES = [
    Target(f"incrementer-{mode}", "incrementer", mode) for mode in ("memory", "wal", "wal-fsync")
]
INCREMENTER_WAL = next(t for t in INCREMENTER_MODES if t.durability == "wal")
# The guard rails on. The key's rate limit is set so high that it never refuses, but
# every request still pays the Bearer lookup and a token-bucket take.
INCREMENTER_AUTH = Target("incrementer-wal-auth", "incrementer", "wal", auth=True)
# incrementer-wal with no flush during the 10 s load (the one flush comes after it): the service's
# own cost without PostgreSQL's upserts competing for the two cores. Its lag is ~9 s by design.
INCREMENTER_DEFERRED = Target(
    "incrementer-wal-deferred",
    "incrementer",
    "wal",
    flags=flush_held(9, max_keys=1_000_000, lag_bound=30),
    lagging=True,
)
NAIVE = Target("naive", "naive")
# Counting per time bucket (--buckets minute,hour,day) beside incrementer-wal: what it costs.
INCREMENTER_BUCKETS = Target(
    "incrementer-wal-buckets", "incrementer", "wal", flags=("--buckets", "minute,hour,day")
)
# Scale-out on one host: two processes each, sharing the port with SO_REUSEPORT (nginx's
# `listen ... reuseport`; incrementer's workers each bind it, the supervisor only reserves it).
# On two cores shared with wrk and PostgreSQL they cannot show throughput scaling; they show what
# a second process costs per request.
NGINX_2W = Target("nginx-2w", "nginx", workers=2)
INCREMENTER_2W = Target("incrementer-wal-2w", "incrementer", "wal", workers=2)


@dataclass
class Running:
    target: Target
    proc: asyncio.subprocess.Process
    url: str
    log_path: Path
    api_key: str = ""  # for /metrics when the target runs with --auth required
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Launch:
    """How to start a target: its argv, the URL it will answer on, the directory it runs in."""

    argv: list[str]
    url: str
    cwd: Path


def command_for(target: Target, workdir: Path, database_url: str) -> Launch:
    """How to start `target` on a free port.

    The port is picked here rather than with --port 0 because the service announces its address
    at log level info, and the benchmark runs it at warning, as production would.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if target.kind == "nginx":
        reuseport = " reuseport" if target.workers > 1 else ""
        ceiling = NGINX_CEILING.format(port=port, reuseport=reuseport)
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(workdir, ceiling, target.workers))
        return Launch(nginx_argv(workdir, conf), url, workdir)
    if target.kind == "incrementer":
        argv = [
            target.python or sys.executable, "-m", "incrementer", "serve", "--port", str(port),
            "--database-url", database_url, "--data-dir", str(workdir / "data"),
            "--durability", target.durability, "--log-level", "warning",
            *(["--auth", "required"] if target.auth else []),
            *(["--workers", str(target.workers)] if target.workers > 1 else []),
            *target.flags,
        ]  # fmt: skip
        return Launch(argv, url, workdir)
    # The comparison servers are modules of this package: they run from the repository root.
    if target.kind == "lean":
        return Launch([sys.executable, "-m", "bench.servers.lean", "--port", str(port)], url, ROOT)
    if target.kind == "naive":
        argv = [
            sys.executable, "-m", "bench.servers.naive", "--port", str(port),
            "--database-url", database_url,
        ]  # fmt: skip
        return Launch(argv, url, ROOT)
    raise ValueError(f"unknown target kind {target.kind!r}")


@contextlib.asynccontextmanager
async def running(
    target: Target, workdir: Path, database_url: str = "", api_key: str = ""
) -> AsyncIterator[Running]:
    """Start `target`, wait until it answers, yield it; stop it (SIGTERM, then SIGKILL) after."""
    workdir.mkdir(parents=True, exist_ok=True)
    launch = command_for(target, workdir, database_url)
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *launch.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=launch.cwd,
        )
    server = Running(target, proc, launch.url, log_path, api_key)
    try:
        await _wait_ready(server)
        yield server
    finally:
        await stop(server)


async def create_api_key(database_url: str, timeout: float = 60.0) -> str:
    """Migrate the run's database and create an API key whose rate limit never refuses; return it.

    `incrementer keys create` prints the key alone on stdout.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "incrementer", "keys", "create", "bench", "--rate", str(KEY_RATE),
        "--burst", str(KEY_RATE), "--database-url", database_url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TargetError(
            f"incrementer keys create did not finish within {timeout:.0f} s"
        ) from None
    key = out.decode(errors="replace").strip()
    if proc.returncode != 0 or not key or len(key.split()) != 1:
        raise TargetError(
            f"incrementer keys create exited with {proc.returncode}:\n"
            f"{err.decode(errors='replace')[-2000:]}"
        )
    return key


async def _wait_ready(server: Running) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.returncode is not None:
            raise TargetError(
                f"{server.target.name} exited with {server.proc.returncode} before "
                f"listening:\n{server.log_tail()}"
            )
        if await rawhttp.accepts(server.url):
            return
        await asyncio.sleep(0.05)
    raise TargetError(
        f"{server.target.name} did not listen within {START_TIMEOUT:.0f} s:\n{server.log_tail()}"
    )


async def stop(server: Running, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM the process group (the service drains and flushes), SIGKILL it past `timeout`."""
    proc = server.proc
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise TargetError(
                f"{server.target.name} did not stop within {timeout:.0f} s of "
                f"SIGTERM; killed:\n{server.log_tail()}"
            ) from None
    server.exit_code = proc.returncode
    return proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
