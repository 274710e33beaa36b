"""Test helpers: unique names, the real service in-process or as a subprocess, raw HTTP clients,
loads that record what was acknowledged, and the database read and seeded beside the service."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httptools
import httpx
import pytest

from incrementer.auth.keyring import new_key
from incrementer.config import Settings
from incrementer.ingest.wal_reader import HEADER, MAGIC, SEQ
from incrementer.service import Service
from incrementer.store import open_store
from incrementer.store.base import ApiKey
from incrementer.store.migrate import migrate

LISTEN = re.compile(r"listening on (http://\S+)")
PG_ADMIN_URL = os.environ.get("INCREMENTER_TEST_PG", "postgresql://root@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI") == "true"


def unique(prefix: str = "") -> str:
    """`prefix` and 12 random hex digits: a name (a counter key, a database, an API key's name)
    no other test uses, so tests never collide in the session's PostgreSQL database."""
    return prefix + uuid.uuid4().hex[:12]


def skip_or_fail(reason: str) -> None:
    """What a test does without what it needs: skip, except under CI=true, where it fails."""
    if IN_CI:
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


# --- the service in-process, on this test's event loop --------------------------------------------


def settings_for(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    base = Settings(
        port=0,
        database_url=database_url,
        data_dir=tmp_path / "data",
        flush_interval=0.05,
        log_level="warning",
    )
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def run_service(settings: Settings) -> AsyncIterator[Service]:
    """The real service on a free port inside this test's event loop; drained on exit."""
    service = Service(settings)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host.strip("[]"), int(port)


# --- a subprocess server, for signals, kill -9 and restarts ---------------------------------------


def serve_args(tmp_path: Path, database_url: str, *more: str, **flags: str) -> list[str]:
    """`incrementer serve` arguments for a subprocess with its own data dir under tmp_path: then
    `more` as given, and each of `flags` as --name value."""
    args = ["--database-url", database_url, "--data-dir", str(tmp_path / "data"), *more]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


@dataclass
class Spawned:
    proc: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop_cleanly(self) -> None:
        """SIGTERM, and assert that it drained cleanly (exit status 0), showing the end of its
        log when it did not."""
        code = self.stop()
        assert code == 0, f"exit status {code}; the end of its log:\n{self.read_log()[-4000:]}"

    def read_log(self) -> str:
        if self.proc.poll() is not None:
            time.sleep(0.2)  # let the pump thread take the last lines
        return "".join(self.log)


def spawn(
    args: Iterable[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 30,
    ready: re.Pattern[str] = LISTEN,
) -> Spawned:
    """Start `incrementer serve ARGS` and wait for its 'listening on URL' line (or another
    line matching `ready`, whose first group is the URL)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "incrementer", "serve", "--port", "0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            proc.stderr.close()
            raise AssertionError(
                f"server exited ({proc.wait()}) before listening:\n" + "".join(lines)
            )
        lines.append(line)
        match = ready.search(line)
        if match:
            spawned = Spawned(proc, match.group(1), lines)
            _drain_in_background(spawned)
            return spawned
    proc.kill()
    proc.wait()
    proc.stderr.close()
    raise AssertionError("server did not start in time:\n" + "".join(lines))


def _drain_in_background(spawned: Spawned) -> None:
    import threading

    def pump() -> None:
        assert spawned.proc.stderr is not None
        with spawned.proc.stderr:
            for line in spawned.proc.stderr:
                spawned.log.append(line)

    threading.Thread(target=pump, daemon=True).start()


@contextlib.contextmanager
def spawned(args: Iterable[str], **kwargs: Any) -> Iterator[Spawned]:
    server = spawn(args, **kwargs)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@contextlib.contextmanager
def sqlite_server(tmp_path: Path, *flags: str) -> Iterator[tuple[Spawned, str]]:
    """`incrementer serve FLAGS` on an SQLite file in tmp_path, flushing every 0.05 s: the server
    and its database URL. On leaving, SIGTERM, and the drain must end with status 0."""
    database_url = f"sqlite:///{tmp_path / 'counters.db'}"
    with spawned(serve_args(tmp_path, database_url, "--flush-interval", "0.05", *flags)) as server:
        yield server, database_url
        server.stop_cleanly()


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """`incrementer ARGS` in a subprocess, run to its end: its status and output (as text). `env`
    adds to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "incrementer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# --- raw HTTP -------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _ResponseCollector:
    def __init__(self) -> None:
        self.done: list[Response] = []
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._headers, self._body = {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.done.append(
            Response(self.parser.get_status_code(), self._headers, b"".join(self._body))
        )


async def exchange(url: str, data: bytes, responses: int, timeout: float = 10) -> list[Response]:
    """Send raw bytes on one connection and read `responses` responses (or until close)."""
    host, port = host_port(url)
    reader, writer = await asyncio.open_connection(host, port)
    collector = _ResponseCollector()
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while len(collector.done) < responses:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                collector.parser.feed_data(chunk)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return collector.done


def increment_request(key: str, value: int, close: bool = False) -> bytes:
    body = b'{"key":%s,"value":%d}' % (_json_str(key), value)
    return (
        b"POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n" % (len(body), b"Connection: close\r\n" if close else b"")
    ) + body


def get_request(path: str, extra: bytes = b"") -> bytes:
    """GET path, with `extra` header lines (each ending in CRLF)."""
    return b"GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path.encode(), extra)


def _json_str(text: str) -> bytes:
    import msgspec

    return msgspec.json.encode(text)


def counter_path(key: str) -> str:
    return "/counters/" + quote(key, safe="")


class RekeyingTransport(httpx.HTTPTransport):
    """A broken client: every attempt under a fresh Idempotency-Key, as a retry without the
    header would be. A harness must catch the double counts this causes."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.headers["Idempotency-Key"] = unique("rekeyed-")
        return super().handle_request(request)


# --- load that records what was acknowledged ------------------------------------------------------


@dataclass
class LoadResult:
    acked: dict[str, int] = field(default_factory=dict)
    """Sum of values per key whose 202 the client received."""
    in_flight: dict[str, int] = field(default_factory=dict)
    """Sum of values per key sent without an answer (connection died)."""
    statuses: dict[int, int] = field(default_factory=dict)

    def count(self, key: str, value: int, status: int, *, unknown_5xx: bool = False) -> None:
        """One answered increment: its status, its value acknowledged if 202. With `unknown_5xx`,
        a 5xx counts as in flight: behind a proxy a 502 may hide an increment an instance
        logged before it failed."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 202:
            self.acked[key] = self.acked.get(key, 0) + value
        elif unknown_5xx and status >= 500:
            self.in_flight[key] = self.in_flight.get(key, 0) + value

    def lost(self, items: list[tuple[str, int]]) -> None:
        """Increments sent and never answered (the connection died): in flight."""
        for key, value in items:
            self.in_flight[key] = self.in_flight.get(key, 0) + value


def violations(
    acked: dict[str, int], in_flight: dict[str, int], totals: dict[str, int]
) -> list[str]:
    """Keys whose database total is below what was acknowledged, or above acknowledged plus
    what was in flight (sent, never answered) at a crash."""
    found = []
    for key in acked.keys() | in_flight.keys() | totals.keys():
        low = acked.get(key, 0)
        high = low + in_flight.get(key, 0)
        total = totals.get(key, 0)
        if not low <= total <= high:
            found.append(f"{key}: total {total} outside [{low}, {high}]")
    return found


def merge(into: LoadResult, part: LoadResult) -> None:
    """Add what `part` saw acknowledged and in flight to `into` (a load run in rounds)."""
    for mine, theirs in ((into.acked, part.acked), (into.in_flight, part.in_flight)):
        for key, value in theirs.items():
            mine[key] = mine.get(key, 0) + value


async def load(
    url: str,
    items: list[tuple[str, int]],
    connections: int = 16,
    pipeline: int = 32,
    stop_on_error: bool = True,
) -> LoadResult:
    """Send increments over `connections` keep-alive connections, `pipeline` at a time each.

    Records exactly which increments were acknowledged and which were sent but unanswered, so
    durability tests can bound the database totals from both sides.
    """
    result = LoadResult()
    chunks = [items[i::connections] for i in range(connections)]
    await asyncio.gather(
        *(_one_connection(url, chunk, pipeline, result, stop_on_error) for chunk in chunks if chunk)
    )
    return result


async def load_until(
    url: str,
    stop: asyncio.Event,
    keys: list[str],
    connections: int = 4,
    pipeline: int = 16,
    pause: float = 0.0,
) -> LoadResult:
    """Keep sending increments of 1 to random keys until `stop` is set; `pause` seconds after
    each connection's rounds (a steady load rather than as fast as the machine allows)."""
    import random

    result = LoadResult()

    async def one(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            items = [(rng.choice(keys), 1) for _ in range(pipeline * 8)]
            await _one_connection(url, items, pipeline, result, stop_on_error=False)
            if pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(one(i) for i in range(connections)))
    return result


async def _one_connection(
    url: str, items: list[tuple[str, int]], pipeline: int, result: LoadResult, stop_on_error: bool
) -> None:
    host, port = host_port(url)
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return  # nothing sent: neither acknowledged nor in flight
    collector = _ResponseCollector()
    try:
        for start in range(0, len(items), pipeline):
            window = items[start : start + pipeline]
            answers, complete = await send_window(reader, writer, collector, window)
            for (key, value), resp in zip(window, answers, strict=complete):
                result.count(key, value, resp.status)
                if complete and stop_on_error and resp.status != 202:
                    raise AssertionError(f"unexpected {resp.status}: {resp.body!r}")
            if not complete:
                result.lost(window[len(answers) :])
                return
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def send_window(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    collector: _ResponseCollector,
    window: list[tuple[str, int]],
    timeout: float | None = None,
) -> tuple[list[Response], bool]:
    """Send the increments of `window` pipelined in one write and read their answers: those that
    came, in order, and whether all did (not when the connection died or garbled an answer, nor
    when `timeout` seconds passed without one)."""
    seen = len(collector.done)
    writer.write(b"".join(increment_request(k, v) for k, v in window))
    try:
        await writer.drain()
        while len(collector.done) < seen + len(window):
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                raise ConnectionResetError
            collector.parser.feed_data(chunk)
    except (OSError, httptools.HttpParserError):  # TimeoutError is an OSError
        return collector.done[seen:], False
    return collector.done[seen:], True


# --- the database, read and written beside the service --------------------------------------------


async def db_totals(database_url: str, keys: Iterable[str]) -> dict[str, int]:
    """Read counters straight from the database, bypassing the service."""
    wanted = list(keys)
    if database_url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        try:
            rows: dict[str, int] = {}
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                marks = ",".join("?" * len(part))
                rows.update(
                    conn.execute(
                        f"SELECT key, value FROM counters WHERE key IN ({marks})", part
                    ).fetchall()
                )
            return rows
        finally:
            conn.close()
    import asyncpg

    pg = await asyncpg.connect(database_url)
    try:
        records = await pg.fetch(
            "SELECT key, value FROM counters WHERE key = ANY($1::text[])", wanted
        )
        return {r["key"]: r["value"] for r in records}
    finally:
        await pg.close()


async def totals_are(database_url: str, expected: dict[str, int]) -> bool:
    """Whether the database holds exactly `expected` for its keys (for wait_until: flushed?)."""
    return await db_totals(database_url, expected) == expected


async def db_execute(database_url: str, sql: str, *args: Any) -> None:
    if database_url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        try:
            conn.execute(sql.replace("$1", "?").replace("$2", "?"), args)
            conn.commit()
        finally:
            conn.close()
        return
    import asyncpg

    pg = await asyncpg.connect(database_url)
    try:
        await pg.execute(sql, *args)
    finally:
        await pg.close()


@contextlib.contextmanager
def pg_database(admin_url: str, name: str, *setup: str) -> Iterator[str]:
    """A PostgreSQL database `name` created through admin_url (then each `setup` statement run
    there, an ALTER DATABASE say): its URL; dropped on leaving."""
    asyncio.run(db_execute(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        for sql in setup:
            asyncio.run(db_execute(admin_url, sql))
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(db_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def add_api_key(
    database_url: str,
    name: str | None = None,
    *,
    rate: float | None = None,
    burst: int | None = None,
    key: str | None = None,
) -> str:
    """An API key the server accepts, stored as `keys create` stores one (the database migrated
    first), under `name` (a unique one by default) with the given limits. Returns the key: a
    fresh one, or `key` itself (`ik_<key_id>.<secret>`) where the test fixes it."""
    await asyncio.to_thread(migrate, database_url)
    if key is None:
        key, key_id, key_hash = new_key()
    else:
        key_id = key.removeprefix("ik_").split(".", 1)[0]
        key_hash = hashlib.sha256(key.encode()).hexdigest()
    store = open_store(database_url)
    await store.open()
    try:
        await store.create_api_key(ApiKey(name or unique("key-"), key_id, key_hash, rate, burst))
    finally:
        await store.close()
    return key


# --- waiting, and what the process logs -----------------------------------------------------------


async def wait_until(predicate: Any, timeout: float = 15, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class ErrorLog(logging.Handler):
    """Every ERROR the process logs during a test: internal errors and transport failures."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def since(self, mark: int) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records[mark:]]


@contextlib.contextmanager
def writes_blocked(sqlite_url: str) -> Iterator[None]:
    """Another connection holds SQLite's write lock: every flush waits and retries."""
    blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def hand_frame(seq: int, payload: bytes, magic: bytes = MAGIC) -> bytes:
    """A WAL frame built by hand, its crc right whatever the payload holds (old formats, damage
    the crc cannot see)."""
    crc = zlib.crc32(payload, zlib.crc32(SEQ.pack(seq)))
    return HEADER.pack(magic, len(payload), seq, crc) + payload
