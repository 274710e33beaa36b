"""Reading the write-ahead log: the frame format, segment scanning, replay and `summarize`.

A segment file `wal-<seq of its first frame, 20 digits>.log` holds frames whose seqs rise by one.
Frame, little-endian: MAGIC b"IWAL" | u32 payload_len | u64 seq | u32 crc32(seq bytes + payload) |
payload. Payload: repeated `u16 key_len | i64 value | key (UTF-8)`.

A frame that holds idempotent batches (POST /increments with an Idempotency-Key) starts with
MAGIC_KEYED b"IWAK" instead, and its payload is `u32 entries_len | entries (as above) | batches`,
each batch `u8 id_len | idempotency key (ASCII) | 32-byte SHA-256 digest | u32 offset | u32
length`: its increments are the entries at that byte range of the entries. Frames without
batches keep MAGIC and the format above byte for byte, so logs written before batches existed
read as they always did; a reader that predates MAGIC_KEYED stops at such a frame as damage
instead of misreading it.

A frame written while time buckets are on (--buckets) starts with MAGIC_TIMED b"IWAT", and its
payload is `i64 frame time (ms since the epoch) | u32 entries_len | entries | u32 count | count
times | batches (as in MAGIC_KEYED)`, each time `u32 offset | i64 ms`: the entry at that byte
offset of the entries happened then (an increment sent with its own "at"); every other entry of
the frame arrived at the frame time. Replay puts each increment back into the bucket it was
counted in. Frames of the two older kinds keep their format and replay as before (into the
totals only: they were accepted with buckets off); a reader that predates MAGIC_TIMED stops at
such a frame as damage.

Idempotent batches are scoped by their sender (store/base.py `scoped`: the principal, a newline,
the Idempotency-Key), which the one-byte ASCII key field cannot hold. A frame with batches is
therefore written as MAGIC_SCOPED b"IWAS" (the layout of MAGIC_KEYED) or MAGIC_TIMED_SCOPED
b"IWAU" (that of MAGIC_TIMED), whose batch records start `u16 id_len | scoped key (UTF-8)`
instead. Frames of the older kinds still read: their batches' keys get the principal no request
has (LEGACY_PRINCIPAL), as the rows stored before keys were scoped did. A timed frame without
batches is still MAGIC_TIMED, and a reader that predates the scoped magics stops at such a frame
as damage.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import zlib
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from incrementer.store.base import LEGACY_PRINCIPAL, scoped

MAGIC = b"IWAL"
MAGIC_KEYED = b"IWAK"
MAGIC_TIMED = b"IWAT"
MAGIC_SCOPED = b"IWAS"
MAGIC_TIMED_SCOPED = b"IWAU"
MAGICS = (MAGIC, MAGIC_KEYED, MAGIC_TIMED, MAGIC_SCOPED, MAGIC_TIMED_SCOPED)
TIMED_MAGICS = (MAGIC_TIMED, MAGIC_TIMED_SCOPED)
SCOPED_MAGICS = (MAGIC_SCOPED, MAGIC_TIMED_SCOPED)
_MAGIC_PREFIX = b"IWA"  # what both magics start with: how a scan finds the next frame
HEADER = struct.Struct("<4sIQI")
SEQ = struct.Struct("<Q")
ENTRY = struct.Struct("<Hq")
DIGEST_BYTES = 32
SCOPED_ID_LEN = struct.Struct("<H")
ENTRIES_LEN = struct.Struct("<I")
BATCH_RANGE = struct.Struct("<II")
FRAME_TIME = struct.Struct("<q")
TIMES_COUNT = struct.Struct("<I")
TIME = struct.Struct("<Iq")
_SEGMENT_NAME = re.compile(r"wal-(\d{20})\.log")
_ZERO_HEADER = bytes(HEADER.size)

Buffer = bytes | mmap.mmap


class WalCorruptError(Exception):
    """The log is damaged in a way a torn final write cannot explain; nothing was modified."""


def segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.log"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(first_seq, path) of every segment file in directory, oldest first; other files ignored."""
    found = []
    for path in directory.iterdir():
        match = _SEGMENT_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    found.sort()
    return found


