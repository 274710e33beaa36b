"""Many processes at once: a `--workers` group, nginx in front with the deploy config, and a load
that records per key what was acknowledged and what may have counted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from support import (
    LoadResult,
    Response,
    Spawned,
    _ResponseCollector,
    free_port,
    host_port,
    send_window,
    skip_or_fail,
    spawn,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_CONF = ROOT / "deploy" / "nginx" / "incrementer.conf"
GROUP_READY = re.compile(r"listening on (http://\S+) with \d+ workers")
GROUP_PIDS = re.compile(r"with \d+ workers \(pids ([\d, ]+)\)")


# --- a --workers group ------------------------------------------------------------------------


def spawn_group(args: list[str], workers: int, **kwargs: object) -> Spawned:
    """`incrementer serve --workers N ARGS`, once the supervisor says every worker listens."""
    return spawn(["--workers", str(workers), *args], ready=GROUP_READY, **kwargs)  # type: ignore[arg-type]


def worker_pids(group: Spawned) -> list[int]:
    """The pids of the workers the supervisor started first, from its 'listening' line."""
    match = GROUP_PIDS.search(group.read_log())
    assert match, group.read_log()
    return [int(pid) for pid in match.group(1).split(", ")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) no longer serves.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# --- nginx in front, with deploy/nginx/incrementer.conf --------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        skip_or_fail("nginx is not installed (Debian: apt-get install -y nginx-light)")
    assert found is not None
    return found


def nginx_main_conf(prefix: Path, *includes: str, worker_connections: int = 1024) -> str:
    """An nginx.conf that keeps everything (pid, logs, temp files) under prefix and includes
    the named files from it in its http block: the shipped configs run as they are."""
    lines = "\n".join(f"    include {prefix}/{name};" for name in includes)
    return f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{lines}
}}
"""


UPSTREAM_SERVER = re.compile(r"^(\s*)server \d+\.\d+\.\d+\.\d+:\d+( [^;]*)?;\n", re.MULTILINE)


def deploy_config(upstreams: list[str], port: int) -> str:
    """deploy/nginx/incrementer.conf with its listen port and its server lines replaced;
    every other line as shipped."""
    text = DEPLOY_CONF.read_text()
    found = list(UPSTREAM_SERVER.finditer(text))
    assert found, "the deploy config lists no upstream server"
    indent, options = found[0].group(1), found[0].group(2) or ""
    servers = "".join(f"{indent}server {address}{options};\n" for address in upstreams)
    text = text[: found[0].start()] + servers + text[found[-1].end() :]
    text, listens = re.subn(
        r"^(\s*)listen \S+;", rf"\1listen 127.0.0.1:{port};", text, flags=re.MULTILINE
    )
    assert listens == 1
    return text


def write_nginx(prefix: Path, upstreams: list[str], port: int) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "incrementer.conf").write_text(deploy_config(upstreams, port))
    main = prefix / "nginx.conf"
    main.write_text(nginx_main_conf(prefix, "incrementer.conf"))
    return main


def nginx_test(main: Path) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on the config."""
    prefix = main.parent
    return subprocess.run(
        [nginx_binary(), "-t", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@contextlib.contextmanager
def nginx_running(main: Path, port: int) -> Iterator[None]:
    """A real nginx with the config `main` (its prefix main's folder; `nginx -t` must pass it),
    once it accepts connections on port; stopped on leaving."""
    checked = nginx_test(main)
    assert checked.returncode == 0, checked.stderr
    prefix = main.parent
    proc = subprocess.Popen(
        [nginx_binary(), "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(main),
         "-g", "daemon off;"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@contextlib.contextmanager
def nginx_in_front(prefix: Path, upstreams: list[str]) -> Iterator[str]:
    """A real nginx on a free port with the deploy config in front of `upstreams`; its URL."""
    port = free_port()
    with nginx_running(write_nginx(prefix, upstreams, port), port):
        yield f"http://127.0.0.1:{port}"


# --- a load that records what may have counted ------------------------------------------------


async def record_until(
    url: str,
    stop: asyncio.Event,
    keys: list[str],
    seen: LoadResult,
    connections: int = 8,
    pipeline: int = 8,
) -> None:
    """Send increments of 1..9 to random keys until `stop`, reconnecting when a connection dies.

    Per key into `seen`: `acked`, the values answered 202; `in_flight`, those whose outcome is
    unknown: never answered (the connection died), or answered 5xx, which behind a proxy may
    hide an increment an instance logged before it failed (a 502). A 4xx changed nothing.
    """
    await asyncio.gather(
        *(
            _connection(url, stop, keys, seen, pipeline, random.Random(i))
            for i in range(connections)
        )
    )


async def _connection(
    url: str,
    stop: asyncio.Event,
    keys: list[str],
    seen: LoadResult,
    pipeline: int,
    rng: random.Random,
) -> None:
    host, port = host_port(url)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        collector = _ResponseCollector()
        try:
            while not stop.is_set():
                window = [(rng.choice(keys), rng.randint(1, 9)) for _ in range(pipeline)]
                answers, complete = await send_window(reader, writer, collector, window, 30)
                for (key, value), resp in zip(window, answers, strict=complete):
                    seen.count(key, value, resp.status, unknown_5xx=True)
                if not complete:
                    seen.lost(window[len(answers) :])
                    break
                if any(resp.headers.get("connection") == "close" for resp in answers):
                    break
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# --- talking to one worker of a group ---------------------------------------------------------


class Conn:
    """One keep-alive connection: the worker the kernel gave it answers every request on it
    (GET /readyz says which)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.collector = _ResponseCollector()

    @classmethod
    async def open(cls, url: str) -> Conn:
        return cls(*await asyncio.open_connection(*host_port(url)))

    async def request(
        self, method: str, path: str, body: bytes = b"", timeout: float = 10
    ) -> Response:
        head = f"{method} {path} HTTP/1.1\r\nHost: t\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        wanted = len(self.collector.done) + 1
        async with asyncio.timeout(timeout):
            while len(self.collector.done) < wanted:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionResetError("closed before the answer")
                self.collector.parser.feed_data(chunk)
        return self.collector.done[-1]

    async def increment(self, key: str, value: int) -> int:
        body = json.dumps({"key": key, "value": value}).encode()
        return (await self.request("POST", "/increment", body)).status

    async def worker(self) -> int:
        return int(json.loads((await self.request("GET", "/readyz")).body)["worker"])

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def one_per_worker(url: str, workers: int, attempts: int = 300) -> dict[int, Conn]:
    """A connection to each worker: new connections until the kernel has spread them over all."""
    found: dict[int, Conn] = {}
    for _ in range(attempts):
        conn = await Conn.open(url)
        index = await conn.worker()
        if index in found:
            await conn.close()
        else:
            found[index] = conn
        if len(found) == workers:
            return found
    raise AssertionError(f"connections reached only workers {sorted(found)}")
