"""Idempotency keys of applied batches (POST /increments with an Idempotency-Key).

The flush that applies a batch inserts its key in the same transaction and adds the batch's
deltas only if that insert wins, so a batch is applied once however often, and wherever, it was
sent. `digest` is the hex SHA-256 of the batch's increments, to tell a retry from a reuse of the
key. Rows older than --idempotency-window are swept by `created_at`, which is a time-zone-aware
timestamp like every other (migration 0005): `TIMESTAMPTZ` on PostgreSQL, ISO 8601 UTC text with
a `Z` on SQLite.
"""

import sqlite3
from typing import Any

from yoyo import step

__depends__ = {"0005.aware-timestamps-and-key-rotation"}

POSTGRES = [
    """CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at)",
]
SQLITE = [
    """CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
    )""",
    "CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at)",
]


def apply_step(conn: Any) -> None:
    cursor = conn.cursor()
    for statement in SQLITE if isinstance(conn, sqlite3.Connection) else POSTGRES:
        cursor.execute(statement)


def rollback_step(conn: Any) -> None:
    conn.cursor().execute("DROP TABLE idempotency_keys")


steps = [step(apply_step, rollback_step)]