def frame_at(buf: Buffer, offset: int) -> tuple[int, int] | str:
    """(seq, end offset) of the valid frame starting at offset, or why there is none."""
    size = len(buf)
    if size - offset < HEADER.size:
        return "incomplete frame header"
    magic, length, seq, crc = HEADER.unpack_from(buf, offset)
    if magic not in MAGICS:
        if buf[offset : offset + HEADER.size] == _ZERO_HEADER:
            return "zeros instead of a frame"
        return "bad magic"
    start = offset + HEADER.size
    end = start + length
    if end > size:
        return "incomplete payload"
    if zlib.crc32(buf[start:end], zlib.crc32(SEQ.pack(seq))) != crc:
        return "crc mismatch"
    return seq, end


def next_valid_frame(buf: Buffer, start: int) -> int | None:
    """Offset of the first valid frame at or after start, found by its magic; None if none."""
    pos = buf.find(_MAGIC_PREFIX, start)
    while pos != -1:
        if not isinstance(frame_at(buf, pos), str):
            return pos
        pos = buf.find(_MAGIC_PREFIX, pos + 1)
    return None


class KeyedBatch(NamedTuple):
    """One idempotent batch as the WAL holds it: its key, the digest of its increments, and
    those increments (also among the frame's entries)."""

    key: str
    """Scoped by its sender (store/base.py `scoped`)."""
    digest: str
    """Hex SHA-256 of the batch's entries in the encoding above (and of their own times, when
    any has one)."""
    entries: list[tuple[str, int]]
    times: list[int] = []
    """The bucket time (ms) of each of `entries`, in a MAGIC_TIMED frame; [] otherwise."""


class Payload(NamedTuple):
    """What one frame's payload holds."""

    entries: list[tuple[str, int]]
    batches: list[KeyedBatch]
    times: list[int]
    """The bucket time (ms since the epoch) of each entry, in a MAGIC_TIMED frame; [] in a frame
    written with buckets off."""


def decode_payload(payload: bytes, magic: bytes) -> Payload:
    """Every (key, value) entry of one frame payload, the idempotent batches among them and the
    entries' times; ValueError if the payload is malformed."""
    if magic == MAGIC:
        return Payload(decode_entries(payload), [], [])
    start = 0
    frame_ms = 0  # pragma: no mutate (read only in a timed frame, which sets it)
    timed = magic in TIMED_MAGICS
    if timed:
        if len(payload) < FRAME_TIME.size:
            raise ValueError("truncated frame time")
        frame_ms = FRAME_TIME.unpack_from(payload, 0)[0]
        start = FRAME_TIME.size
    entries_end = _entries_end(payload, start, len(payload))
    section = payload[start + ENTRIES_LEN.size : entries_end]
    offset = entries_end
    own: dict[int, int] = {}  # pragma: no mutate (read only in a timed frame, which sets it)
    if timed:
        own, offset = _own_times(payload, offset, len(section))
    entries, offsets = _entries_at(section)
    times = [own.get(at, frame_ms) for at in offsets] if timed else []
    batches = []
    scoped_ids = magic in SCOPED_MAGICS
    while offset < len(payload):
        key, key_end = _batch_key(payload, offset, scoped_ids)
        range_at = key_end + DIGEST_BYTES
        if range_at + BATCH_RANGE.size > len(payload):
            raise ValueError(f"batch record runs past the payload end at offset {offset}")
        first, length = BATCH_RANGE.unpack_from(payload, range_at)
        if first + length > len(section):
            raise ValueError(f"batch record at offset {offset} points past the entries")
        low, high = bisect_left(offsets, first), bisect_left(offsets, first + length)
        batches.append(
            KeyedBatch(key, payload[key_end:range_at].hex(), entries[low:high], times[low:high])
        )
        offset = range_at + BATCH_RANGE.size
    return Payload(entries, batches, times)


