"""The node's data directory: an exclusive lock, a stable node id, and the retired mark."""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from pathlib import Path

log = logging.getLogger("incrementer")

RETIRED = "RETIRED"
"""Written by a drain (drain.py) once everything in the WAL is in the database."""
DATABASE = "DATABASE"
"""The database the node applies its WAL to (urls.database_identity), recorded at each start."""


class DataDirError(Exception):
    pass


class DataDir:
    """Holds `<dir>/LOCK` for the life of the process, so two nodes never share one WAL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wal_path = path / "wal"
        self._lock_fd = -1
        self.node_id = ""

    def open(self) -> None:
        """Lock the directory and take its node id (a new one the first time): a node serves
        from it now, so a retired mark left by an earlier drain no longer holds."""
        self.lock()
        self.node_id = self._node_id()
        retired = self.path / RETIRED
        if retired.exists():
            retired.unlink()
            log.info(
                "data dir %s was retired; serving from it again (node %s)", self.path, self.node_id
            )

    def lock(self) -> None:
        """Only the lock: a supervisor holds its data dir this way, and a drain before it reads
        the node id (it never creates one)."""
        check_is_directory(self.path)
        try:
            # Owner only, whatever the umask: the WAL holds every increment not yet flushed.
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DataDirError(f"cannot use data dir {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise DataDirError(
                f"data dir {self.path} is locked by another incrementer process; give each "
                "process its own --data-dir"
            ) from None

    def existing_node_id(self) -> str:
        """The node id if a node ever served from this directory, else ""."""
        try:
            return (self.path / "node_id").read_text().strip()
        except FileNotFoundError:
            return ""

    def _node_id(self) -> str:
        node_id = self.existing_node_id()
        if node_id:
            return node_id
        path = self.path / "node_id"
        node_id = uuid.uuid4().hex
        tmp = path.with_suffix(".tmp")
        write_private(tmp, node_id + "\n", sync=True)
        os.replace(tmp, path)
        return node_id

    def close(self) -> None:
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1


def claim_database(data_dir: DataDir, identity: str, applied_seq: int) -> None:
    """Record that data_dir's node applies its WAL to the database `identity`, refusing a
    database that is not the one recorded when that would count twice: this one has applied
    nothing of the node's (applied_seq 0) while the WAL holds frames, which the database they
    were written for may already have (a WAL keeps applied frames until its segment is
    recycled). The same database under another name has applied some, and passes."""
    recorded_at = data_dir.path / DATABASE
    try:
        recorded = recorded_at.read_text().strip()
    except FileNotFoundError:
        recorded = ""
    if recorded == identity:
        return
    if recorded and applied_seq == 0 and _holds_frames(data_dir.wal_path):
        raise DataDirError(
            f"data dir {data_dir.path} belongs to another database ({recorded}): its WAL holds "
            f"increments written for that one, and {identity} has applied none of them, so "
            "they would count again here. Give this database its own --data-dir; if it is the "
            f"same database under another name, delete {recorded_at}"
        )
    tmp = recorded_at.with_suffix(".tmp")
    write_private(tmp, identity + "\n")
    os.replace(tmp, recorded_at)


def write_private(path: Path, text: str, sync: bool = False) -> None:
    """Write a small file readable by the owner only (0600 whatever the umask), replacing
    any file there; sync: fsync it before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover file keeps its mode through O_CREAT: set it
        os.write(fd, text.encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _holds_frames(wal_path: Path) -> bool:
    from incrementer.ingest.wal_reader import summarize

    return wal_path.is_dir() and summarize(wal_path).frames > 0


def check_is_directory(path: Path) -> None:
    """A data dir that names something else (a file, often the database file by mistake) is
    refused in those words, not with the file system's `File exists`."""
    if path.exists() and not path.is_dir():
        raise DataDirError(
            f"data dir {path} is not a directory (--data-dir names a directory for the WAL, "
            "the node id and the lock)"
        )


def peek_node_id(path: Path) -> str | None:
    """The node id a data dir holds, read without locking or creating anything (`wal inspect`
    runs beside the live process); None if it has none yet."""
    try:
        return (path / "node_id").read_text().strip() or None
    except FileNotFoundError:
        return None
