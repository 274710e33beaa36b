"""Apply the packaged SQL migrations with yoyo, on either engine.

Synchronous on purpose: it runs once at start, before serving, and the caller puts it in a thread.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from urllib.parse import quote

from incrementer.store.base import BackendError
from incrementer.store.sqlite import check_directory
from incrementer.store.sqlite_file import create_private
from incrementer.urls import parse_database_url, redact_url, scrub

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def migrate(
    url: str, lock_timeout: float = 60.0, connect_timeout: int = 10, until: str | None = None
) -> list[str]:
    """Apply pending migrations to the database at url; return the ids applied, in order.
    `until` stops after the migration with that id (tests build an older schema with it).

    Idempotent. Concurrent callers (several processes starting at once) serialize on yoyo's lock
    table; one waits up to lock_timeout seconds for the other. Raises BackendError, naming the URL
    without its password, when the database cannot be reached or a migration fails.
    """
    import yoyo
    from yoyo.exceptions import LockTimeout

    engine, target = parse_database_url(url)
    db_errors: tuple[type[Exception], ...]
    if engine == "sqlite":
        yoyo_url = _sqlite_yoyo_url(target)
        db_errors = (sqlite3.Error,)
    else:
        import psycopg

        yoyo_url = _postgres_yoyo_url(target, connect_timeout)
        db_errors = (psycopg.Error,)

    where = redact_url(url)
    try:
        backend = yoyo.get_backend(yoyo_url)
    except (*db_errors, OSError) as exc:
        raise BackendError(
            f"cannot reach database {where} to migrate: {scrub(str(exc), url)}"
        ) from exc
    try:
        migrations = yoyo.read_migrations(str(MIGRATIONS_DIR))
        if until is not None:
            migrations = migrations.filter(lambda m: str(m.id) <= until)
        with backend.lock(timeout=lock_timeout):
            pending = backend.to_apply(migrations)
            applied = [str(m.id) for m in pending]
            if applied:
                log.info("applying migrations %s to %s", ", ".join(applied), where)
                backend.apply_migrations(pending)
        return applied
    except LockTimeout as exc:
        raise BackendError(f"migrating {where}: {exc}") from exc
    except (*db_errors, OSError) as exc:
        raise BackendError(f"migrating {where} failed: {scrub(str(exc), url)}") from exc
    finally:
        backend.connection.close()


def _sqlite_yoyo_url(path: str) -> str:
    # yoyo opens `file:<path>?cache=shared` as an SQLite URI, which percent-decodes: quoting keeps
    # names containing '?', '#' or '%' intact.
    check_directory(path)
    create_private(path)
    return "sqlite:///" + quote(path)  # pragma: no mutate (yoyo lowercases the scheme)


def _postgres_yoyo_url(dsn: str, connect_timeout: int) -> str:
    # psycopg 3 backend (psycopg2 is not a dependency). libpq waits forever for a silent host
    # unless told otherwise; yoyo passes query parameters through to psycopg.connect.
    rest = dsn.partition("://")[2]
    if "connect_timeout=" not in rest:
        rest += ("&" if "?" in rest else "?") + f"connect_timeout={connect_timeout}"
    return "postgresql+psycopg://" + rest  # pragma: no mutate (yoyo lowercases the scheme)