def _batch_key(payload: bytes, offset: int, scoped_ids: bool) -> tuple[str, int]:
    """The scoped key of the batch record at offset, and where the key ends."""
    if not scoped_ids:
        key_end = offset + 1 + payload[offset]
        key = payload[offset + 1 : key_end].decode("ascii")  # pragma: no mutate
        return scoped(LEGACY_PRINCIPAL, key), key_end
    if offset + SCOPED_ID_LEN.size > len(payload):
        raise ValueError(f"truncated batch key length at offset {offset}")
    start = offset + SCOPED_ID_LEN.size
    key_end = start + SCOPED_ID_LEN.unpack_from(payload, offset)[0]
    return payload[start:key_end].decode(), key_end


def _own_times(payload: bytes, offset: int, entries_bytes: int) -> tuple[dict[int, int], int]:
    """{entry offset: ms} of a MAGIC_TIMED payload's times at offset, and where they end."""
    if offset + TIMES_COUNT.size > len(payload):
        raise ValueError(f"truncated times count at offset {offset}")
    count: int = TIMES_COUNT.unpack_from(payload, offset)[0]
    offset += TIMES_COUNT.size
    end = offset + count * TIME.size
    if end > len(payload):
        raise ValueError(f"times run past the payload end at offset {offset}")
    own = {}
    for at, ms in TIME.iter_unpack(payload[offset:end]):
        if at >= entries_bytes:
            raise ValueError(f"a time points past the entries (offset {at})")
        own[at] = ms
    return own, end


def _entries_end(buf: Buffer, start: int, end: int) -> int:
    """Where the entries of the MAGIC_KEYED payload buf[start:end] end."""
    if end - start < ENTRIES_LEN.size:
        raise ValueError(f"truncated entries length at byte offset {start}")
    length: int = ENTRIES_LEN.unpack_from(buf, start)[0]
    entries_end = start + ENTRIES_LEN.size + length
    if entries_end > end:
        raise ValueError(f"entries length runs past the payload end at byte offset {start}")
    return entries_end


def decode_entries(payload: bytes) -> list[tuple[str, int]]:
    """The (key, value) entries of a payload of entries; ValueError if it is malformed."""
    return _entries_at(payload)[0]


def _entries_at(payload: bytes) -> tuple[list[tuple[str, int]], list[int]]:
    """The entries of a payload of entries and the byte offset of each."""
    entries = []
    offsets = []
    unpack = ENTRY.unpack_from
    offset, size = 0, len(payload)
    try:
        while offset < size:
            key_len, value = unpack(payload, offset)
            offsets.append(offset)
            start = offset + ENTRY.size
            offset = start + key_len
            if offset > size:
                raise ValueError(f"entry key runs past the payload end ({offset} > {size})")
            entries.append((payload[start:offset].decode(), value))
    except struct.error as exc:
        raise ValueError(f"truncated entry at payload offset {offset}") from exc
    return entries, offsets


def count_entries(buf: Buffer, start: int, end: int, magic: bytes = MAGIC) -> int:
    """How many entries the payload buf[start:end] of a frame with that magic holds;
    ValueError if it is malformed."""
    if magic in TIMED_MAGICS:
        start += FRAME_TIME.size
    if magic != MAGIC:
        end = _entries_end(buf, start, end)
        start += ENTRIES_LEN.size
    count = 0
    unpack = ENTRY.unpack_from
    offset = start
    while offset < end:
        if end - offset < ENTRY.size:
            raise ValueError(f"truncated entry at byte offset {offset}")
        key_len, _ = unpack(buf, offset)
        offset += ENTRY.size + key_len
        count += 1
    if offset != end:
        raise ValueError(f"entry key runs past the payload end at byte offset {end}")
    return count


@dataclass(slots=True)
class SegmentScan:
    """What one pass over a segment found: its good frames and the first damage, if any."""

    path: Path
    first_seq: int
    """From the file name; the first frame's seq must equal it."""
    size: int = 0
    frames: int = 0
    records: int = 0
    last_seq: int = 0
    """seq of the last good frame; first_seq - 1 when there is none."""
    valid_end: int = 0
    """Offset just past the last good frame."""
    damage: str | None = None
    """Why the bytes at damage_offset are not the next frame; None if the segment is clean."""
    damage_offset: int = 0
    tail_only: bool = True
    """True when no valid frame follows the damage and the seqs were in order: a torn tail."""
    resume_offset: int | None = None
    """Offset of a valid frame found after the damage, which rules out a torn tail."""
    problems: list[str] = field(default_factory=list)
    pending_after: int | None = None
    """With count_records: count the frames above this seq (not yet applied) apart."""
    pending_frames: int = 0
    pending_records: int = 0

    def describe_damage(self) -> str:
        where = f"{self.path}: {self.damage} at byte offset {self.damage_offset}"
        if self.resume_offset is not None:
            return f"{where}, yet a valid frame follows at byte offset {self.resume_offset}"
        return f"{where} ({self.size - self.damage_offset} bytes to the end of the file)"


