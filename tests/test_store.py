"""The database layer against real SQLite files and a real PostgreSQL, engine by engine."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from proxy import proxy_to
from support import pg_database, unique, wait_until

from incrementer.store import (
    INT64_MAX,
    INT64_MIN,
    BackendError,
    Store,
    open_store,
    pg_listen,
)
from incrementer.store.base import (
    SCOPES,
    ApiKey,
    DuplicateKeyName,
    IdempotentBatch,
    prefix_upper_bound,
    utc_text,
)
from incrementer.store.migrate import MIGRATIONS_DIR, migrate
from incrementer.store.postgres import ENCODE_PIECE, PostgresStore
from incrementer.store.sqlite import SQLiteStore
from incrementer.store.sqlite_file import DatabaseFile
from incrementer.urls import parse_database_url, redact_url


async def fetch_direct(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run sql (with ? placeholders) on a connection of its own, bypassing the store."""
    engine, target = parse_database_url(url)
    if engine == "sqlite":
        conn = sqlite3.connect(target)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()
    numbers = itertools.count(1)
    pg_sql = re.sub(r"\?", lambda _: f"${next(numbers)}", sql)
    pg = await asyncpg.connect(target)
    try:
        return [tuple(r) for r in await pg.fetch(pg_sql, *args)]
    finally:
        await pg.close()


async def test_apply_then_read_totals(store: Store) -> None:
    """Deltas of successive batches add up, and read returns the persisted totals."""
    node, a, b = unique(), unique(), unique()
    assert (await store.apply_batch(node, 1, {a: 3, b: 1})).applied
    assert (await store.apply_batch(node, 2, {a: 4})).applied
    assert (await store.read(a, node)).value == 7
    assert (await store.read(b, node)).value == 1


async def test_same_seq_twice_is_skipped(store: Store) -> None:
    """Re-applying the same (node, seq) is a no-op reported as applied=False."""
    node, key = unique(), unique()
    assert (await store.apply_batch(node, 1, {key: 5})).applied
    again = await store.apply_batch(node, 1, {key: 5})
    assert not again.applied
    assert (await store.read(key, node)).value == 5


async def test_lower_seq_is_skipped(store: Store) -> None:
    """A batch below the node's applied_seq is skipped and leaves applied_seq alone."""
    node, key = unique(), unique()
    await store.apply_batch(node, 10, {key: 1})
    assert not (await store.apply_batch(node, 9, {key: 100})).applied
    read = await store.read(key, node)
    assert (read.value, read.applied_seq) == (1, 10)


async def test_nodes_are_independent(store: Store) -> None:
    """Each node has its own applied_seq; the same seq from two nodes is applied twice."""
    node_a, node_b, key = unique(), unique(), unique()
    assert (await store.apply_batch(node_a, 5, {key: 1})).applied
    assert (await store.apply_batch(node_b, 5, {key: 1})).applied
    assert (await store.apply_batch(node_b, 1, {key: 1})).applied is False
    assert await store.applied_seq(node_a) == 5
    assert await store.applied_seq(node_b) == 5
    assert (await store.read(key, node_a)).value == 2


async def test_applied_seq_of_unknown_node_is_zero(store: Store) -> None:
    """A node that never flushed has applied_seq 0."""
    assert await store.applied_seq(unique()) == 0


async def test_negative_deltas(store: Store) -> None:
    """Negative deltas subtract and totals may go below zero."""
    node, key = unique(), unique()
    await store.apply_batch(node, 1, {key: 5})
    await store.apply_batch(node, 2, {key: -8})
    assert (await store.read(key, node)).value == -3


@pytest.mark.parametrize(("start", "delta"), [(INT64_MAX - 5, 10), (INT64_MIN + 5, -10)])
async def test_overflow_is_isolated(store: Store, db_url: str, start: int, delta: int) -> None:
    """A total leaving int64 parks its delta in counter_overflows; the batch's other keys apply."""
    node, edge, other = unique(), unique(), unique()
    await store.apply_batch(node, 1, {edge: start})
    result = await store.apply_batch(node, 2, {edge: delta, other: 7})
    assert result.applied
    assert result.overflowed == {edge: delta}
    assert (await store.read(edge, node)).value == start
    assert (await store.read(other, node)).value == 7
    assert await store.applied_seq(node) == 2
    parked = await fetch_direct(
        db_url, "SELECT seq, delta FROM counter_overflows WHERE node_id = ? AND key = ?", node, edge
    )
    assert parked == [(2, str(delta))]
    if db_url.startswith("sqlite"):
        kind = await fetch_direct(db_url, "SELECT typeof(value) FROM counters WHERE key = ?", edge)
        assert kind == [("integer",)]


