"""The SQLite file under a running service: replaced or deleted behind its back, or changed by
another process.

SQLite keeps writing to the file it opened. Deleted (or replaced by a restored copy) while the
service runs, that file is an unlinked inode nobody will ever read again: every flush would be
committed into it, and the ledger with it, and lost at the next start. So before each flush and
each idle ping the path is checked to still name the file the connections opened; when it does
not, the flush refuses (the batch stays in memory and the WAL), /readyz says why, and a restart
opens whatever the path names now, replaying the WAL into it exactly once.

`PRAGMA data_version` moves whenever another connection commits to the file (another process,
or this one's own writer): read every WATCH_EVERY seconds, it is how the API keys a command
changed reach every process on the host without waiting for --auth-refresh.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Awaitable, Callable

from incrementer.store.base import BackendError

WATCH_EVERY = 0.2
DATA_VERSION = "PRAGMA data_version"


def create_private(path: str) -> None:
    """Create the database file readable by its owner only (0600, whatever the umask) before
    SQLite or yoyo opens it: it holds the API keys' hashes, and SQLite gives its -wal and -shm
    files the main file's mode. An existing file is left as it is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # SQLite's own open reports what is wrong with the path, in its words
    os.close(fd)


class DatabaseFile:
    """The identity (device, inode) of the file the connections opened."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.identity: tuple[int, int] | None = None

    def remember(self) -> None:
        """Just after the first connection opened (and so created) the file."""
        found = os.stat(self.path)
        self.identity = (found.st_dev, found.st_ino)

    def check(self) -> None:
        """BackendError when the path no longer names the file the connections write to."""
        if self.identity is None:
            return
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            raise BackendError(self._gone("was deleted")) from None
        except OSError as exc:
            raise BackendError(f"SQLite {self.path}: cannot check the file: {exc}") from exc
        if (found.st_dev, found.st_ino) != self.identity:
            raise BackendError(self._gone("was replaced by another file"))

    def _gone(self, what: str) -> str:
        return (
            f"SQLite {self.path} {what} while the service ran: flushes are refused, as they "
            "would go to a file no one will read again; unflushed increments stay in the WAL. "
            "Put the file back, or restart the service to open what the path names now"
        )


async def watch_data_version(
    read: Callable[[Callable[[sqlite3.Connection], int]], Awaitable[int]],
    changed: Callable[[], None],
) -> None:
    """Call changed() each time the file's data_version moved since the last look (`read` runs
    a query on the store's reading connection), until cancelled."""
    seen: int | None = None
    while True:
        version: int | None
        try:
            version = await read(_data_version)
        except BackendError:
            version = seen  # a failing database: the periodic reload reports it
        if seen is not None and version != seen:
            changed()
        seen = version
        await asyncio.sleep(WATCH_EVERY)


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute(DATA_VERSION).fetchall()[0][0])
