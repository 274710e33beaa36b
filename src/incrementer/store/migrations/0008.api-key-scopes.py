"""What each API key may do: `scopes` (comma-separated, of write, read, admin) and `prefix` (set:
the key may only use counters whose names start with it).

Every key made before this migration keeps what it could do: all three scopes (the column's
default fills the rows already there) and no prefix. Adding a column with a constant default
rewrites no row on PostgreSQL 11 and later, nor on SQLite.
"""

import sqlite3
from typing import Any

from yoyo import step

__depends__ = {"0007.time-buckets"}

ALL = "'write,read,admin'"
POSTGRES = [
    f"ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT {ALL}, ADD COLUMN prefix TEXT",
]
SQLITE = [
    f"ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT {ALL}",
    "ALTER TABLE api_keys ADD COLUMN prefix TEXT",
]


def apply_step(conn: Any) -> None:
    cursor = conn.cursor()
    for statement in SQLITE if isinstance(conn, sqlite3.Connection) else POSTGRES:
        cursor.execute(statement)


steps = [step(apply_step)]