async def test_many_overflows_in_one_batch(store: Store) -> None:
    """Several keys overflowing both ways in one batch are all parked; the rest all apply."""
    node = unique()
    high, low = [unique() for _ in range(3)], [unique() for _ in range(3)]
    fine = [unique() for _ in range(100)]
    await store.apply_batch(
        node, 1, {**dict.fromkeys(high, INT64_MAX), **dict.fromkeys(low, INT64_MIN)}
    )
    batch = {**dict.fromkeys(high, 1), **dict.fromkeys(low, -1), **dict.fromkeys(fine, 2)}
    result = await store.apply_batch(node, 2, batch)
    assert result.overflowed == {**dict.fromkeys(high, 1), **dict.fromkeys(low, -1)}
    assert [(await store.read(k, node)).value for k in high + low] == [INT64_MAX] * 3 + [
        INT64_MIN
    ] * 3
    assert {(await store.read(k, node)).value for k in fine} == {2}


async def test_delta_outside_int64_is_parked(store: Store, db_url: str) -> None:
    """A delta that is itself outside int64 goes to counter_overflows with its exact digits."""
    node, huge, tiny, other = unique(), unique(), unique(), unique()
    result = await store.apply_batch(node, 1, {huge: 2**70, tiny: -(2**64), other: 1})
    assert result.overflowed == {huge: 2**70, tiny: -(2**64)}
    assert (await store.read(huge, node)).value is None
    assert (await store.read(other, node)).value == 1
    parked = await fetch_direct(
        db_url, "SELECT key, delta FROM counter_overflows WHERE node_id = ? ORDER BY key", node
    )
    assert sorted(parked) == sorted([(huge, str(2**70)), (tiny, str(-(2**64)))])


async def test_large_batch_is_exact(store: Store, db_url: str) -> None:
    """A 50k-key batch lands exactly: every key once, with its own delta."""
    node, prefix = unique(), unique()
    deltas = {f"{prefix}:{i:05d}": i + 1 for i in range(50_000)}
    assert (await store.apply_batch(node, 1, deltas)).applied
    assert (await store.apply_batch(node, 2, deltas)).applied
    rows = await fetch_direct(
        db_url, "SELECT COUNT(*), SUM(value) FROM counters WHERE key >= ? AND key < ?",
        prefix, prefix_upper_bound(prefix),
    )  # fmt: skip
    assert (int(rows[0][0]), int(rows[0][1])) == (50_000, 2 * sum(deltas.values()))


async def test_read_unknown_key(store: Store) -> None:
    """Reading a key never written gives value None."""
    read = await store.read(unique(), unique())
    assert (read.value, read.applied_seq) == (None, 0)


async def test_read_returns_applied_seq(store: Store) -> None:
    """read() reports the node's applied_seq alongside the value."""
    node, key = unique(), unique()
    await store.apply_batch(node, 42, {key: 1})
    read = await store.read(key, node)
    assert (read.value, read.applied_seq) == (1, 42)
    assert (await store.read(unique(), node)).applied_seq == 42


async def test_empty_batch_records_seq(store: Store) -> None:
    """An empty batch still advances applied_seq, so its seq is never re-applied."""
    node = unique()
    assert (await store.apply_batch(node, 3, {})).applied
    assert await store.applied_seq(node) == 3


async def test_bad_seq_is_refused(store: Store) -> None:
    """seq outside 1..INT64_MAX is a caller bug, refused before touching the database."""
    for seq in (0, -1, INT64_MAX + 1):
        with pytest.raises(ValueError, match="seq"):
            await store.apply_batch(unique(), seq, {unique(): 1})


async def test_list_keys_by_prefix(store: Store) -> None:
    """list_keys returns keys starting with the prefix, ordered, limited, after a given key,
    with the node's applied seq; LIKE wildcards are plain characters."""
    base = unique()
    node = unique()
    keys = [f"{base}a%", f"{base}a_1", f"{base}ab", f"{base}a\U0010ffffz", f"{base}b", f"{base}"]
    await store.apply_batch(node, 1, {k: n for n, k in enumerate(keys, 1)})

    async def listed(prefix: str, limit: int, after: str | None = None) -> list[tuple[str, int]]:
        page = await store.list_keys(prefix, limit, after, node)
        assert page.applied_seq == 1
        return [(key, value) for key, value, _ in page.rows]

    under_a = sorted((k, n) for n, k in enumerate(keys, 1) if k.startswith(f"{base}a"))
    assert await listed(f"{base}a", 100) == under_a
    assert await listed(f"{base}a", 100, under_a[1][0]) == under_a[2:]
    assert await listed(f"{base}a%", 100) == [(f"{base}a%", 1)]
    assert await listed(f"{base}a_", 100) == [(f"{base}a_1", 2)]
    assert [k for k, _ in await listed(base, 2)] == sorted(keys)[:2]
    assert await listed(unique(), 10) == []
    # A prefix with no upper bound (all U+10FFFF) is listed from the prefix up.
    top = "\U0010ffff\U0010ffff"
    await store.apply_batch(unique("top-"), 1, {top + base: 5, top + base + "z": 6})
    assert (top + base, 5) in await listed(top, 1000)
    assert len(await listed(top, 1)) == 1


