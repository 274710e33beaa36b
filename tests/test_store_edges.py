"""The store at its edges, engine by engine: exact int64 limits, a lone out-of-range delta,
an unopened store, missing directories, the SQLite file's mode, its errors and its close, the
migration URL, and one SQLite connection per thread under load."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from pathlib import Path

import asyncpg
import pytest
from support import db_totals, unique

from incrementer.store import INT64_MAX, INT64_MIN, Store, open_store
from incrementer.store.base import BackendError
from incrementer.store.migrate import _postgres_yoyo_url, migrate
from incrementer.store.sqlite import MIGRATE_HINT, SQLiteStore
from incrementer.store.sqlite_file import create_private
from incrementer.urls import redact_url


async def test_deltas_of_exactly_the_int64_limits_are_applied(store: Store, db_url: str) -> None:
    """A delta of exactly INT64_MAX or INT64_MIN on a new key is a counter, not an overflow,
    and so is the largest seq."""
    node, top, bottom = unique(), unique(), unique()
    result = await store.apply_batch(node, INT64_MAX, {top: INT64_MAX, bottom: INT64_MIN})
    assert result.applied and result.overflowed == {}
    assert await db_totals(db_url, [top, bottom]) == {top: INT64_MAX, bottom: INT64_MIN}
    assert await store.applied_seq(node) == INT64_MAX


@pytest.mark.parametrize("delta", [2**63, -(2**63) - 1], ids=["above", "below"])
async def test_one_delta_outside_int64_is_parked_alone(
    store: Store, db_url: str, delta: int
) -> None:
    """A batch whose only out-of-range delta is on one side parks that key and applies the rest,
    a delta of exactly the limit on that side included."""
    node, bad, good, edge = unique(), unique(), unique(), unique()
    limit = INT64_MAX if delta > 0 else INT64_MIN
    result = await store.apply_batch(node, 1, {bad: delta, good: 1, edge: limit})
    assert result.applied and result.overflowed == {bad: delta}
    assert await db_totals(db_url, [bad, good, edge]) == {good: 1, edge: limit}


async def test_an_unopened_store_refuses_every_call(db_url: str) -> None:
    """Every call on a store that was never opened raises RuntimeError 'not open'."""
    store = open_store(db_url)
    not_open = f"^{type(store).__name__} is not open$"
    with pytest.raises(RuntimeError, match=not_open):
        await store.ping()
    with pytest.raises(RuntimeError, match=not_open):
        await store.apply_batch(unique(), 1, {unique(): 1})
    with pytest.raises(RuntimeError, match=not_open):
        await store.read(unique(), unique())
    await store.close()  # closing what was never opened is harmless


async def test_sqlite_file_in_missing_directories_is_refused(tmp_path: Path) -> None:
    """Migrating, or opening, an SQLite file whose directory does not exist (or is a file) is
    refused, naming the directory, and creates nothing: a mistyped path must not quietly start
    an empty database of counters."""
    (tmp_path / "file").touch()
    for url_path, what in (
        (tmp_path / "a" / "b" / "counters.db", "does not exist"),
        (tmp_path / "file" / "counters.db", "is not a directory"),
    ):
        with pytest.raises(BackendError) as refused:
            await asyncio.to_thread(migrate, f"sqlite:///{url_path}")
        assert str(refused.value) == (
            f"SQLite database {url_path}: its directory {url_path.parent} {what} (incrementer "
            "creates the database file, never directories: create it, or correct the path)"
        )
        store = SQLiteStore(str(url_path))
        with pytest.raises(BackendError, match="never directories"):
            await store.open()
        await store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


async def migrated_store(path: Path) -> SQLiteStore:
    """An SQLite store on a migrated file at path, not opened yet."""
    await asyncio.to_thread(migrate, f"sqlite:///{path}")
    return SQLiteStore(str(path))


def test_a_new_sqlite_file_is_owner_only_and_an_existing_one_is_left_alone(
    tmp_path: Path,
) -> None:
    """The database file is created 0600 whatever the umask (it holds the API keys' hashes);
    a file already there keeps its mode and its bytes."""
    path = tmp_path / "counters.db"
    old = os.umask(0)
    try:
        create_private(str(path))
    finally:
        os.umask(old)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    kept = tmp_path / "kept.db"
    kept.write_bytes(b"kept")
    kept.chmod(0o640)
    create_private(str(kept))
    assert kept.read_bytes() == b"kept" and stat.S_IMODE(kept.stat().st_mode) == 0o640


async def test_an_sqlite_error_names_the_file_and_hints_at_migrate_for_a_missing_table(
    tmp_path: Path,
) -> None:
    """A missing table (a database never migrated) says to run `incrementer migrate`; another
    error (a file that is not a database) says only what SQLite said."""
    fresh = SQLiteStore(str(tmp_path / "fresh.db"))
    await fresh.open()
    try:
        with pytest.raises(BackendError) as missing:
            await fresh.read("k", "node")
    finally:
        await fresh.close()
    assert str(missing.value).startswith(f"SQLite {tmp_path / 'fresh.db'}: no such table")
    assert str(missing.value).endswith(f" ({MIGRATE_HINT})")
    (tmp_path / "garbage.db").write_bytes(b"not a database, " * 64)
    garbage = SQLiteStore(str(tmp_path / "garbage.db"))
    with pytest.raises(BackendError) as other:
        await garbage.open()
    assert str(other.value) == f"SQLite {tmp_path / 'garbage.db'}: file is not a database"


def test_migrate_gives_libpq_a_connect_timeout_unless_the_url_has_one() -> None:
    """yoyo's URL for PostgreSQL: the psycopg backend, and a connect_timeout appended as the
    first query parameter or after the others, never a second one; the URL is split at its
    first '://' only."""
    url = _postgres_yoyo_url
    assert url("postgresql://u@h:5/db", 7) == "postgresql+psycopg://u@h:5/db?connect_timeout=7"
    assert url("postgres://u@h/db?sslmode=disable", 7) == (
        "postgresql+psycopg://u@h/db?sslmode=disable&connect_timeout=7"
    )
    assert url("postgresql://h/db?connect_timeout=2", 7) == (
        "postgresql+psycopg://h/db?connect_timeout=2"
    )
    assert url("postgresql://h/db?application_name=a://b", 7) == (
        "postgresql+psycopg://h/db?application_name=a://b&connect_timeout=7"
    )


async def test_closing_a_store_whose_writer_hangs_gives_up_after_the_timeout(
    tmp_path: Path,
) -> None:
    """close(timeout): past it, a writer thread stuck in its work (a hung disk) is left to
    finish on its own and close returns; a read-only store (no writer) closes its reader."""
    path = tmp_path / "counters.db"
    store = await migrated_store(path)
    await store.open()
    writer = store._writer
    assert writer is not None
    release = threading.Event()
    ending = threading.Timer(10, release.set)  # the stuck work ends, whatever happens
    ending.start()
    stuck = asyncio.get_running_loop().run_in_executor(writer, release.wait)
    await store.close(timeout=0.2)
    assert not release.is_set(), "close waited for the stuck writer"
    release.set()
    ending.cancel()
    await stuck
    reader = SQLiteStore(str(path), read_only=True)
    await reader.open()
    assert reader._read_conn is not None
    await reader.close()
    assert reader._read_conn is None


async def test_an_sqlite_store_s_trace_sees_the_statements_of_both_connections(
    tmp_path: Path,
) -> None:
    """store.trace, set before open, receives every statement the writer and the reader run."""
    seen: list[str] = []
    store = await migrated_store(tmp_path / "counters.db")
    store.trace = seen.append
    await store.open()
    try:
        await store.apply_batch("node", 1, {"k": 1})
        assert (await store.read("k", "node")).value == 1
    finally:
        await store.close()
    assert "BEGIN IMMEDIATE" in seen and "PRAGMA query_only = 1" in seen


async def test_sqlite_store_serves_concurrent_calls_and_closes_clean(sqlite_url: str) -> None:
    """Many flushes and reads at once on one SQLite store all succeed (each connection stays on
    its own thread) and add up; after close no connection is left (the -wal file is gone)."""
    path = sqlite_url.removeprefix("sqlite:///")
    store = await migrated_store(Path(path))
    await store.open()
    node, keys = unique(), [unique() for _ in range(5)]
    try:
        flushes = [store.apply_batch(node, seq, dict.fromkeys(keys, 1)) for seq in range(1, 41)]
        reads = [store.read(keys[0], node) for _ in range(40)]
        applied, _ = await asyncio.gather(asyncio.gather(*flushes), asyncio.gather(*reads))
        assert all(result.applied for result in applied)
    finally:
        await store.close()
    assert await db_totals(sqlite_url, keys) == dict.fromkeys(keys, 40)
    assert not Path(path + "-wal").exists()


def test_a_password_holding_at_signs_and_colons_is_redacted_whole() -> None:
    """redact_url hides the whole password, '@' and ':' in it included, and keeps the user."""
    url = "postgresql://app:p@ss:w@rd@db.example:5432/counters"
    assert redact_url(url) == "postgresql://app:***@db.example:5432/counters"


def test_a_postgres_error_is_described_never_empty() -> None:
    """A timeout says it timed out and after how long (asyncpg's carry no message, also when one
    causes another error); another error without a message is named by its type."""
    from incrementer.store.postgres import PostgresStore

    store = PostgresStore("postgresql://u:secret@db.example/x", timeout=2.0)
    waited = "timed out waiting for an answer (command timeout 20 s)"
    assert store._describe(TimeoutError()) == waited
    caused = ConnectionError()
    caused.__context__ = TimeoutError()
    assert store._describe(caused) == waited
    assert store._describe(ConnectionError()) == "ConnectionError"
    assert (
        store._describe(OSError("refused by u:secret@db.example")) == "refused by u:***@db.example"
    )


def test_overflowed_deltas_are_summed_exactly() -> None:
    """The comma-joined deltas of counter_overflows sum exactly, past 64 bits and with signs."""
    from incrementer.store.base import sum_deltas

    assert sum_deltas(None) == 0 and sum_deltas("") == 0
    assert sum_deltas(f"{2**63},{2**63},-1") == 2**64 - 1


async def test_postgres_connections_carry_the_database_timeout_at_both_ends(pg_url: str) -> None:
    """With --database-timeout 3: each pooled socket has keepalive (a probe after 1 s idle, then
    every 1 s, 3 of them) and TCP_USER_TIMEOUT 3000 ms; the server's end has the same limits and a
    30 s statement_timeout; a connection attempt is bounded at 1.5 s."""
    import socket

    from incrementer.store import pglink
    from incrementer.store.postgres import PostgresStore

    assert pglink.server_settings(3.0) == {
        "tcp_user_timeout": "3000",
        "tcp_keepalives_idle": "1",
        "tcp_keepalives_interval": "1",
        "tcp_keepalives_count": "3",
        "statement_timeout": "30000",
    }
    assert (pglink.connect_timeout(3.0), pglink.statement_timeout(3.0)) == (1.5, 30.0)
    assert pglink.server_settings(0.2)["tcp_keepalives_idle"] == "1"  # whole seconds, at least 1
    assert pglink.server_settings(10.0)["tcp_keepalives_interval"] == "3"
    # Under a millisecond still sets one: 0 would mean no limit at all to PostgreSQL and TCP.
    assert pglink.server_settings(0.0001)["tcp_user_timeout"] == "1"
    store = PostgresStore(pg_url, timeout=3.0)
    await store.open()
    try:
        async with store._connection() as conn:
            shown = [
                await conn.fetchval(f"SHOW {name}")
                for name in ("tcp_user_timeout", "tcp_keepalives_idle", "statement_timeout")
            ]
            sock = conn._transport.get_extra_info("socket")
            options = [
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            ]
    finally:
        await store.close()
    assert shown == ["3000", "1", "30s"]
    assert options == [1, 1, 1, 3, 3000]
    assert store.command_timeout == 30.0


@pytest.mark.parametrize("read_only", [False, True], ids=["service", "read-only"])
async def test_postgres_connections_are_named_and_read_only_when_asked(
    pg_url: str, read_only: bool
) -> None:
    """Every connection shows as `incrementer` in pg_stat_activity; a store opened read-only (the
    CLI's reading commands) has PostgreSQL itself refuse its writes, and only then: a store
    is not read-only unless asked. The pool holds one connection open and opens up to four."""
    from incrementer.store.postgres import PostgresStore

    await asyncio.to_thread(migrate, pg_url)
    store = PostgresStore(pg_url, read_only=True) if read_only else PostgresStore(pg_url)
    await store.open()
    try:
        async with store._connection() as conn:
            shown = [
                await conn.fetchval(f"SHOW {name}")
                for name in ("application_name", "default_transaction_read_only")
            ]
        pool = store._pool
        assert pool is not None and (pool.get_min_size(), pool.get_max_size()) == (1, 4)
        write = store.apply_batch(unique(), 1, {unique(): 1})
        if read_only:
            with pytest.raises(BackendError, match="read-only transaction"):
                await write
        else:
            assert (await write).applied
    finally:
        await store.close()
    assert shown == ["incrementer", "on" if read_only else "off"]


async def test_a_postgres_that_never_answers_fails_the_open_at_the_connect_timeout() -> None:
    """A listener that takes the TCP connection and never answers PostgreSQL's start-up (a
    frozen server): open() gives up after the connect timeout derived from --database-timeout
    (here 0.5 s), with a clear error, rather than after asyncpg's minute."""
    import socket

    from incrementer.store.postgres import PostgresStore

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever reads or writes
        port = silent.getsockname()[1]
        store = PostgresStore(f"postgresql://root@127.0.0.1:{port}/none", timeout=1.0)
        with pytest.raises(
            BackendError,
            match=r"^cannot connect to PostgreSQL at .*: no answer within the connect timeout \(0\.5 s\)$",
        ):
            await asyncio.wait_for(store.open(), 20)


async def test_an_overflow_is_found_among_many_keys(store: Store, db_url: str) -> None:
    """A counter that would leave 64 bits is found however many keys the batch has (past the
    chunks SQLite reads current values in): it alone is parked, the other keys apply."""
    node, high = unique(), unique("high-")
    await store.apply_batch(node, 1, {high: INT64_MAX})
    others = {unique(f"many-{i}-"): 1 for i in range(1_200)}
    result = await store.apply_batch(node, 2, {**others, high: 1})
    assert result.applied and result.overflowed == {high: 1}
    totals = await db_totals(db_url, [high, *list(others)[-3:]])
    assert totals == {high: INT64_MAX, **dict.fromkeys(list(others)[-3:], 1)}


async def test_close_lets_a_query_end_inside_its_limit_and_cuts_one_still_running_at_it(
    pg_url: str,
) -> None:
    """close(limit) waits for a connection in use to come back, so a query that ends inside the
    limit ends with its answer; one still running at the limit is cut off (the connection
    terminated) then, not at the store's own close_timeout (here a minute)."""
    from incrementer.store.postgres import PostgresStore

    async def sleep_on(store: PostgresStore, seconds: float, started: asyncio.Event) -> str:
        async with store._connection() as conn:
            started.set()
            return str(await conn.fetchval("SELECT 'done' FROM pg_sleep($1)", seconds))

    for seconds, limit in ((0.1, 0.9), (60.0, 0.5)):
        store = PostgresStore(pg_url, close_timeout=60.0)
        await store.open()
        started = asyncio.Event()
        query = asyncio.create_task(sleep_on(store, seconds, started))
        await started.wait()
        began = time.monotonic()
        await store.close(limit)
        closed_after = time.monotonic() - began
        if seconds < limit:
            assert await query == "done"
        else:
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                await query
            assert closed_after < 30.0, "waited for close_timeout, not the limit given"


def test_migrate_says_which_migrations_it_applies_and_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first migration of a database logs the ids it applies, in order, and the database;
    a second one applies nothing and says nothing."""
    url = f"sqlite:///{tmp_path}/counters.db"
    with caplog.at_level(logging.INFO, logger="incrementer.store.migrate"):
        applied = migrate(url)
        assert len(applied) > 1 and applied == sorted(applied)
        assert migrate(url) == []
    assert [r.getMessage() for r in caplog.records if r.name == "incrementer.store.migrate"] == [
        f"applying migrations {', '.join(applied)} to {redact_url(url)}"
    ]


def test_a_failing_migration_and_a_held_lock_are_named_with_the_database(tmp_path: Path) -> None:
    """A migration the database refuses (here a table of the same name made by hand) fails with
    the database and the database's own reason; a migration lock held elsewhere past
    lock_timeout fails naming the database and yoyo's word on the lock."""
    import sqlite3

    import yoyo

    taken = tmp_path / "taken.db"
    with sqlite3.connect(taken) as conn:
        conn.execute("CREATE TABLE counters (name TEXT)")
    url = f"sqlite:///{taken}"
    with pytest.raises(BackendError) as failed:
        migrate(url)
    assert str(failed.value) == f"migrating {redact_url(url)} failed: table counters already exists"

    url = f"sqlite:///{tmp_path}/locked.db"
    holder = yoyo.get_backend(url)
    with holder.lock(), pytest.raises(BackendError) as waited:
        migrate(url, lock_timeout=0.2)
    assert str(waited.value).startswith(f"migrating {redact_url(url)}: Process ")
    assert "has locked this database" in str(waited.value)
