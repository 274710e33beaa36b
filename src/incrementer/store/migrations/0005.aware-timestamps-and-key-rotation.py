"""Timestamps that say their time zone, and API keys that can be rotated and their names reused.

Timestamps. Until now they were `TIMESTAMP` without a zone.
- PostgreSQL: every one becomes `TIMESTAMPTZ`. An existing value is read in the session's
  `TimeZone`, which is the database's default: the zone `now()` wrote it in (neither asyncpg nor
  psycopg sets one). Under UTC, PostgreSQL changes the type without rewriting the table.
- SQLite has no timestamp type: the values become ISO 8601 text in UTC with a `Z`
  (`2026-01-31T12:00:00.000Z`), the form `CURRENT_TIMESTAMP` wrote is converted as the UTC it
  was, and the columns are declared `TEXT` with that form as their default. SQLite cannot change
  a column's declaration in place, so each table is rebuilt (every row is copied once).

API keys. `name` was the primary key, so a name could hold one key, ever. Now `key_id` is, and
`name` is unique only among unrevoked keys (a partial index): a rotation's new key sits beside the
old one while the old one counts down its grace period (`revoked_at` in the future), and a name
whose keys are all revoked can be given a new key.
"""

import sqlite3
from typing import Any

from yoyo import step

__depends__ = {"0004.counter-overflows-by-key"}

# The one text form of an SQLite timestamp: it sorts as it compares, and Python's
# datetime.fromisoformat reads it.
SQLITE_NOW = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"


def _aware(column: str) -> str:
    return f"strftime('%Y-%m-%dT%H:%M:%fZ', {column})"


POSTGRES = [
    "ALTER TABLE counters ALTER COLUMN created_at TYPE TIMESTAMPTZ,"
    " ALTER COLUMN updated_at TYPE TIMESTAMPTZ",
    "ALTER TABLE incrementer_nodes ALTER COLUMN updated_at TYPE TIMESTAMPTZ",
    "ALTER TABLE counter_overflows ALTER COLUMN created_at TYPE TIMESTAMPTZ",
    "ALTER TABLE api_keys ALTER COLUMN created_at TYPE TIMESTAMPTZ,"
    " ALTER COLUMN revoked_at TYPE TIMESTAMPTZ",
    # The constraint names are PostgreSQL's defaults for migration 0002's table.
    "ALTER TABLE api_keys DROP CONSTRAINT api_keys_pkey",
    "ALTER TABLE api_keys DROP CONSTRAINT api_keys_key_id_key",
    "ALTER TABLE api_keys ADD PRIMARY KEY (key_id)",
    "CREATE UNIQUE INDEX api_keys_unrevoked_name ON api_keys (name) WHERE revoked_at IS NULL",
]

SQLITE = [
    f"""CREATE TABLE counters_new (
        key TEXT PRIMARY KEY,
        value BIGINT NOT NULL,
        created_at TEXT NOT NULL DEFAULT {SQLITE_NOW},
        updated_at TEXT NOT NULL DEFAULT {SQLITE_NOW}
    )""",
    "INSERT INTO counters_new (key, value, created_at, updated_at)"
    f" SELECT key, value, {_aware('created_at')}, {_aware('updated_at')} FROM counters",
    "DROP TABLE counters",
    "ALTER TABLE counters_new RENAME TO counters",
    f"""CREATE TABLE incrementer_nodes_new (
        node_id TEXT PRIMARY KEY,
        applied_seq BIGINT NOT NULL,
        updated_at TEXT NOT NULL DEFAULT {SQLITE_NOW}
    )""",
    "INSERT INTO incrementer_nodes_new (node_id, applied_seq, updated_at)"
    f" SELECT node_id, applied_seq, {_aware('updated_at')} FROM incrementer_nodes",
    "DROP TABLE incrementer_nodes",
    "ALTER TABLE incrementer_nodes_new RENAME TO incrementer_nodes",
    f"""CREATE TABLE counter_overflows_new (
        node_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        key TEXT NOT NULL,
        delta TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT {SQLITE_NOW},
        PRIMARY KEY (node_id, seq, key)
    )""",
    "INSERT INTO counter_overflows_new (node_id, seq, key, delta, created_at)"
    f" SELECT node_id, seq, key, delta, {_aware('created_at')} FROM counter_overflows",
    "DROP TABLE counter_overflows",
    "ALTER TABLE counter_overflows_new RENAME TO counter_overflows",
    "CREATE INDEX counter_overflows_key ON counter_overflows (key)",
    f"""CREATE TABLE api_keys_new (
        key_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        rate DOUBLE PRECISION,
        burst BIGINT,
        created_at TEXT NOT NULL DEFAULT {SQLITE_NOW},
        revoked_at TEXT
    )""",
    "INSERT INTO api_keys_new (key_id, name, key_hash, rate, burst, created_at, revoked_at)"
    f" SELECT key_id, name, key_hash, rate, burst, {_aware('created_at')}, {_aware('revoked_at')}"
    " FROM api_keys",
    "DROP TABLE api_keys",
    "ALTER TABLE api_keys_new RENAME TO api_keys",
    "CREATE UNIQUE INDEX api_keys_unrevoked_name ON api_keys (name) WHERE revoked_at IS NULL",
]


def apply_step(conn: Any) -> None:
    cursor = conn.cursor()
    for statement in SQLITE if isinstance(conn, sqlite3.Connection) else POSTGRES:
        cursor.execute(statement)


steps = [step(apply_step)]