async def test_ping(store: Store) -> None:
    """ping() returns on a live database, and raises once the store is closed."""
    assert await store.ping() is None
    await store.close()
    with pytest.raises(RuntimeError, match="is not open"):
        await store.ping()


async def test_ping_of_a_dropped_postgres_database_raises_backend_error(pg_admin_url: str) -> None:
    """ping() of a PostgreSQL database that is gone raises BackendError (what readyz reports)."""
    name = unique("incrementer_ping_")
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        store = PostgresStore(pg_admin_url.rsplit("/", 1)[0] + "/" + name)
        await store.open()
        try:
            await store.ping()
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            with pytest.raises(BackendError, match=name):
                await store.ping()
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_concurrent_writers_add_up(db_url: str) -> None:
    """Two stores (as two processes would) flushing the same keys at once lose nothing."""
    await asyncio.to_thread(migrate, db_url)
    stores = [open_store(db_url), open_store(db_url)]
    for s in stores:
        await s.open()
    try:
        keys = [unique() for _ in range(200)]
        nodes = [unique(), unique()]

        async def flush(s: Store, node: str, reverse: bool) -> None:
            for seq in range(1, 11):
                order = reversed(keys) if reverse else keys
                await s.apply_batch(node, seq, {k: 1 for k in order})

        await asyncio.gather(flush(stores[0], nodes[0], False), flush(stores[1], nodes[1], True))
        for key in keys[:5] + keys[-5:]:
            assert (await stores[0].read(key, nodes[0])).value == 20
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_flushes_of_one_batch_apply_once(db_url: str) -> None:
    """The same (node, seq) sent at once by two stores is applied exactly once."""
    await asyncio.to_thread(migrate, db_url)
    stores = [open_store(db_url) for _ in range(3)]
    for s in stores:
        await s.open()
    try:
        node, key = unique(), unique()
        results = await asyncio.gather(*(s.apply_batch(node, 1, {key: 1}) for s in stores))
        assert sorted(r.applied for r in results) == [False, False, True]
        assert (await stores[0].read(key, node)).value == 1
    finally:
        for s in stores:
            await s.close()


async def test_migrate_is_idempotent(db_url: str) -> None:
    """A second migrate applies nothing and leaves the schema working."""
    await asyncio.to_thread(migrate, db_url)
    assert await asyncio.to_thread(migrate, db_url) == []


async def test_postgres_counters_are_set_up_for_hot_updates(pg_url: str) -> None:
    """Migration 0003: the key column compares bytes ("C") and pages keep room for HOT updates."""
    await asyncio.to_thread(migrate, pg_url)
    rows = await fetch_direct(
        pg_url,
        "SELECT a.attcollation::regcollation::text, c.reloptions FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid"
        " WHERE c.oid = 'counters'::regclass AND a.attname = 'key'",
    )
    assert rows == [('"C"', ["fillfactor=70"])]


