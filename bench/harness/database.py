"""PostgreSQL for the benchmark: a fresh database per run, dropped after, and the totals check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://root@127.0.0.1:5432/postgres")
CONNECT_TIMEOUT = 10.0
ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError)
"""What a failing database raises, besides OSError and TimeoutError."""


def database_url(name: str) -> str:
    return f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=CONNECT_TIMEOUT)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def server_version() -> str:
    conn = await asyncpg.connect(ADMIN_URL, timeout=CONNECT_TIMEOUT)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def fresh_database(label: str) -> AsyncIterator[str]:
    """Create an empty database for one run, yield its URL, drop it (even on failure) after."""
    name = f"bench_{label.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(name)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def backend_pids(url: str) -> list[int]:
    """Server processes connected to the run's database (the service's pool, or naive's)."""
    conn = await asyncpg.connect(ADMIN_URL, timeout=CONNECT_TIMEOUT)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", url.rsplit("/", 1)[1]
        )
        return [int(r["pid"]) for r in rows]
    finally:
        await conn.close()


async def sum_by_prefix(url: str, prefix: str) -> int:
    """Sum of `value` over the run's keys. The prefix has no LIKE wildcards (letters, digits, -)."""
    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    try:
        exists = await conn.fetchval("SELECT to_regclass('counters') IS NOT NULL")
        if not exists:
            return 0
        total = await conn.fetchval(
            "SELECT sum(value) FROM counters WHERE key LIKE $1", prefix + "%"
        )
        return int(total or 0)
    finally:
        await conn.close()


async def wait_for_total(
    url: str,
    prefix: str,
    expected: Callable[[], Awaitable[int | None]],
    timeout: float = 15.0,
    interval: float = 0.05,
) -> tuple[int, float, bool]:
    """Poll until the database sum reaches what the service says it accepted.

    Returns (database sum, seconds waited, whether it matched). The wait is the persistence lag
    left when the load stops: how long acknowledged increments stayed only in memory and the WAL.
    """
    started = time.monotonic()
    total = 0
    while True:
        want = await expected()
        total = await sum_by_prefix(url, prefix)
        waited = time.monotonic() - started
        if want is not None and total == want:
            return total, waited, True
        if waited >= timeout:
            return total, waited, False
        await asyncio.sleep(interval)
