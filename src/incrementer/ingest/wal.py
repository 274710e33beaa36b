"""The write-ahead log: every accepted increment is on disk before it is acknowledged.

Increments appended during one event-loop tick share one frame; `seal()` gives the frame the next
seq, and the flusher cuts the coalescing buffer at that seq. The database records the applied seq
in the same transaction as the batch, so on restart `replay(applied_seq)` returns exactly the
increments the database has not seen. The frame format lives in `wal_reader`; the seq contract
it meets (`SequencedLog`) and its memory-mode twin in `sequence`.

Threads: everything runs on the event-loop thread except `sync()`, which may run in a worker
thread at the same time as append/seal/write, and `recycle()`, which may too.

Failures (the policy is the ack gate's, durability.py; these are the means):
- a failed write leaves the unwritten frames in memory; `discard_unwritten()` drops them and
  returns their increments, so the caller can take them back (they were never logged);
- a failed fdatasync may have lost pages the kernel then marks clean, so syncing the same file
  again can report success without the data (PostgreSQL's "fsyncgate"). `abandon_segment()`
  stops using that file: it is never synced or appended to again, the next write starts a new
  segment, and the caller makes what was written to it durable another way.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import time_ns
from types import TracebackType
from typing import Final

from mypy_extensions import mypyc_attr

from incrementer.ingest.sequence import SequencedLog
from incrementer.ingest.wal_reader import (
    BATCH_RANGE,
    ENTRIES_LEN,
    ENTRY,
    FRAME_TIME,
    HEADER,
    MAGIC,
    MAGIC_SCOPED,
    MAGIC_TIMED,
    MAGIC_TIMED_SCOPED,
    SCOPED_ID_LEN,
    SEQ,
    TIME,
    TIMES_COUNT,
    Frame,
    WalCorruptError,
    WalSummary,
    decode_payload,
    list_segments,
    replay_frames,
    replay_segments,
    scan_segment,
    segment_name,
    summarize,
)

__all__ = [
    "SegmentIO",
    "WalCorruptError",
    "WalLockedError",
    "WalSummary",
    "WriteAheadLog",
    "summarize",
]

log = logging.getLogger("incrementer.wal")

# Final: the compiled module (setup.py) keeps these in C statics, not in the module's dict.
_pack_entry: Final = ENTRY.pack
_pack_seq: Final = SEQ.pack
_pack_header: Final = HEADER.pack
_pack_entries_len: Final = ENTRIES_LEN.pack
_pack_batch_range: Final = BATCH_RANGE.pack
_pack_scoped_id_len: Final = SCOPED_ID_LEN.pack
_pack_frame_time: Final = FRAME_TIME.pack
_pack_times_count: Final = TIMES_COUNT.pack
_pack_time: Final = TIME.pack
_TIME_BYTES: Final = TIME.size
_crc32: Final = zlib.crc32
_NEW_SEGMENT: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL


@mypyc_attr(native_class=False)  # compiled (setup.py): a native class cannot subclass OSError
class WalLockedError(OSError):
    """Another WriteAheadLog (in this or another process) has the directory open."""


@mypyc_attr(allow_interpreted_subclasses=True)
class SegmentIO:
    """The system calls the log makes on its files. Tests substitute a subclass that fails
    like a full or broken disk (ENOSPC, EIO); a compiled class cannot be patched otherwise."""

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)


PROBE_NAME: Final = "probe"
_PROBE_PAGE: Final = bytes(4096)


@dataclass(eq=False, slots=True)
class _Segment:
    path: Path
    first_seq: int
    last_seq: int
    size: int


class WriteAheadLog(SequencedLog):
    """Segment files of sealed frames in one directory, locked against a second writer."""

    def __init__(
        self, directory: Path, dir_fd: int, segments: list[_Segment], segment_bytes: int
    ) -> None:
        """Use WriteAheadLog.open(); this takes ownership of dir_fd and the recovered segments."""
        super().__init__()
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._dir_fd = dir_fd
        self._segments = segments
        self._fd = os.open(segments[-1].path, os.O_WRONLY | os.O_APPEND) if segments else -1
        self._next_seq = segments[-1].last_seq + 1 if segments else 1
        self._frame = bytearray()  # entries of the open frame
        self._batches = bytearray()  # the open frame's idempotent batches: sealed as MAGIC_SCOPED
        self._times = bytearray()  # the open frame's entries with a time of their own (MAGIC_TIMED)
        self._pending = bytearray()  # sealed frames not yet written
        self._pending_first_seq = 0
        self._pending_last_seq = 0
        self._new_segment_needed = False  # advance_to left a seq gap, which must fall between files
        self._written_bytes = 0
        self._synced_bytes = 0
        # _lock guards the fields sync() and recycle() share with the loop thread: _fd,
        # _rotated_fds, _segments, _dir_dirty, _closed. _sync_lock keeps one sync at a time, so
        # a rotated fd is closed only by the sync that fdatasynced it.
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._rotated_fds: list[int] = []
        self._abandoned_fds: set[int] = set()  # never fdatasynced again (abandon_segment)
        self._dir_dirty = False
        self._closed = False
        self.io = SegmentIO()

    @classmethod
    def open(cls, directory: Path, *, segment_bytes: int = 64 * 2**20) -> WriteAheadLog:
        """Validate every segment, drop a torn tail, and return a log that appends after it."""
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        if not directory.is_dir():
            directory.mkdir(mode=0o700, parents=True)  # segments are the data: owner only
            _fsync_dir(directory.parent)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WalLockedError(
                    f"WAL directory {directory} is in use by another WriteAheadLog "
                    "(is a second incrementer running on the same data directory?)"
                ) from None
            segments = _recover(directory, dir_fd)
            return cls(directory, dir_fd, segments, segment_bytes)
        except BaseException:
            os.close(dir_fd)
            raise

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def last_seq(self) -> int:
        """seq of the last sealed frame, or the floor set by advance_to if that is higher."""
        return self._next_seq - 1

    @property
    def written_bytes(self) -> int:
        """Bytes handed to the OS since open."""
        return self._written_bytes

    @property
    def synced_bytes(self) -> int:
        """How much of written_bytes the last completed sync() made durable."""
        return self._synced_bytes

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def bytes_on_disk(self) -> int:
        return sum(segment.size for segment in self._segments)

    def advance_to(self, seq: int) -> None:
        """Make the next frame's seq greater than seq (the database's applied seq at start)."""
        if seq < self._next_seq:
            return
        # Sealed frames keep their seqs; the gap after them must be a segment boundary, because
        # inside a segment a gap is damage.
        self._write_pending()
        self._next_seq = seq + 1
        if self._segments and self._segments[-1].size:
            self._new_segment_needed = True

    def replay(self, after_seq: int) -> Iterator[tuple[int, list[tuple[str, int]]]]:
        """(seq, entries) of every written frame with seq > after_seq, oldest first, streamed."""
        with self._lock:
            segments = list(self._segments)
        return replay_segments(segments, after_seq)

    def replay_frames(self, after_seq: int) -> Iterator[Frame]:
        """Like replay, with each frame's idempotent batches as well."""
        with self._lock:
            segments = list(self._segments)
        return replay_frames(segments, after_seq)

    def append(self, key: bytes, value: int) -> None:
        """Add one increment to the open frame. The hot path: no syscall, no check."""
        frame = self._frame
        frame += _pack_entry(len(key), value)
        frame += key

    def append_at(self, key: bytes, value: int, at_ms: int) -> None:
        """append() of an increment that carries its own time (ms since the epoch): the frame
        records it beside the entry, so replay counts it in the bucket it was counted in."""
        frame = self._frame
        self._times += _pack_time(len(frame), at_ms)
        frame += _pack_entry(len(key), value)
        frame += key

    def append_many(
        self, items: Sequence[tuple[bytes, str, int]], times: Sequence[int] = ()
    ) -> None:
        """append(key bytes, value) of every (key bytes, key, value), in one call; `times`, when
        given, holds each item's own time in ms (0: none, the frame's time applies)."""
        frame = self._frame
        pack = _pack_entry
        if times:
            own = self._times
            for (key, _, value), at_ms in zip(items, times, strict=True):
                if at_ms:
                    own += _pack_time(len(frame), at_ms)
                frame += pack(len(key), value)
                frame += key
            return
        for key, _, value in items:
            frame += pack(len(key), value)
            frame += key

    def append_batch(
        self,
        key: bytes,
        digest: bytes,
        encoded: bytes,
        times: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Add an idempotent batch to the open frame: its entries, already encoded as append()
        would (they are what the digest is of), and a record of its key (scoped by its sender,
        UTF-8), digest and where its entries are. `times`: (offset in encoded, ms) of its
        entries that carry their own time."""
        frame = self._frame
        base = len(frame)
        if times:
            own = self._times
            for offset, at_ms in times:
                own += _pack_time(base + offset, at_ms)
        batches = self._batches
        batches += _pack_scoped_id_len(len(key))
        batches += key
        batches += digest
        batches += _pack_batch_range(base, len(encoded))
        frame += encoded

    def seal(self) -> int:
        """Close the open frame, if it has entries, under the next seq; return last_seq."""
        frame = self._frame
        if frame:
            seq = self._next_seq
            self._next_seq = seq + 1
            magic = MAGIC
            if self._times and not self.frame_ms:
                # Own times without a frame time would leave the frame's other entries without
                # a bucket: the intake stamps first, this only keeps the format whole.
                self.frame_ms = time_ns() // 1_000_000
            if self.frame_ms:
                magic = MAGIC_TIMED_SCOPED if self._batches else MAGIC_TIMED
                times = self._times
                frame[:0] = _pack_frame_time(self.frame_ms) + _pack_entries_len(len(frame))
                frame += _pack_times_count(len(times) // _TIME_BYTES)
                frame += times
                frame += self._batches
                times.clear()
                self._batches.clear()
            elif self._batches:
                magic = MAGIC_SCOPED
                frame[:0] = _pack_entries_len(len(frame))
                frame += self._batches
                self._batches.clear()
            crc = _crc32(frame, _crc32(_pack_seq(seq)))
            self._pending += _pack_header(magic, len(frame), seq, crc)
            self._pending += frame
            frame.clear()
            if not self._pending_first_seq:
                self._pending_first_seq = seq
            self._pending_last_seq = seq
        self.frame_ms = 0
        return self._next_seq - 1

    def write(self) -> int:
        """Seal, then hand every sealed frame to the OS; survives kill -9 once this returns."""
        self.seal()
        return self._write_pending()

    def _write_pending(self) -> int:
        pending = self._pending
        if not pending:
            return 0
        if self._closed:
            raise ValueError(f"WAL {self.directory} is closed")
        if (
            self._fd < 0
            or self._new_segment_needed
            or self._segments[-1].size >= self.segment_bytes
        ):
            self._start_segment(self._pending_first_seq)
        fd, segment, total = self._fd, self._segments[-1], len(pending)
        done = 0
        io = self.io
        try:
            with memoryview(pending) as view:
                while done < total:
                    # Released at once, even when the write raises: a slice kept alive by the
                    # traceback would pin the buffer, and discard_unwritten() must clear it.
                    with view[done:] as rest:
                        done += io.write(fd, rest)
        except BaseException:
            if done:
                # A partial frame followed by later frames would read as damage on the next
                # open; cut it off so a retry of this write starts at a frame boundary.
                io.ftruncate(fd, segment.size)
            raise
        pending.clear()
        segment.size += total
        segment.last_seq = self._pending_last_seq
        self._pending_first_seq = 0
        self._written_bytes += total
        return total

    def _start_segment(self, first_seq: int) -> None:
        path = self.directory / segment_name(first_seq)
        fd = os.open(path, _NEW_SEGMENT, 0o600)
        with self._lock:
            if self._fd >= 0:
                self._rotated_fds.append(self._fd)
            self._fd = fd
            self._segments.append(_Segment(path, first_seq, first_seq - 1, 0))
            self._dir_dirty = True
        self._new_segment_needed = False

    def sync(self) -> None:
        """fdatasync everything written so far. Safe in a worker thread alongside write()."""
        with self._sync_lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        with self._lock:
            if self._closed:
                return
            target = self._written_bytes
            rotated, self._rotated_fds = self._rotated_fds, []
            fd = -1 if self._fd in self._abandoned_fds else self._fd
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        try:
            for old_fd in rotated:
                if old_fd not in self._abandoned_fds:
                    self.io.fdatasync(old_fd)
            if fd >= 0:
                self.io.fdatasync(fd)
            if dir_dirty:
                os.fsync(self._dir_fd)
        except OSError:
            with self._lock:
                self._dir_dirty = self._dir_dirty or dir_dirty
            raise
        finally:
            for old_fd in rotated:
                os.close(old_fd)
                self._abandoned_fds.discard(old_fd)
        self._synced_bytes = max(self._synced_bytes, target)

    def abandon_segment(self) -> int:
        """After a failed sync: never sync or append to the active segment again (the next
        write starts a new one). Returns the seq of the last frame written so far: everything up
        to it must be made durable some other way. Call on the event-loop thread."""
        with self._lock:
            if self._fd >= 0:  # pragma: no mutate
                self._abandoned_fds.add(self._fd)
                self._new_segment_needed = True
        return self._segments[-1].last_seq if self._segments else 0

    def discard_unwritten(self) -> tuple[list[tuple[str, int, int]], list[str]]:
        """After write() failed: drop the frames not handed to the OS and return their entries
        (key, value, bucket time in ms or 0) and the keys of their idempotent batches (the
        caller takes those back: they were never logged). Their seqs are handed out again, so
        the log stays gapless."""
        entries: list[tuple[str, int, int]] = []
        batch_keys: list[str] = []
        self.seal()  # the open frame too, so every payload reads the same way
        pending = bytes(self._pending)
        offset = 0
        while offset < len(pending):
            magic, length, _, _ = HEADER.unpack_from(pending, offset)
            start = offset + HEADER.size
            decoded = decode_payload(pending[start : start + length], magic)
            times = decoded.times or [0] * len(decoded.entries)
            for (key, value), at_ms in zip(decoded.entries, times, strict=True):
                entries.append((key, value, at_ms))
            batch_keys.extend(batch.key for batch in decoded.batches)
            offset = start + length
        if self._pending_first_seq:
            self._next_seq = self._pending_first_seq
        self._pending.clear()
        self._pending_first_seq = 0
        return entries, batch_keys

    def probe(self) -> None:
        """Write and fdatasync one page in a scratch file beside the segments, then remove it:
        raises OSError while the disk still refuses. Safe in a worker thread."""
        path = self.directory / PROBE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # pragma: no mutate
        try:
            with memoryview(_PROBE_PAGE) as view:
                done = 0
                while done < len(view):
                    done += self.io.write(fd, view[done:])
            self.io.fdatasync(fd)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)  # pragma: no mutate

    def recycle(self, applied_seq: int) -> int:
        """Delete the segments whose every frame is <= applied_seq, never the active one.

        The next sync() makes the deletions durable. Until then a crash can only bring back
        fully applied segments, which replay skips and the next recycle deletes again.
        """
        with self._lock:
            if self._closed:
                return 0
            doomed = [s for s in self._segments[:-1] if s.last_seq <= applied_seq]
            if not doomed:
                return 0
            self._segments = [s for s in self._segments if s not in doomed]
            self._dir_dirty = True
        for segment in doomed:
            segment.path.unlink(missing_ok=True)
        return len(doomed)

    def close(self) -> None:
        """Write and sync everything, then release the files and the directory lock."""
        if self._closed:
            return
        self.write()
        with self._sync_lock:
            self._sync_locked()
            with self._lock:
                self._closed = True
                fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)
            os.close(self._dir_fd)


def _recover(directory: Path, dir_fd: int) -> list[_Segment]:
    """Validate every segment; truncate a torn tail off the last one. Raise before changing any."""
    found = list_segments(directory)
    segments: list[_Segment] = []
    for index, (name_seq, path) in enumerate(found):
        is_last = index == len(found) - 1
        scan = scan_segment(path, name_seq)
        if scan.damage is not None and not (scan.tail_only and is_last):
            where = "" if is_last else " in a segment that is not the last one"
            raise WalCorruptError(
                f"{scan.describe_damage()}{where}: this is not a torn final write. "
                "The log was left untouched; inspect it with `incrementer wal inspect`."
            )
        if segments and scan.first_seq <= segments[-1].last_seq:
            raise WalCorruptError(
                f"{path}: starts at seq {scan.first_seq} (byte offset 0), not after seq "
                f"{segments[-1].last_seq} where {segments[-1].path.name} ends. "
                "The log was left untouched."
            )
        if not scan.frames and not is_last:
            raise WalCorruptError(
                f"{path}: no frames from byte offset 0, yet later segments exist. "
                "The log was left untouched."
            )
        if scan.damage is not None:
            log.warning(
                "WAL torn tail dropped: %s; the %d frames before it are intact",
                scan.describe_damage(),
                scan.frames,
            )
            os.truncate(path, scan.valid_end)
            _fsync_file(path)
        if scan.frames:
            segments.append(_Segment(path, scan.first_seq, scan.last_seq, scan.valid_end))
        else:
            # A last segment without frames (created, then the process died) would carry a name
            # that may not match the seq of the next frame written: start that one afresh.
            path.unlink()
            os.fsync(dir_fd)
    return segments


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