@pytest.fixture
def fresh_db_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A database no migration has touched yet."""
    if db_url.startswith("sqlite"):
        (tmp_path / "fresh").mkdir()  # the directory must exist: only the file is created
        yield f"sqlite:///{tmp_path / 'fresh' / 'counters.db'}"
        return
    with pg_database(db_url, unique(f"{db_url.rsplit('/', 1)[1]}_fresh_")) as url:
        yield url


def test_concurrent_migrate_applies_once(fresh_db_url: str) -> None:
    """Two processes migrating a fresh database at once: one applies, the other finds it done."""
    code = (
        "import json, sys; from incrementer.store.migrate import migrate; "
        "print(json.dumps(migrate(sys.argv[1])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-W", "error", "-c", code, fresh_db_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    applied = sorted(json.loads(out) for out, _ in outputs)
    every = sorted(path.stem for path in MIGRATIONS_DIR.iterdir() if path.suffix in (".sql", ".py"))
    assert applied == [[], every]
    assert every[:3] == ["0001.counters", "0002.api_keys", "0003.counters-hot-updates"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///relative/path.db", ("sqlite", "relative/path.db")),
        ("sqlite:////abs/path.db", ("sqlite", "/abs/path.db")),
        ("sqlite:///data/a b?c.db", ("sqlite", "data/a b?c.db")),
        ("postgresql://u:p@h:5432/db", ("postgresql", "postgresql://u:p@h:5432/db")),
        ("postgres://h/db", ("postgresql", "postgres://h/db")),
    ],
)
def test_parse_database_url_accepts(url: str, expected: tuple[str, str]) -> None:
    """Both SQLite path forms and both PostgreSQL schemes parse to (engine, target)."""
    assert parse_database_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "mysql://h/db",
        "sqlite://relative.db",
        "sqlite:///",
        "sqlite:///:memory:",
        "counters.db",
        "",
        "postgresql:/h/db",
    ],
)
def test_parse_database_url_rejects(url: str) -> None:
    """Anything else is a ValueError that names the URL and the accepted forms."""
    with pytest.raises(ValueError, match="sqlite:///") as info:
        parse_database_url(url)
    assert repr(url) in str(info.value)


def test_parse_rejection_hides_password() -> None:
    """A rejected URL is echoed without its password."""
    with pytest.raises(ValueError) as info:
        parse_database_url("mysql://user:hunter2@h/db")
    assert "hunter2" not in str(info.value)


def test_open_store_picks_the_engine(tmp_path: Path) -> None:
    """open_store maps each URL scheme to its backend."""
    assert isinstance(open_store(f"sqlite:///{tmp_path}/x.db"), SQLiteStore)
    assert isinstance(open_store("postgres://h/db"), PostgresStore)


async def test_postgres_unreachable_fails_fast() -> None:
    """open() of an unreachable PostgreSQL raises BackendError at once, without the password."""
    store = open_store("postgresql://user:hunter2@127.0.0.1:1/db")
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        await store.open()
    assert time.monotonic() - started < 5
    assert "127.0.0.1:1" in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_postgres_unknown_database_fails_fast(pg_url: str) -> None:
    """open() of a database that does not exist raises BackendError naming it."""
    store = open_store(f"{pg_url.rsplit('/', 1)[0]}/no_such_db_{unique()}")
    with pytest.raises(BackendError, match="no_such_db"):
        await store.open()


def test_migrate_unreachable_names_url_without_password() -> None:
    """migrate() of an unreachable PostgreSQL raises BackendError naming host but no password."""
    with pytest.raises(BackendError, match=re.escape("127.0.0.1:1")) as info:
        migrate("postgresql://user:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(info.value)


async def test_postgres_connection_loss_is_a_backend_error(pg_url: str) -> None:
    """A flush whose connection dies mid-transaction raises BackendError, applies nothing, and
    its retry lands exactly once."""
    await asyncio.to_thread(migrate, pg_url)
    store = open_store(pg_url)
    await store.open()
    blocker = await asyncpg.connect(pg_url)
    try:
        node, key = unique(), unique()
        await store.apply_batch(node, 1, {key: 1})
        # Park the flush on the node row lock, then kill its connection while it waits.
        blocker_tx = blocker.transaction()
        await blocker_tx.start()
        await blocker.execute("SELECT 1 FROM incrementer_nodes WHERE node_id = $1 FOR UPDATE", node)
        flush = asyncio.create_task(store.apply_batch(node, 2, {key: 1}))
        await asyncio.sleep(0.3)
        await blocker.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'incrementer'"
        )
        with pytest.raises(BackendError):
            await flush
        await blocker_tx.rollback()
        assert (await store.read(key, node)).value == 1
        assert (await store.apply_batch(node, 2, {key: 1})).applied
        assert (await store.read(key, node)).value == 2
    finally:
        await blocker.close()
        await store.close()


async def test_sqlite_locked_database_raises_backend_error(sqlite_url: str) -> None:
    """A flush blocked past busy_timeout by another connection's lock raises BackendError, and
    succeeds once the lock is gone."""
    await asyncio.to_thread(migrate, sqlite_url)
    path = parse_database_url(sqlite_url)[1]
    store = SQLiteStore(path, busy_timeout=0.2)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(BackendError, match="locked"):
            await store.apply_batch("n", 1, {"k": 1})
        blocker.execute("ROLLBACK")
        assert (await store.apply_batch("n", 1, {"k": 1})).applied
        assert (await store.read("k", "n")).value == 1
    finally:
        blocker.close()
        await store.close()


async def test_sqlite_uses_wal(sqlite_url: str) -> None:
    """The SQLite file is switched to WAL mode when the store opens."""
    await asyncio.to_thread(migrate, sqlite_url)
    store = open_store(sqlite_url)
    await store.open()
    try:
        assert await fetch_direct(sqlite_url, "PRAGMA journal_mode") == [("wal",)]
    finally:
        await store.close()


def test_prefix_upper_bound() -> None:
    """The bound is the next string after every extension of the prefix, in code point order."""
    assert prefix_upper_bound("") is None
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\U0010ffff") is None
    assert prefix_upper_bound("a\ud7ff") == "a\ue000"
    assert prefix_upper_bound("aX") == "aY"  # only U+10FFFF is stripped, not its neighbours
    assert prefix_upper_bound("a\udffe") == "a\ue000"


async def test_keys_with_separators_and_empty_keys_land_exactly(store: Store) -> None:
    """Keys holding the unit separator, commas or nothing at all are stored exactly."""
    node = unique()
    odd = [f"{node}\x1fa", f"{node},b", f"{node}\x1f", "", f"{node}-plain"]
    await store.apply_batch(node, 1, {k: i + 1 for i, k in enumerate(odd)})
    await store.apply_batch(node, 2, {"": 10})
    for i, key in enumerate(odd):
        expected = i + 1 + (10 if key == "" else 0)
        assert (await store.read(key, node)).value == expected
    plain = {f"{node}-p{i}": i for i in range(1, 50)}
    await store.apply_batch(node, 3, plain)
    for key, value in plain.items():
        assert (await store.read(key, node)).value == value
    # PostgreSQL joins a large batch piece by piece: a separator in a later piece still counts.
    big = {f"{node}-big{i}": 1 for i in range(ENCODE_PIECE + 10)}
    big[f"{node}\x1flate"] = 7
    await store.apply_batch(node, 4, big)
    assert (await store.read(f"{node}\x1flate", node)).value == 7
    assert (await store.read(f"{node}-big{ENCODE_PIECE + 9}", node)).value == 1


async def test_api_keys_round_trip_through_the_store(store: Store) -> None:
    """An API key is read back field by field as created (rate, burst, scopes, prefix, the
    creation time in UTC); revoking it sets its revocation time and hides it from lookups; a
    rotation schedules the old key's end for later (still active) beside the new key; a second
    unrevoked key under a name is refused."""
    name = unique("api-")
    key = ApiKey(name, unique("id"), "ab" * 32, 5.5, 11, scopes=("read",), prefix="tenant/")
    before = datetime.now(UTC).replace(microsecond=0)
    await store.create_api_key(key)
    found = await store.api_key(key.key_id)
    assert found is not None
    created = datetime.strptime(found.created_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=5) <= created <= datetime.now(UTC) + timedelta(seconds=5)
    assert found == ApiKey(
        name, key.key_id, "ab" * 32, 5.5, 11, found.created_at, None, True, ("read",), "tenant/"
    )
    assert [k for k in await store.api_keys() if k.name == name] == [found]
    with pytest.raises(DuplicateKeyName, match=f"^{name}$"):
        await store.create_api_key(ApiKey(name, unique("id"), "cd" * 32))

    new = ApiKey(name, unique("id"), "ef" * 32)
    assert await store.rotate_api_key(name, new, 3600)
    old = await store.api_key(key.key_id)
    assert old is not None and old.active and old.revoked_at is not None
    assert old.revoked_at > found.created_at  # an hour from now
    fresh = await store.api_key(new.key_id)
    assert fresh is not None and fresh.scopes == SCOPES and fresh.prefix is None
    assert fresh.rate is None and fresh.burst is None and fresh.revoked_at is None

    assert await store.revoke_api_key(name)
    assert await store.api_key(key.key_id) is None and await store.api_key(new.key_id) is None
    assert [k for k in await store.api_keys() if k.name == name] == []
    revoked = [k for k in await store.api_keys(include_revoked=True) if k.name == name]
    assert sorted(k.key_id for k in revoked) == sorted([key.key_id, new.key_id])
    assert all(not k.active and k.revoked_at is not None for k in revoked)
    assert not await store.revoke_api_key(name)
    assert not await store.rotate_api_key(name, ApiKey(name, unique("id"), "01" * 32), 60)


async def test_a_watcher_hears_of_key_changes_made_by_another_store(
    store: Store, db_url: str
) -> None:
    """watch_api_keys calls back after another store (another process, in production) creates
    or revokes a key, and not while nothing changes: SQLite's data_version, PostgreSQL's NOTIFY
    to a LISTENing connection (which also calls back once when it connects, for what changed
    while nobody listened)."""
    other = open_store(db_url)
    await other.open()
    try:
        async with watching(store) as calls:
            await asyncio.sleep(1.0)  # several looks at an unchanged file; the LISTEN set up
            assert len(calls) == (1 if db_url.startswith("postgres") else 0)
            quiet = len(calls)
            await asyncio.sleep(1.0)
            assert len(calls) == quiet
            name = unique("watched-")
            await other.create_api_key(ApiKey(name, unique("id"), "ab" * 32))
            await wait_until(lambda: calls, 10)
            assert calls, "the creation was not heard"
            heard = len(calls)
            assert await other.revoke_api_key(name)
            await wait_until(lambda: len(calls) > heard, 10)
            assert len(calls) > heard, "the revocation was not heard"
    finally:
        await other.close()


@contextlib.asynccontextmanager
async def store_behind_proxy(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[Any, str, Store]]:
    """A migrated database behind a proxy the test can cut or freeze, a store opened through it
    (its URL is the proxy's), and the key watcher's log lines captured from INFO up."""
    caplog.set_level(logging.INFO, logger="incrementer.auth")
    await asyncio.to_thread(migrate, pg_url)
    async with proxy_to(pg_url) as (proxy, url):
        store = open_store(url)
        await store.open()
        try:
            yield proxy, url, store
        finally:
            await store.close()


def not_listening(url: str) -> str:
    """The key watcher's line when its connection times out."""
    return (
        f"not listening for API key changes ({redact_url(url)}: TimeoutError); "
        "reconnecting, and keys reload every --auth-refresh meanwhile"
    )


@contextlib.asynccontextmanager
async def watching(store: Store) -> AsyncIterator[list[float]]:
    """The times store.watch_api_keys called back, while it runs in a task of its own."""
    calls: list[float] = []
    watcher = asyncio.create_task(store.watch_api_keys(lambda: calls.append(time.monotonic())))
    try:
        yield calls
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_listing_and_ranking_stay_inside_the_prefix(store: Store) -> None:
    """list_keys and top_keys see only keys that start with the prefix, not the keys sorting
    just past it; the top N counts how many keys it looked at (0 for none); a listing of
    limit 0 is empty with the node's applied_seq (0 for a node never flushed), a negative limit
    a ValueError."""
    base, node = unique("rank"), unique()
    inside = {f"{base}/a": 3, f"{base}/b": 9}
    outside = {f"{base}0": 100, f"{base}0/x": 50}  # "0" sorts right after "/"
    await store.apply_batch(node, 1, {**inside, **outside})
    top, looked_at = await store.top_keys(f"{base}/", 10, 1000)
    assert top == [(f"{base}/b", 9), (f"{base}/a", 3)] and looked_at == 2
    assert await store.top_keys(f"{base}/none/", 10, 1000) == ([], 0)
    listed = await store.list_keys(f"{base}/", 10, None, node)
    assert [row[0] for row in listed.rows] == [f"{base}/a", f"{base}/b"]
    empty = await store.list_keys(f"{base}/", 0, None, node)
    assert empty.rows == [] and empty.applied_seq == 1
    assert (await store.list_keys(f"{base}/none/", 5, None, node)).applied_seq == 1
    assert (await store.list_keys(f"{base}/", 5, None, unique())).applied_seq == 0
    assert (await store.list_keys(f"{base}/none/", 5, None, unique())).applied_seq == 0
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        await store.list_keys(f"{base}/", -1, None, node)


async def test_a_rotation_that_fails_changes_nothing(store: Store) -> None:
    """A rotation whose new key cannot be stored (its key id is taken) raises, leaves the old
    key unscheduled, and leaves the store writable: nothing of it stays half done."""
    name, other = unique("rot-"), unique("rot-")
    old = ApiKey(name, unique("id"), "ab" * 32)
    taken = ApiKey(other, unique("id"), "cd" * 32)
    await store.create_api_key(old)
    await store.create_api_key(taken)
    with pytest.raises((BackendError, DuplicateKeyName)) as refused:  # the stores cannot tell which
        await store.rotate_api_key(name, ApiKey(name, taken.key_id, "ef" * 32), 60)
    if refused.type is DuplicateKeyName:
        assert refused.value.args == (name,)
    kept = await store.api_key(old.key_id)
    assert kept is not None and kept.revoked_at is None
    assert await store.rotate_api_key(name, ApiKey(name, unique("id"), "01" * 32), 60)
    assert await store.revoke_api_key(other)


async def test_a_cut_listening_connection_reconnects_and_says_so(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL's key watcher, its LISTEN connection terminated by the server (twice): each
    time it logs that it is not listening and why, reconnects under its application_name, says
    so, calls back once for what may have changed meanwhile; then it hears the next change."""
    caplog.set_level(logging.INFO, logger="incrementer.auth")
    await asyncio.to_thread(migrate, pg_url)
    store = open_store(pg_url)
    await store.open()
    admin = await asyncpg.connect(pg_url)
    cut_listener = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'incrementer-listen' AND datname = current_database()"
    )
    where = redact_url(pg_url)
    try:
        async with watching(store) as calls:
            await wait_until(lambda: calls, 10)  # connected: the first callback
            for cut in range(2):  # the second after the backoff has grown
                assert await admin.fetchval(cut_listener) == 1
                await wait_until(lambda cut=cut: len(calls) >= 2 + cut, 10)  # reconnected
            said = [r.getMessage() for r in caplog.records if r.name == "incrementer.auth"]
            assert (
                said.count(
                    f"not listening for API key changes ({where}: the listening connection "
                    "closed); reconnecting, and keys reload every --auth-refresh meanwhile"
                )
                == 2
            ), said
            assert said.count(f"listening for API key changes again ({where})") == 2, said
            await store.create_api_key(ApiKey(unique("cut-"), unique("id"), "ab" * 32))
            await wait_until(lambda: len(calls) >= 4, 10)
    finally:
        await admin.close()
        await store.close()


async def test_ranking_counts_what_it_looked_at_and_listing_shows_overflow(store: Store) -> None:
    """top_keys looks at no more than scan + 1 keys under the prefix and says how many it saw;
    with the empty prefix (no upper bound) it ranks every key; list_keys gives each key's
    overflowed deltas beside its value."""
    base, node = unique("scan"), unique()
    keys = {f"{base}/a": 1, f"{base}/b": 2, f"{base}/c": 3}
    await store.apply_batch(node, 1, keys)
    # scan 1: the first two keys in key order looked at (the caller refuses: more than scan)
    assert await store.top_keys(f"{base}/", 10, 1) == ([(f"{base}/b", 2), (f"{base}/a", 1)], 2)
    ranked = [(f"{base}/c", 3), (f"{base}/b", 2), (f"{base}/a", 1)]
    assert await store.top_keys(f"{base}/", 10, 2) == (ranked, 3)
    assert await store.top_keys(f"{base}/", 2, 5) == ([(f"{base}/c", 3), (f"{base}/b", 2)], 3)
    everything, seen = await store.top_keys("", 1, 10**6)
    assert seen >= 3 and len(everything) == 1
    full = f"{base}/full"
    await store.apply_batch(node, 2, {full: INT64_MAX})
    result = await store.apply_batch(node, 3, {full: 5})
    assert result.overflowed == {full: 5}
    listed = await store.list_keys(f"{base}/f", 10, None, node)
    assert listed.rows == [(full, INT64_MAX, 5)]


def test_database_timestamps_are_read_as_utc_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """utc_text reads a timestamp without a zone as UTC (SQLite's text), converts one with a
    zone, and writes ISO 8601 UTC to the second, under a local zone that is not UTC."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert utc_text("2026-12-06 10:00:00") == "2026-12-06T10:00:00Z"
        assert utc_text("2026-12-06T11:30:00.9+01:00") == "2026-12-06T10:30:00Z"
        assert utc_text(datetime(2026, 12, 6, 10, 0, tzinfo=UTC)) == "2026-12-06T10:00:00Z"
        assert utc_text(None) is None
    finally:
        monkeypatch.undo()  # the TZ the run had, if any
        time.tzset()


async def test_a_key_watcher_started_while_the_database_is_away_waits_for_it(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL's key watcher started while the database cannot be reached: one log line
    says it is not listening (not one per attempt), it keeps trying with backoff, and once the
    database is back it says it is listening again and calls back once."""
    async with store_behind_proxy(pg_url, caplog) as (proxy, url, store):
        await proxy.cut()
        async with watching(store) as calls:
            await asyncio.sleep(2.0)  # attempts at 0, 0.5 and 1.5 s, all refused
            assert calls == []
            await proxy.restore()
            await wait_until(lambda: calls, 15)
            assert len(calls) == 1
            said = [r.getMessage() for r in caplog.records if r.name == "incrementer.auth"]
            assert len([m for m in said if m.startswith("not listening")]) == 1, said
            assert said[-1] == f"listening for API key changes again ({redact_url(url)})", said


async def test_a_silent_listening_connection_is_found_by_its_keepalive_ping(
    pg_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's key watcher pings its quiet LISTEN connection every KEEPALIVE (0.2 s here):
    on a healthy link the pings pass unnoticed (no reconnection, no log line); when the link goes
    silent without a reset (the proxy stops passing bytes), the next ping goes unanswered and
    the watcher says it is not listening."""
    monkeypatch.setattr(pg_listen, "KEEPALIVE", 0.2)
    async with (
        store_behind_proxy(pg_url, caplog) as (proxy, url, store),
        watching(store) as calls,
    ):
        await wait_until(lambda: calls, 10)
        await asyncio.sleep(1.2)  # six pings
        said = [r.getMessage() for r in caplog.records if r.name == "incrementer.auth"]
        assert (len(calls), said) == (1, [])
        proxy.freeze()
        await wait_until(lambda: caplog.records, 10)
        assert [r.getMessage() for r in caplog.records] == [not_listening(url)]
        await proxy.cut()  # the frozen connections reset: the store closes at once


async def test_a_listening_connection_that_never_answers_its_opening_is_given_up(
    pg_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's key watcher connecting to a database that accepts the connection and never
    answers (the proxy frozen from the start): the attempt ends after CONNECT_TIMEOUT (0.3 s
    here) and the watcher says it is not listening, and keeps trying."""
    monkeypatch.setattr(pg_listen, "CONNECT_TIMEOUT", 0.3)
    async with store_behind_proxy(pg_url, caplog) as (proxy, url, store):
        proxy.freeze()
        async with watching(store) as calls:
            await wait_until(lambda: caplog.records, 10)
            assert [r.getMessage() for r in caplog.records] == [not_listening(url)]
            assert calls == []
        await proxy.cut()


async def test_an_overflow_and_a_batch_applied_before_in_one_flush(store: Store) -> None:
    """One flush holding a delta that would take its counter past 64 bits and an idempotent batch
    another node applied first: the overflowing delta is set aside, the duplicate taken back,
    and the rest lands, in one commit."""
    a, b = unique(), unique()
    full, key, other = unique("full"), unique(), unique()
    await store.apply_batch(a, 1, {full: INT64_MAX})
    digest = "ab" * 32
    first = IdempotentBatch(unique("ik"), digest, {key: 4})
    await store.apply_batch(a, 2, {key: 4}, [first])
    again = IdempotentBatch(first.key, digest, {key: 4})
    result = await store.apply_batch(b, 1, {full: 7, key: 4, other: 1}, [again])
    assert (result.applied, result.overflowed, result.duplicates) == (
        True, {full: 7}, {first.key: digest},
    )  # fmt: skip
    assert (await store.read(full, a)).value == INT64_MAX
    assert (await store.read(full, a)).overflow == 7
    assert (await store.read(key, a)).value == 4
    assert (await store.read(other, a)).value == 1


def test_the_sqlite_file_check_says_what_became_of_the_file(tmp_path: Path) -> None:
    """DatabaseFile.check(): nothing to say before the file is remembered or while the path
    names it; a BackendError naming the path once it was replaced by another file, once it was
    deleted, and when it cannot be looked at."""
    path = tmp_path / "counters.db"
    watched = DatabaseFile(str(path))
    watched.check()  # not yet remembered: nothing to compare with
    path.write_bytes(b"one")
    watched.remember()
    watched.check()
    tail = (
        " while the service ran: flushes are refused, as they would go to a file no one will "
        "read again; unflushed increments stay in the WAL. Put the file back, or restart the "
        "service to open what the path names now"
    )
    other = tmp_path / "other.db"
    other.write_bytes(b"two")
    os.replace(other, path)
    with pytest.raises(BackendError) as replaced:
        watched.check()
    assert str(replaced.value) == f"SQLite {path} was replaced by another file{tail}"
    path.unlink()
    with pytest.raises(BackendError) as deleted:
        watched.check()
    assert str(deleted.value) == f"SQLite {path} was deleted{tail}"
    (tmp_path / "plain").write_bytes(b"")
    inside_a_file = DatabaseFile(str(tmp_path / "plain" / "counters.db"))
    inside_a_file.identity = (0, 0)
    with pytest.raises(BackendError) as unreadable:
        inside_a_file.check()
    assert str(unreadable.value) == (
        f"SQLite {inside_a_file.path}: cannot check the file: [Errno 20] Not a directory: "
        f"'{inside_a_file.path}'"
    )


async def test_a_read_only_sqlite_store_reads_and_creates_nothing(tmp_path: Path) -> None:
    """The SQLite store the CLI's looking commands open (read_only): at a path with no database
    it says so and creates no file; on a database it reads what the service wrote, whatever the
    path holds (a space, a '?'), and refuses writes, as the service's own reading connection
    does (query_only)."""
    missing = tmp_path / "none.db"
    store = open_store(f"sqlite:///{missing}", read_only=True)
    with pytest.raises(BackendError) as refused:
        await store.open()
    assert str(refused.value) == (
        f"no SQLite database at {missing} (`incrementer migrate` or the service creates it)"
    )
    assert not missing.exists()
    path = tmp_path / "a dir?" / "counters.db"
    path.parent.mkdir()
    url = f"sqlite:///{path}"
    await asyncio.to_thread(migrate, url)
    writer = open_store(url)
    await writer.open()
    node, key = unique(), unique()
    await writer.apply_batch(node, 1, {key: 3})
    assert isinstance(writer, SQLiteStore)
    with pytest.raises(BackendError, match="attempt to write a readonly database"):
        await writer._read(lambda conn: conn.execute("DELETE FROM counters").fetchall())
    await writer.close()
    reader = open_store(url, read_only=True)
    await reader.open()
    try:
        assert (await reader.read(key, node)).value == 3
        assert isinstance(reader, SQLiteStore)
        with pytest.raises(BackendError, match="attempt to write a readonly database"):
            await reader._read(lambda conn: conn.execute("DELETE FROM counters").fetchall())
    finally:
        await reader.close()