def scan_segment(
    path: Path, first_seq: int, *, count_records: bool = False, pending_after: int | None = None
) -> SegmentScan:
    """Validate every frame of one segment file without modifying it."""
    scan = SegmentScan(
        path=path, first_seq=first_seq, last_seq=first_seq - 1, pending_after=pending_after
    )
    with path.open("rb") as file:
        scan.size = os.fstat(file.fileno()).st_size
        if scan.size == 0:
            return scan
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _scan_frames(buf, scan, count_records)
    return scan


def _scan_frames(buf: mmap.mmap, scan: SegmentScan, count_records: bool) -> None:
    offset = 0
    while offset < scan.size:
        found = frame_at(buf, offset)
        if isinstance(found, str):
            scan.damage, scan.damage_offset = found, offset
            scan.resume_offset = next_valid_frame(buf, offset + 1)
            scan.tail_only = scan.resume_offset is None
            return
        seq, end = found
        if seq != scan.last_seq + 1:
            scan.damage = f"frame seq {seq} where seq {scan.last_seq + 1} was expected"
            scan.damage_offset, scan.tail_only = offset, False
            return
        if count_records:
            try:
                magic = bytes(buf[offset : offset + len(MAGIC)])
                records = count_entries(buf, offset + HEADER.size, end, magic)
            except ValueError as exc:
                scan.problems.append(f"{scan.path}: frame seq {seq}: malformed payload: {exc}")
                records = 0
            scan.records += records
            if scan.pending_after is not None and seq > scan.pending_after:
                scan.pending_frames += 1
                scan.pending_records += records
        scan.frames += 1
        scan.last_seq = seq
        scan.valid_end = offset = end


class ReplaySegment(Protocol):
    """A segment as the writer tracks it; last_seq may grow while replay runs."""

    @property
    def path(self) -> Path: ...
    @property
    def last_seq(self) -> int: ...


class Frame(NamedTuple):
    seq: int
    entries: list[tuple[str, int]]
    """Every increment of the frame, those of its idempotent batches included."""
    batches: list[KeyedBatch]
    times: list[int] = []
    """The bucket time (ms since the epoch) of each entry; [] in a frame written with buckets
    off."""


def replay_segments(
    segments: Iterable[ReplaySegment], after_seq: int
) -> Iterator[tuple[int, list[tuple[str, int]]]]:
    """(seq, entries) of every frame with seq > after_seq (see replay_frames)."""
    for frame in replay_frames(segments, after_seq):
        yield frame.seq, frame.entries


def replay_frames(segments: Iterable[ReplaySegment], after_seq: int) -> Iterator[Frame]:
    """Every frame with seq > after_seq, one frame in memory at a time.

    The frames after after_seq must be after_seq + 1, after_seq + 2, ...: a hole means increments
    that the database has not applied are gone, and that is an error, not something to skip.
    """
    expected = after_seq + 1
    for segment in segments:
        if segment.last_seq <= after_seq:
            continue
        with segment.path.open("rb") as file:
            offset = 0
            while header := file.read(HEADER.size):
                if len(header) < HEADER.size:
                    raise _replay_error(segment.path, offset, "incomplete frame header")
                magic, length, seq, crc = HEADER.unpack(header)
                if magic not in MAGICS:
                    raise _replay_error(segment.path, offset, "bad magic")
                if seq <= after_seq:
                    file.seek(length, os.SEEK_CUR)
                    offset += HEADER.size + length
                    continue
                payload = file.read(length)
                if len(payload) < length:
                    raise _replay_error(segment.path, offset, "incomplete payload")
                if zlib.crc32(payload, zlib.crc32(SEQ.pack(seq))) != crc:
                    raise _replay_error(segment.path, offset, "crc mismatch")
                if seq != expected:
                    raise _replay_error(
                        segment.path,
                        offset,
                        f"frame seq {seq} where seq {expected} was expected: frames "
                        f"{expected}..{seq - 1} are missing (a deleted segment, or a database "
                        f"whose applied seq {after_seq} is behind this log)",
                    )
                try:
                    decoded = decode_payload(payload, magic)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise _replay_error(segment.path, offset, f"malformed payload: {exc}") from exc
                yield Frame(seq, decoded.entries, decoded.batches, decoded.times)
                expected = seq + 1
                offset += HEADER.size + length


