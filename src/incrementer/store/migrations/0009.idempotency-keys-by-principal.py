"""Idempotency keys scoped by their sender: `idempotency_keys` gains `principal`, and the primary
key becomes (principal, key), so two API keys (or, with auth off, two client IPs) may use the
same Idempotency-Key without one's batch being taken for a replay of the other's.

`principal` is `key:NAME` (the API key's name: the keys of a rotation share it) or `ip:ADDRESS`
(auth off). Rows stored before this migration get the empty principal, which no request has:
they never answer a request as its own, and are swept after --idempotency-window like any
other. A lookup takes one into account only when its digest is the request's (the same batch,
sent before the upgrade and retried after it: still a replay). Its default keeps an instance
that predates this migration, writing during a rolling upgrade, inserting such rows.

PostgreSQL adds the column with a constant default (no table rewrite) and swaps the primary key
(one index build over the rows of one window); SQLite cannot change a primary key in place, so
the table is rebuilt (every row copied once).
"""

import sqlite3
from typing import Any

from yoyo import step

__depends__ = {"0008.api-key-scopes"}

POSTGRES = [
    "ALTER TABLE idempotency_keys ADD COLUMN principal TEXT NOT NULL DEFAULT ''",
    # The constraint name is PostgreSQL's default for migration 0006's table.
    "ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey",
    "ALTER TABLE idempotency_keys ADD PRIMARY KEY (principal, key)",
]
SQLITE = [
    """CREATE TABLE idempotency_keys_new (
        principal TEXT NOT NULL DEFAULT '',
        key TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
        PRIMARY KEY (principal, key)
    )""",
    "INSERT INTO idempotency_keys_new (principal, key, digest, created_at)"
    " SELECT '', key, digest, created_at FROM idempotency_keys",
    "DROP TABLE idempotency_keys",
    "ALTER TABLE idempotency_keys_new RENAME TO idempotency_keys",
    "CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at)",
]


def apply_step(conn: Any) -> None:
    cursor = conn.cursor()
    for statement in SQLITE if isinstance(conn, sqlite3.Connection) else POSTGRES:
        cursor.execute(statement)


steps = [step(apply_step)]
