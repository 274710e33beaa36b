"""Database backends behind one interface (base.py); pick one by URL.

Backends are imported inside `open_store` so an SQLite deployment never loads asyncpg and a
PostgreSQL one never touches sqlite3.
"""

from __future__ import annotations

from incrementer.store.base import (
    INT64_MAX,
    INT64_MIN,
    ApplyResult,
    BackendError,
    KeyRead,
    Store,
)
from incrementer.urls import parse_database_url

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "ApplyResult",
    "BackendError",
    "KeyRead",
    "Store",
    "open_store",
]


def open_store(url: str, read_only: bool = False, timeout: float | None = None) -> Store:
    """The backend for url, not yet opened: call `await store.open()`. read_only: for commands
    that only look (never create an SQLite file; PostgreSQL sessions refuse writes). timeout:
    --database-timeout, the silence allowed on a PostgreSQL connection (store/pglink.py)."""
    engine, target = parse_database_url(url)
    if engine == "sqlite":
        from incrementer.store.sqlite import SQLiteStore

        return SQLiteStore(target, read_only=read_only)
    from incrementer.store.postgres import PostgresStore

    if timeout is None:
        return PostgresStore(target, read_only=read_only)
    return PostgresStore(target, read_only=read_only, timeout=timeout)