def _replay_error(path: Path, offset: int, reason: str) -> WalCorruptError:
    return WalCorruptError(
        f"{path}: {reason} at byte offset {offset} during replay; the log was left untouched"
    )


class SegmentSummary(NamedTuple):
    name: str
    bytes: int
    first_seq: int
    last_seq: int
    frames: int
    records: int
    pending_frames: int | None = None
    """Frames above the database's applied seq; None when it was not asked."""
    pending_records: int | None = None


@dataclass(frozen=True, slots=True)
class WalSummary:
    """Figures for `incrementer wal inspect`; plain fields, so msgspec can encode it as JSON."""

    segments: list[SegmentSummary]
    frames: int
    records: int
    bytes: int
    first_seq: int
    """seq of the oldest frame on disk, 0 if there is none."""
    last_seq: int
    torn_tail: str | None
    """The damage WriteAheadLog.open would truncate off with a warning, if any."""
    problems: list[str]
    """Damage that would make WriteAheadLog.open raise WalCorruptError; empty when healthy."""
    applied_seq: int | None = None
    """The database's applied seq for this log's node, when it was asked; frames at or below it
    are applied and stay on disk only until their whole segment is."""
    pending_frames: int | None = None
    pending_records: int | None = None


def summarize(directory: Path, applied_seq: int | None = None) -> WalSummary:
    """Read-only figures for every segment in directory; reports damage instead of raising.
    With applied_seq, the frames and increments above it (pending) are counted apart."""
    if not directory.is_dir():
        raise FileNotFoundError(f"WAL directory {directory} does not exist")
    found = list_segments(directory)
    segments: list[SegmentSummary] = []
    problems: list[str] = []
    torn_tail: str | None = None
    first_seq = last_seq = 0
    for index, (name_seq, path) in enumerate(found):
        scan = scan_segment(path, name_seq, count_records=True, pending_after=applied_seq)
        problems.extend(scan.problems)
        is_last = index == len(found) - 1
        if scan.damage is not None:
            if scan.tail_only and is_last:
                torn_tail = scan.describe_damage()
            else:
                problems.append(scan.describe_damage())
        if scan.frames and last_seq and scan.first_seq <= last_seq:
            problems.append(f"{path}: starts at seq {scan.first_seq}, not after seq {last_seq}")
        if not scan.frames and not is_last:
            problems.append(f"{path}: no frames, yet later segments exist")
        if scan.frames:
            first_seq = first_seq or scan.first_seq
            last_seq = scan.last_seq
        pending = (
            (None, None) if applied_seq is None else (scan.pending_frames, scan.pending_records)
        )
        segments.append(
            SegmentSummary(
                path.name,
                scan.size,
                scan.first_seq,
                scan.last_seq,
                scan.frames,
                scan.records,
                *pending,
            )
        )
    return WalSummary(
        segments=segments,
        frames=sum(s.frames for s in segments),
        records=sum(s.records for s in segments),
        bytes=sum(s.bytes for s in segments),
        first_seq=first_seq,
        last_seq=last_seq,
        torn_tail=torn_tail,
        problems=problems,
        applied_seq=applied_seq,
        pending_frames=None
        if applied_seq is None
        else sum(s.pending_frames or 0 for s in segments),
        pending_records=(
            None if applied_seq is None else sum(s.pending_records or 0 for s in segments)
        ),
    )
