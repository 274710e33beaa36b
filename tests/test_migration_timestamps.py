"""Migration 0005 on both engines: every timestamp says its time zone, the rows written before
it keep the instant they meant, and API key names are unique only among unrevoked keys."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from support import add_api_key, pg_database, unique

from incrementer.auth.keyring import new_key
from incrementer.store import INT64_MAX, open_store
from incrementer.store.base import ApiKey, DuplicateKeyName
from incrementer.store.migrate import migrate

BEFORE = "0004.counter-overflows-by-key"
SQLITE_AWARE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TIMESTAMPS = {
    "counters": ("created_at", "updated_at"),
    "incrementer_nodes": ("updated_at",),
    "counter_overflows": ("created_at",),
    "api_keys": ("created_at", "revoked_at"),
}


@pytest.fixture
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database no migration has touched, on each engine; PostgreSQL's in a time zone far
    from UTC, so a value read in the wrong zone shows."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'counters.db'}"
        return
    admin: str = request.getfixturevalue("pg_admin_url")
    name = unique("incrementer_tz_")
    with pg_database(admin, name, f"ALTER DATABASE \"{name}\" SET TimeZone = 'Asia/Tokyo'") as url:
        yield url


def _sqlite(url: str) -> sqlite3.Connection:
    return sqlite3.connect(url.removeprefix("sqlite:///"))


ENGINES = pytest.mark.parametrize("fresh_url", ["sqlite", "postgresql"], indirect=True)


@ENGINES
async def test_every_timestamp_written_says_its_zone(fresh_url: str) -> None:
    """After the migrations, each timestamp column is TIMESTAMPTZ on PostgreSQL and ISO 8601
    UTC text with a Z on SQLite, in rows the service writes (counters, the ledger, overflows,
    keys created and revoked)."""
    await add_api_key(fresh_url, "who")  # migrates first
    store = open_store(fresh_url)
    await store.open()
    try:
        await store.apply_batch("node", 1, {"k": 1, "big": INT64_MAX})
        await store.apply_batch("node", 2, {"big": 1})  # overflows: a counter_overflows row
        assert await store.revoke_api_key("who")
    finally:
        await store.close()
    if fresh_url.startswith("sqlite"):
        with _sqlite(fresh_url) as conn:
            for table, columns in TIMESTAMPS.items():
                for column in columns:
                    values = [r[0] for r in conn.execute(f"SELECT {column} FROM {table}")]
                    assert values and all(SQLITE_AWARE.fullmatch(v) for v in values), (
                        table,
                        column,
                        values,
                    )
        return
    conn = await asyncpg.connect(fresh_url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE column_name IN ('created_at', 'updated_at', 'revoked_at')"
            " AND table_schema = 'public' AND table_name = ANY($1::text[])",
            list(TIMESTAMPS),
        )
    finally:
        await conn.close()
    assert {(r[0], r[1]) for r in rows} == {(t, c) for t, cs in TIMESTAMPS.items() for c in cs}
    assert {r[2] for r in rows} == {"timestamp with time zone"}


@ENGINES
async def test_rows_from_before_keep_their_instant(fresh_url: str) -> None:
    """Timestamps written before the migration, in the zone they were written in (UTC on
    SQLite, the database's TimeZone on PostgreSQL), mean the same instant after it; the old
    keys still authenticate, and a revoked name can take a new key."""
    await asyncio.to_thread(migrate, fresh_url, until=BEFORE)
    _, key_id, key_hash = new_key()
    old = (
        "INSERT INTO api_keys (name, key_id, key_hash, created_at, revoked_at)"
        " VALUES ('old', 'oldid', 'x', '2026-01-01 09:00:00', '2026-01-02 09:00:00')"
    )
    live = (
        f"INSERT INTO api_keys (name, key_id, key_hash) VALUES ('live', '{key_id}', '{key_hash}')"
    )
    counter = (
        "INSERT INTO counters (key, value, created_at, updated_at)"
        " VALUES ('k', 7, '2026-01-01 09:00:00', '2026-01-01 09:30:00')"
    )
    # 09:00 naive is 09:00 UTC on SQLite, and 09:00 in Tokyo (00:00 UTC) on that PostgreSQL.
    expected = datetime(2026, 1, 1, 9 if fresh_url.startswith("sqlite") else 0, tzinfo=UTC)
    if fresh_url.startswith("sqlite"):
        with _sqlite(fresh_url) as conn:
            for sql in (old, live, counter):
                conn.execute(sql)
    else:
        conn = await asyncpg.connect(fresh_url)
        try:
            for sql in (old, live, counter):
                await conn.execute(sql)
        finally:
            await conn.close()

    applied = await asyncio.to_thread(migrate, fresh_url)
    assert applied[0] == "0005.aware-timestamps-and-key-rotation", applied

    if fresh_url.startswith("sqlite"):
        with _sqlite(fresh_url) as conn:
            (created,) = conn.execute("SELECT created_at FROM counters WHERE key = 'k'").fetchone()
            assert created == "2026-01-01T09:00:00.000Z"
            value = datetime.fromisoformat(created)
    else:
        conn = await asyncpg.connect(fresh_url)
        try:
            value = await conn.fetchval("SELECT created_at FROM counters WHERE key = 'k'")
        finally:
            await conn.close()
    assert value == expected

    store = open_store(fresh_url)
    await store.open()
    try:
        found = await store.api_key(key_id)
        assert found is not None and found.name == "live" and found.active
        listed = {k.name: k for k in await store.api_keys(include_revoked=True)}
        assert not listed["old"].active
        assert listed["old"].created_at == expected.strftime("%Y-%m-%dT%H:%M:%SZ")
        await store.create_api_key(ApiKey("old", "newid", "y"))  # the revoked name, reused
        with pytest.raises(DuplicateKeyName):
            await store.create_api_key(ApiKey("live", "otherid", "z"))
    finally:
        await store.close()
