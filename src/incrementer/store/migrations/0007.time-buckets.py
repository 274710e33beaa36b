"""Counts per time bucket (--buckets minute,hour,day): store/buckets.py describes the layout.

- `counters` gains, per granularity, the key's inline bucket: `<g>_start` (the bucket's start,
  seconds since the epoch, UTC) and `<g>_value`. NULL until the key counts with that
  granularity kept, so a service run without --buckets writes and reads nothing new. On
  PostgreSQL also `<g>_out_start` and `<g>_out_value`: what the row's last bucketed upsert moved
  out of the inline bucket (a roll, or a delta for an earlier bucket), which the same statement
  reads back through RETURNING and writes to counter_buckets. Only the statement that wrote them
  reads them. Adding nullable columns without a default changes no row on either engine.
- `counter_buckets (key, granularity, bucket_start, value)`: every other bucket; granularity is
  the bucket's length in seconds (60, 3600, 86400). Its primary key holds `value` too (INCLUDE
  on PostgreSQL; SQLite stores the table in primary key order, WITHOUT ROWID), so a series is
  read from the index alone: rows are written about once per key and bucket, when a bucket
  rolls, so the updates a covering index turns into non-HOT ones are rare. Times are integer
  seconds rather than timestamps: a bucket's start is `t - t % length` in both engines, with no
  time zone to get wrong.
- `counter_buckets_expiry (granularity, bucket_start)`: what the retention sweep deletes by.
  Neither column changes once written, so it costs the flush no HOT update.
"""

import sqlite3
from typing import Any

from yoyo import step

__depends__ = {"0006.idempotency-keys"}

NAMES = ("minute", "hour", "day")

POSTGRES = [
    "ALTER TABLE counters "
    + ", ".join(
        f"ADD COLUMN {name}_{part} BIGINT"
        for name in NAMES
        for part in ("start", "value", "out_start", "out_value")
    ),
    """CREATE TABLE counter_buckets (
        key TEXT COLLATE "C" NOT NULL,
        granularity INTEGER NOT NULL,
        bucket_start BIGINT NOT NULL,
        value BIGINT NOT NULL,
        PRIMARY KEY (key, granularity, bucket_start) INCLUDE (value)
    )""",
    "CREATE INDEX counter_buckets_expiry ON counter_buckets (granularity, bucket_start)",
]
SQLITE = [
    *(
        f"ALTER TABLE counters ADD COLUMN {name}_{part} INTEGER"
        for name in NAMES
        for part in ("start", "value")
    ),
    """CREATE TABLE counter_buckets (
        key TEXT NOT NULL,
        granularity INTEGER NOT NULL,
        bucket_start INTEGER NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (key, granularity, bucket_start)
    ) WITHOUT ROWID""",
    "CREATE INDEX counter_buckets_expiry ON counter_buckets (granularity, bucket_start)",
]


def apply_step(conn: Any) -> None:
    cursor = conn.cursor()
    for statement in SQLITE if isinstance(conn, sqlite3.Connection) else POSTGRES:
        cursor.execute(statement)


steps = [step(apply_step)]
