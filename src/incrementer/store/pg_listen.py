"""API key changes pushed by PostgreSQL: LISTEN on a connection of its own, outside the pool.

`incrementer keys create/rotate/revoke` (PostgresStore) sends `NOTIFY incrementer_api_keys`
once its change is committed; every serving process listens and reloads its keys at once, so a
revoked key stops everywhere within milliseconds instead of within --auth-refresh. A notification
sent while a listener is disconnected is lost, so the listening connection is watched (a `SELECT
1` when it has been quiet for KEEPALIVE seconds: a peer gone without a word shows no other way),
reopened with backoff when it drops, and every reconnection reloads the keys, in case something
changed meanwhile; the periodic reload stays as the safety net behind all of it. An engine
without LISTEN (some PostgreSQL-compatible distributed databases) gets one log line and the
periodic reload only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from incrementer.store.pglink import connection_class, server_settings
from incrementer.urls import scrub

log = logging.getLogger("incrementer.auth")

CHANNEL = "incrementer_api_keys"
NOTIFY = f"SELECT pg_notify('{CHANNEL}', '')"
KEEPALIVE = 5.0
CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


async def listen(dsn: str, where: str, changed: Callable[[], None], timeout: float) -> None:
    """Call changed() on every notification (and after every reconnection) until cancelled.
    timeout: --database-timeout, which bounds a silent link here as on the pool's connections
    (keepalive and TCP_USER_TIMEOUT at both ends: store/pglink.py)."""
    backoff = BACKOFF_FIRST
    failing = False  # pragma: no mutate (None reads the same)
    while True:
        conn: Any = None
        try:
            conn = await asyncpg.connect(
                dsn,
                timeout=CONNECT_TIMEOUT,
                server_settings={
                    "application_name": "incrementer-listen",  # pragma: no mutate (any case)
                    **server_settings(timeout),
                },
                connection_class=connection_class(timeout),
            )
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            await conn.add_listener(CHANNEL, lambda *_notification: changed())
            if failing:
                log.info("listening for API key changes again (%s)", where)
            failing, backoff = False, BACKOFF_FIRST
            changed()  # whatever changed while nobody listened
            await _until_lost(conn, lost)
        except asyncpg.FeatureNotSupportedError as exc:
            log.warning(
                "%s cannot LISTEN (%s): API key changes reach this process with the reload "
                "every --auth-refresh only",
                where,
                exc,
            )
            return
        except ERRORS as exc:
            if not failing:
                log.warning(
                    "not listening for API key changes (%s: %s); reconnecting, and keys reload "
                    "every --auth-refresh meanwhile",
                    where,
                    scrub(str(exc), dsn) or type(exc).__name__,
                )
            failing = True
        finally:
            if conn is not None:
                conn.terminate()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)


async def _until_lost(conn: Any, lost: asyncio.Event) -> None:
    while True:
        try:
            await asyncio.wait_for(lost.wait(), KEEPALIVE)
        except TimeoutError:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), KEEPALIVE)  # pragma: no mutate
            continue
        raise ConnectionResetError("the listening connection closed")


async def notify(pool: Any) -> None:
    """Tell every listener the keys changed. Best effort: an engine without NOTIFY changes
    nothing here, and the periodic reload still carries the change."""
    try:
        await pool.execute(NOTIFY)
    except ERRORS as exc:
        log.debug("NOTIFY %s failed: %s", CHANNEL, exc)  # pragma: no mutate
