"""Shared fixtures: a fresh PostgreSQL database per test run, SQLite files per test."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import PG_ADMIN_URL, ErrorLog, pg_database, skip_or_fail, unique

from incrementer.store import Store, open_store
from incrementer.store.migrate import migrate


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test stale compiled modules: the extension would run, not the edited source."""
    import incrementer.service  # noqa: F401  (loads every compiled module)
    from incrementer import build

    stale = build.stale_extensions()
    if stale:
        pytest.exit(
            f"compiled modules that are not their source: {', '.join(stale)}; rebuild with "
            "`.venv/bin/pip install -e .` after deleting any without a source (./scripts/test "
            "does both)",
            returncode=2,
        )


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, the loop the service runs on in production."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The PostgreSQL server's admin URL (INCREMENTER_TEST_PG), once it has answered."""
    try:
        asyncio.run(_admin("SELECT 1"))
    except (TimeoutError, OSError) as exc:
        skip_or_fail(f"PostgreSQL unreachable at {PG_ADMIN_URL}: {exc}")
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """URL of a PostgreSQL database created for this test run and dropped after it."""
    with pg_database(pg_admin_url, unique(f"incrementer_test_{os.getpid()}_")) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file for one test."""
    return f"sqlite:///{tmp_path / 'counters.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'counters.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A migrated, open store on each engine (see db_url)."""
    await asyncio.to_thread(migrate, db_url)
    opened = open_store(db_url)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _statements_built_afresh() -> None:
    """Forget the SQL texts the stores memoise (functools.cache), so each test builds them again.
    Mutation testing forks each mutant's tests from a session that already built them: without
    this, a mutant of a statement builder would never run, and would survive untested."""
    import incrementer.store.postgres_buckets as buckets_sql
    import incrementer.store.postgres_reads as reads_sql

    for module in (buckets_sql, reads_sql):
        for value in vars(module).values():
            clear = getattr(value, "cache_clear", None)
            if callable(clear):
                clear()
