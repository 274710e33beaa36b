"""The write-ahead log on real files: round trips, seqs, rotation, recycling, recovery, inspect."""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import hand_frame

from incrementer.ingest import idempotency
from incrementer.ingest.sequence import MemorySequence
from incrementer.ingest.validate import Validated
from incrementer.ingest.wal import (
    SegmentIO,
    WalCorruptError,
    WalLockedError,
    WriteAheadLog,
    summarize,
)
from incrementer.ingest.wal_reader import (
    BATCH_RANGE,
    ENTRIES_LEN,
    ENTRY,
    FRAME_TIME,
    HEADER,
    MAGIC,
    MAGIC_KEYED,
    MAGIC_SCOPED,
    MAGIC_TIMED,
    TIME,
    TIMES_COUNT,
    count_entries,
    decode_payload,
    replay_frames,
    scan_segment,
    segment_name,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Frame = list[tuple[str, int]]


def untimed(entries: Frame) -> list[tuple[str, int, int]]:
    """The entries as discard_unwritten() returns those of a frame written with buckets off."""
    return [(key, value, 0) for key, value in entries]


def write_frames(wal: WriteAheadLog, frames: list[Frame]) -> None:
    """Append each frame's entries and write it as one frame."""
    for entries in frames:
        for key, value in entries:
            wal.append(key.encode(), value)
        wal.write()


def replay_all(directory: Path, after_seq: int = 0) -> list[tuple[int, Frame]]:
    with WriteAheadLog.open(directory) as wal:
        return list(wal.replay(after_seq))


def frame_offsets(path: Path) -> list[int]:
    """Byte offset of every frame in a clean segment file."""
    data, offsets, offset = path.read_bytes(), [], 0
    while offset < len(data):
        offsets.append(offset)
        _, length, _, _ = HEADER.unpack_from(data, offset)
        offset += HEADER.size + length
    return offsets


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("wal-*.log"))


FRAMES: list[Frame] = [
    [("a", 1), ("b", -2)],
    [("ключ", 3), ("🔑", INT64_MAX), ("", INT64_MIN)],
    [("x" * 300, 0), ("a", 5)],
    [("last", 7)],
]


# --- round trips and seqs -------------------------------------------------------------------


def test_round_trip_exact_entries(tmp_path: Path) -> None:
    """Appended entries come back from replay exactly: unicode keys, negatives, int64 extremes."""
    with WriteAheadLog.open(tmp_path) as wal:
        write_frames(wal, FRAMES)
        assert wal.last_seq == 4
    assert replay_all(tmp_path) == list(enumerate(FRAMES, start=1))


def test_longest_key_round_trips(tmp_path: Path) -> None:
    """A key of 65535 bytes, the u16 maximum, survives a round trip."""
    key = "k" * 65535
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append(key.encode(), 1)
    assert replay_all(tmp_path) == [(1, [(key, 1)])]


def test_seal_groups_appends_into_onehand_frame(tmp_path: Path) -> None:
    """Appends between two seals share a seq; a seal with nothing appended takes no seq."""
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.seal() == 0
        wal.append(b"a", 1)
        wal.append(b"a", 2)
        assert wal.seal() == 1
        assert wal.seal() == 1
        assert wal.written_bytes == 0, "seal alone does no I/O"
        wal.append(b"b", 3)
        assert wal.write() > 0
        assert wal.last_seq == 2
    assert replay_all(tmp_path) == [(1, [("a", 1), ("a", 2)]), (2, [("b", 3)])]


def test_write_counts_bytes_and_sync_catches_up(tmp_path: Path) -> None:
    """write() returns the bytes handed to the OS; sync() brings synced_bytes up to them."""
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.write() == 0
        wal.append(b"abc", 1)
        written = wal.write()
        assert written == HEADER.size + 10 + 3 == wal.written_bytes
        assert wal.synced_bytes == 0
        wal.sync()
        assert wal.synced_bytes == written
        assert wal.bytes_on_disk == written
        assert wal.segment_count == 1


def test_seq_continues_across_reopen(tmp_path: Path) -> None:
    """A reopened log numbers its next frame right after the last one on disk."""
    with WriteAheadLog.open(tmp_path) as wal:
        write_frames(wal, FRAMES[:2])
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.last_seq == 2
        write_frames(wal, FRAMES[2:])
        assert wal.last_seq == 4
    assert [seq for seq, _ in replay_all(tmp_path)] == [1, 2, 3, 4]
    assert segments(tmp_path) == [segment_name(1)]


def test_close_seals_and_writes_the_openhand_frame(tmp_path: Path) -> None:
    """Entries appended but never written are on disk after close()."""
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append(b"k", 9)
    assert replay_all(tmp_path) == [(1, [("k", 9)])]


def test_advance_to_raises_the_floor_on_an_empty_log(tmp_path: Path) -> None:
    """After advance_to(1000) on an empty log the next frame is seq 1001, in a file named so."""
    with WriteAheadLog.open(tmp_path) as wal:
        wal.advance_to(1000)
        assert wal.last_seq == 1000
        assert wal.seal() == 1000
        wal.append(b"k", 1)
        wal.write()
        wal.advance_to(5)  # lower than last_seq: no effect
        assert wal.last_seq == 1001
    assert segments(tmp_path) == [segment_name(1001)]
    assert replay_all(tmp_path, 1000) == [(1001, [("k", 1)])]
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.last_seq == 1001


def test_advance_to_past_written_frames_starts_a_new_segment(tmp_path: Path) -> None:
    """A seq gap from advance_to falls between segments, so reopening does not call it damage."""
    with WriteAheadLog.open(tmp_path) as wal:
        write_frames(wal, FRAMES[:2])
        wal.advance_to(10)
        write_frames(wal, FRAMES[2:3])
        assert wal.last_seq == 11
    assert segments(tmp_path) == [segment_name(1), segment_name(11)]
    assert replay_all(tmp_path, 10) == [(11, FRAMES[2])]
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.last_seq == 11
        assert wal.recycle(10) == 1
    assert segments(tmp_path) == [segment_name(11)]


def test_replay_after_seq_skips_applied_frames(tmp_path: Path) -> None:
    """replay(n) yields only frames after n; replay(last_seq) yields nothing."""
    with WriteAheadLog.open(tmp_path) as wal:
        write_frames(wal, FRAMES)
    assert replay_all(tmp_path, 2) == [(3, FRAMES[2]), (4, FRAMES[3])]
    assert replay_all(tmp_path, 4) == []
    assert replay_all(tmp_path, 99) == []


def test_replay_refuses_to_skip_missing_frames(tmp_path: Path) -> None:
    """Frames missing above after_seq (a deleted segment) raise instead of replaying around them."""
    with WriteAheadLog.open(tmp_path, segment_bytes=1) as wal:
        write_frames(wal, [[("a", i)] for i in range(1, 6)])
    (tmp_path / segment_name(3)).unlink()
    with WriteAheadLog.open(tmp_path) as wal:
        assert [seq for seq, _ in wal.replay(3)] == [4, 5]
        with pytest.raises(WalCorruptError, match=r"seq 4 where seq 3 was expected.*3\.\.3"):
            list(wal.replay(1))


@pytest.mark.parametrize("byte", [2, 5, 9], ids=["value low byte", "value", "value sign"])
def test_replay_checks_the_crc_of_frames_damaged_after_open(tmp_path: Path, byte: int) -> None:
    """A frame whose payload changed after open (here a bit of an entry's value, so it still
    decodes) is refused by replay with a crc mismatch naming file and offset, never replayed;
    the offset is counted right across skipped and replayed frames."""
    with WriteAheadLog.open(tmp_path) as wal:
        write_frames(wal, FRAMES)
        path = tmp_path / segment_name(1)
        offset = frame_offsets(path)[3]
        with path.open("r+b") as file:  # in place: the log keeps its file open
            file.seek(offset + HEADER.size + byte)
            (old,) = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([old ^ 0x01]))
        replayed = []
        with pytest.raises(WalCorruptError, match="crc mismatch") as raised:
            for frame in wal.replay(2):  # frames 1-2 skipped, 3 replayed, 4 damaged
                replayed.append(frame)
        assert replayed == [(3, FRAMES[2])]
        assert f"{path}: crc mismatch at byte offset {offset}" in str(raised.value)
        # Frames at or below after_seq are only skipped, their payload unread.
        assert list(wal.replay(4)) == []


def test_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    """Two writers on one directory would interleave frames, so the second open fails."""
    assert issubclass(WalLockedError, OSError), "so `serve` reports it as a cannot-start error"
    with WriteAheadLog.open(tmp_path), pytest.raises(WalLockedError, match=str(tmp_path)):
        WriteAheadLog.open(tmp_path)
    WriteAheadLog.open(tmp_path).close()


def test_open_creates_missing_directories(tmp_path: Path) -> None:
    """open() creates the directory, parents included; an empty log has last_seq 0, no files."""
    directory = tmp_path / "data" / "wal"
    with WriteAheadLog.open(directory) as wal:
        assert wal.last_seq == 0
        assert wal.segment_count == 0
    assert directory.is_dir()
    assert segments(directory) == []


# --- rotation and recycling -----------------------------------------------------------------


def test_rotation_names_segments_by_first_seq_and_recycle_keeps_unapplied(tmp_path: Path) -> None:
    """Segments rotate at segment_bytes; recycle deletes only fully applied, non-active ones."""
    frames = [[(f"key{i}", i), ("other", -i)] for i in range(1, 21)]
    with WriteAheadLog.open(tmp_path, segment_bytes=150) as wal:
        write_frames(wal, frames)
        names = segments(tmp_path)
        assert len(names) == wal.segment_count > 3
        assert wal.bytes_on_disk == sum(p.stat().st_size for p in tmp_path.glob("wal-*"))
        firsts = [int(n[4:24]) for n in names]
        assert firsts[0] == 1 and firsts == sorted(firsts)
        second_first = firsts[1]
        # applied up to one short of segment 1's end: nothing is deletable yet
        assert wal.recycle(second_first - 2) == 0
        assert wal.recycle(second_first - 1) == 1
        assert segments(tmp_path) == names[1:]
        assert [seq for seq, _ in wal.replay(second_first - 1)] == list(range(second_first, 21))
        # everything applied: all but the active segment go
        assert wal.recycle(20) == len(names) - 2
        assert segments(tmp_path) == names[-1:]
        write_frames(wal, [[("after", 1)]])
    assert replay_all(tmp_path, 20) == [(21, [("after", 1)])]
    assert replay_all(tmp_path, firsts[-1] - 1)[0][0] == firsts[-1]


def test_recycle_never_deletes_the_active_segment(tmp_path: Path) -> None:
    """Even when every frame is applied, the segment being appended to stays."""
    with WriteAheadLog.open(tmp_path) as wal:
        write_frames(wal, FRAMES)
        assert wal.recycle(10**9) == 0
    assert segments(tmp_path) == [segment_name(1)]
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.last_seq == 4


# --- torn tails -----------------------------------------------------------------------------


def _log_with_frames(directory: Path) -> Path:
    with WriteAheadLog.open(directory) as wal:
        write_frames(wal, FRAMES)
    return directory / segment_name(1)


def _tear_mid_header(path: Path) -> int:
    offset = frame_offsets(path)[-1]
    os.truncate(path, offset + 7)
    return offset


def _tear_mid_payload(path: Path) -> int:
    os.truncate(path, path.stat().st_size - 2)
    return frame_offsets(path)[-1]


def _flip_last_payload_byte(path: Path) -> int:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    return frame_offsets(path)[-1]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data, last: data[: last + 7], "incomplete frame header"),
        (lambda data, last: data[: last + HEADER.size], "incomplete payload"),
        (lambda data, last: data + bytes(HEADER.size), "zeros instead of a frame"),
        (lambda data, last: data + b"not a frame header at all", "bad magic"),
        (lambda data, last: data[:-1] + bytes([data[-1] ^ 0x40]), "crc mismatch"),
    ],
    ids=["short-header", "header-only", "zeros", "garbage", "flipped"],
)
def test_a_scan_names_the_damage_its_offset_and_the_bytes_left(
    tmp_path: Path, damage: Callable[[bytes, int], bytes], reason: str
) -> None:
    """scan_segment() says what is wrong with a damaged tail (a header cut short, a header with no
    payload, zeros, garbage, a bad crc), where it starts and how many bytes follow, and that no
    valid frame follows it."""
    path = _log_with_frames(tmp_path)
    data = path.read_bytes()
    last = frame_offsets(path)[-1]
    damaged = damage(data, last)
    path.write_bytes(damaged)
    scan = scan_segment(path, 1)
    offset = min(last if len(damaged) <= len(data) else len(data), len(damaged))
    left = len(damaged) - offset
    assert scan.describe_damage() == (
        f"{path}: {reason} at byte offset {offset} ({left} bytes to the end of the file)"
    )
    assert scan.tail_only and scan.resume_offset is None


_MALFORMED = ENTRY.pack(5, 1) + b"ab"  # a key of 5 bytes with 2 present


def _decode_error(payload: bytes) -> str:
    try:
        decode_payload(payload, MAGIC)
    except ValueError as exc:
        return str(exc)
    raise AssertionError("the payload decoded")


@dataclass
class _Replayed:
    path: Path
    last_seq: int


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data, last: data[: last + 7], "incomplete frame header"),
        (lambda data, last: data[: last + HEADER.size], "incomplete payload"),
        (lambda data, last: data[:last] + b"not a frame header at all", "bad magic"),
        (
            lambda data, last: (
                data[:last] + hand_frame(len(FRAMES) + 3, data[last + HEADER.size :])
            ),
            f"frame seq {len(FRAMES) + 3} where seq {len(FRAMES)} was expected: frames "
            f"{len(FRAMES)}..{len(FRAMES) + 2} are missing (a deleted segment, or a database "
            "whose applied seq 0 is behind this log)",
        ),
        (
            lambda data, last: data[:last] + hand_frame(len(FRAMES), _MALFORMED),
            f"malformed payload: {_decode_error(_MALFORMED)}",
        ),
    ],
    ids=["short-header", "header-only", "garbage", "seq-gap", "malformed-payload"],
)
def test_replay_refuses_damage_it_meets_naming_the_file_and_offset(
    tmp_path: Path, damage: Callable[[bytes, int], bytes], reason: str
) -> None:
    """Replay reads what the open scan found whole; a segment damaged since (a file changed
    under it) stops it with the damage, the file and the byte offset, the frames before it
    replayed."""
    path = _log_with_frames(tmp_path)
    data = path.read_bytes()
    last = frame_offsets(path)[-1]
    path.write_bytes(damage(data, last))
    replayed = []
    with pytest.raises(WalCorruptError) as raised:
        for frame in replay_frames([_Replayed(path, len(FRAMES))], 0):
            replayed.append(frame.seq)
    assert str(raised.value) == (
        f"{path}: {reason} at byte offset {last} during replay; the log was left untouched"
    )
    assert replayed == list(range(1, len(FRAMES)))


@pytest.mark.parametrize(
    "tear", [_tear_mid_header, _tear_mid_payload, _flip_last_payload_byte], ids=lambda f: f.__name__
)
def test_torn_last_frame_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tear: Callable[[Path], int]
) -> None:
    """A damaged last frame is cut off: frames before it replay, it does not, new appends work."""
    path = _log_with_frames(tmp_path)
    offset = tear(path)
    size = path.stat().st_size
    with (
        caplog.at_level(logging.WARNING, logger="incrementer.wal"),
        WriteAheadLog.open(tmp_path) as wal,
    ):
        assert wal.last_seq == 3
        assert list(wal.replay(0)) == list(enumerate(FRAMES[:3], start=1))
        write_frames(wal, [[("new", 1)]])
    [record] = [r for r in caplog.records if r.name == "incrementer.wal"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert str(path) in message
    assert f"byte offset {offset} " in message
    assert f"({size - offset} bytes" in message
    assert replay_all(tmp_path) == [*enumerate(FRAMES[:3], start=1), (4, [("new", 1)])]


def test_zeros_after_the_last_frame_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Zeros up to EOF (space the file system extended but never filled) are truncated off."""
    path = _log_with_frames(tmp_path)
    clean_size = path.stat().st_size
    with path.open("ab") as file:
        file.write(bytes(4096))
    with caplog.at_level(logging.WARNING, logger="incrementer.wal"):
        assert replay_all(tmp_path) == list(enumerate(FRAMES, start=1))
    assert "zeros" in caplog.text and f"byte offset {clean_size} (4096 bytes" in caplog.text
    assert path.stat().st_size == clean_size


def test_fully_torn_last_segment_is_removed_and_seq_resumes(tmp_path: Path) -> None:
    """A last segment holding no whole frame goes away; the next frame takes the following seq."""
    with WriteAheadLog.open(tmp_path, segment_bytes=1) as wal:
        write_frames(wal, FRAMES)
    last = tmp_path / segment_name(4)
    os.truncate(last, 5)
    with WriteAheadLog.open(tmp_path, segment_bytes=1) as wal:
        assert wal.last_seq == 3
        assert not last.exists()
        write_frames(wal, [[("again", 2)]])
    assert segments(tmp_path) == [segment_name(i) for i in (1, 2, 3, 4)]
    assert replay_all(tmp_path)[-1] == (4, [("again", 2)])


def test_empty_last_segment_is_removed(tmp_path: Path) -> None:
    """A zero-byte last segment (created, then the process died) is dropped on open."""
    _log_with_frames(tmp_path)
    (tmp_path / segment_name(5)).touch()
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.last_seq == 4
    assert segments(tmp_path) == [segment_name(1)]


def test_every_truncation_point_replays_the_whole_frames_before_it(tmp_path: Path) -> None:
    """Cutting the log at any byte replays exactly the frames wholly before the cut."""
    path = _log_with_frames(tmp_path)
    pristine = path.read_bytes()
    ends = [*frame_offsets(path)[1:], len(pristine)]
    for cut in range(len(pristine) + 1):
        path.write_bytes(pristine[:cut])
        whole = sum(end <= cut for end in ends)
        assert replay_all(tmp_path) == list(enumerate(FRAMES[:whole], start=1)), cut


def test_every_flipped_byte_is_refused_or_cut_never_replayed(tmp_path: Path) -> None:
    """A flipped bit anywhere: open refuses (log unchanged) or, in the last frame, drops it."""
    path = _log_with_frames(tmp_path)
    pristine = path.read_bytes()
    last = frame_offsets(path)[-1]
    for position in range(len(pristine)):
        damaged = bytearray(pristine)
        damaged[position] ^= 0x10
        path.write_bytes(bytes(damaged))
        if position < last:
            with pytest.raises(WalCorruptError):
                WriteAheadLog.open(tmp_path)
            assert path.read_bytes() == damaged, position
        else:
            assert replay_all(tmp_path) == list(enumerate(FRAMES[:3], start=1)), position


# --- damage that is not a torn tail ---------------------------------------------------------


def _assert_refused(directory: Path, path: Path, offset: int) -> None:
    before = snapshot(directory)
    with pytest.raises(WalCorruptError) as raised:
        WriteAheadLog.open(directory)
    message = str(raised.value)
    assert str(path) in message
    assert f"byte offset {offset}" in message
    assert "left untouched" in message
    assert snapshot(directory) == before
    with pytest.raises(WalCorruptError):  # not WalLockedError: the failed open let go of the lock
        WriteAheadLog.open(directory)


def test_flipped_byte_before_valid_frames_is_refused(tmp_path: Path) -> None:
    """A bad crc followed by a valid frame is damage, not a tear: open raises, changes nothing."""
    path = _log_with_frames(tmp_path)
    offset = frame_offsets(path)[1]
    data = bytearray(path.read_bytes())
    data[offset + HEADER.size + 4] ^= 0x01
    path.write_bytes(bytes(data))
    _assert_refused(tmp_path, path, offset)


def test_damage_is_not_a_torn_tail_when_a_magic_inside_a_key_precedes_the_nexthand_frame(
    tmp_path: Path,
) -> None:
    """The search for a valid frame after damage looks past a key that holds the magic bytes: the
    damaged first frame is followed by good ones, so open refuses rather than truncating them."""
    with WriteAheadLog.open(tmp_path) as wal:
        write_frames(wal, [[("IWAL inside a key", 1)], [("b", 2)], [("c", 3)]])
    path = tmp_path / segment_name(1)
    data = bytearray(path.read_bytes())
    data[HEADER.size + 2] ^= 0x01  # the first frame's value: its crc no longer matches
    path.write_bytes(bytes(data))
    _assert_refused(tmp_path, path, 0)


def test_a_stray_byte_before_the_last_frame_is_refused(tmp_path: Path) -> None:
    """One byte inserted before the last frame shifts it by one: it is still found (a valid frame
    after damage), so open refuses instead of cutting it off as a torn tail."""
    path = _log_with_frames(tmp_path)
    offset = frame_offsets(path)[-1]
    data = path.read_bytes()
    path.write_bytes(data[:offset] + b"\x00" + data[offset:])
    _assert_refused(tmp_path, path, offset)


def test_torn_non_last_segment_is_refused(tmp_path: Path) -> None:
    """A tear in a segment with later segments after it raises, naming that segment."""
    with WriteAheadLog.open(tmp_path, segment_bytes=1) as wal:
        write_frames(wal, FRAMES)
    second = tmp_path / segment_name(2)
    os.truncate(second, second.stat().st_size - 1)
    _assert_refused(tmp_path, second, 0)


def test_seq_gap_inside_a_segment_is_refused(tmp_path: Path) -> None:
    """A missing frame in the middle of a segment (valid crcs, wrong seq) raises, and a summary
    says which seq came where which was expected."""
    path = _log_with_frames(tmp_path)
    offsets = frame_offsets(path)
    data = path.read_bytes()
    path.write_bytes(data[: offsets[1]] + data[offsets[2] :])
    _assert_refused(tmp_path, path, offsets[1])
    [problem] = summarize(tmp_path).problems
    assert problem.startswith(f"{path}: frame seq 3 where seq 2 was expected at byte offset ")


@pytest.mark.parametrize("first", [3, 4], ids=["below", "at"])
def test_overlapping_segments_are_refused(tmp_path: Path, first: int) -> None:
    """A segment starting at or below the previous segment's last seq (4) raises."""
    _log_with_frames(tmp_path)
    other = tmp_path / "other"
    with WriteAheadLog.open(other) as wal:
        wal.advance_to(first - 1)
        write_frames(wal, [[("dup", 1)]])
    stray = tmp_path / segment_name(first)
    stray.write_bytes((other / segment_name(first)).read_bytes())
    _assert_refused(tmp_path, stray, 0)


def test_segment_whose_name_disagrees_with_its_first_frame_is_refused(tmp_path: Path) -> None:
    """A segment renamed away from its first frame's seq raises rather than renumbering."""
    path = _log_with_frames(tmp_path)
    renamed = path.rename(tmp_path / segment_name(7))
    _assert_refused(tmp_path, renamed, 0)


# --- summarize ------------------------------------------------------------------------------


def test_summarize_figures(tmp_path: Path) -> None:
    """summarize() counts segments, frames, records, bytes and seq range per segment and total."""
    with WriteAheadLog.open(tmp_path, segment_bytes=1) as wal:
        write_frames(wal, FRAMES)
        wal.recycle(1)
    summary = summarize(tmp_path)
    assert [(s.name, s.first_seq, s.last_seq, s.frames, s.records) for s in summary.segments] == [
        (segment_name(2), 2, 2, 1, 3),
        (segment_name(3), 3, 3, 1, 2),
        (segment_name(4), 4, 4, 1, 1),
    ]
    assert [s.bytes for s in summary.segments] == [
        (tmp_path / s.name).stat().st_size for s in summary.segments
    ]
    assert (summary.frames, summary.records, summary.first_seq, summary.last_seq) == (3, 6, 2, 4)
    assert summary.bytes == sum(s.bytes for s in summary.segments)
    assert summary.torn_tail is None and summary.problems == []


def test_summarize_reports_a_torn_tail_without_truncating(tmp_path: Path) -> None:
    """summarize() describes a torn tail but leaves the file as it found it."""
    path = _log_with_frames(tmp_path)
    _tear_mid_payload(path)
    before = snapshot(tmp_path)
    summary = summarize(tmp_path)
    assert summary.torn_tail is not None and str(path) in summary.torn_tail
    assert summary.problems == []
    assert (summary.frames, summary.last_seq) == (3, 3)
    assert snapshot(tmp_path) == before


def test_summarize_reports_damage_instead_of_raising(tmp_path: Path) -> None:
    """summarize() lists damage that would make open() raise, and counts what it could read."""
    path = _log_with_frames(tmp_path)
    offset = frame_offsets(path)[1]
    data = bytearray(path.read_bytes())
    data[offset + HEADER.size] ^= 0x01
    path.write_bytes(bytes(data))
    summary = summarize(tmp_path)
    assert summary.torn_tail is None
    assert len(summary.problems) == 1 and f"byte offset {offset}" in summary.problems[0]
    assert summary.frames == 1


def test_summarize_counts_what_is_pending_above_the_applied_seq(tmp_path: Path) -> None:
    """With the database's applied seq, summarize() counts the frames and increments above it,
    per segment and in total; without it, it counts none."""
    with WriteAheadLog.open(tmp_path, segment_bytes=1) as wal:
        write_frames(wal, FRAMES)
    summary = summarize(tmp_path, applied_seq=2)
    assert [(s.pending_frames, s.pending_records) for s in summary.segments] == [
        (0, 0), (0, 0), (1, 2), (1, 1),
    ]  # fmt: skip
    assert (summary.applied_seq, summary.pending_frames, summary.pending_records) == (2, 2, 3)
    unasked = summarize(tmp_path)
    assert (unasked.applied_seq, unasked.pending_frames, unasked.pending_records) == (None,) * 3
    assert {(s.pending_frames, s.pending_records) for s in unasked.segments} == {(None, None)}
    one = tmp_path / "one"
    _log_with_frames(one)
    [segment] = summarize(one, applied_seq=1).segments
    assert (segment.frames, segment.records, segment.pending_frames, segment.pending_records) == (
        4, 8, 3, 6,
    )  # fmt: skip


def test_summarize_names_overlapping_and_empty_segments(tmp_path: Path) -> None:
    """A segment starting at the previous one's last seq, and an empty segment with later ones
    after it, are each reported as a problem naming the file (open() would refuse them)."""
    _log_with_frames(tmp_path)
    other = tmp_path / "other"
    with WriteAheadLog.open(other) as wal:
        wal.advance_to(3)
        write_frames(wal, [[("dup", 1)]])
    overlapping = tmp_path / segment_name(4)
    overlapping.write_bytes((other / segment_name(4)).read_bytes())
    empty = tmp_path / segment_name(2)
    empty.write_bytes(b"")
    summary = summarize(tmp_path)
    assert summary.problems == [
        f"{empty}: no frames, yet later segments exist",
        f"{overlapping}: starts at seq 4, not after seq 4",
    ]
    assert (summary.first_seq, summary.last_seq, summary.frames) == (1, 4, 5)


def test_summary_encodes_as_json(tmp_path: Path) -> None:
    """`incrementer wal inspect --json` can encode a summary with msgspec as it is."""
    import msgspec

    _log_with_frames(tmp_path)
    decoded = msgspec.json.decode(msgspec.json.encode(summarize(tmp_path)))
    assert decoded["segments"] == [[segment_name(1), decoded["bytes"], 1, 4, 4, 8, None, None]]
    assert (decoded["records"], decoded["torn_tail"], decoded["problems"]) == (8, None, [])


def test_summarize_empty_and_missing_directories(tmp_path: Path) -> None:
    """An empty directory summarizes to zeros; a missing one is an error naming it."""
    summary = summarize(tmp_path)
    assert (summary.segments, summary.frames, summary.first_seq, summary.last_seq) == ([], 0, 0, 0)
    with pytest.raises(FileNotFoundError, match="nope"):
        summarize(tmp_path / "nope")


# --- MemorySequence -------------------------------------------------------------------------


def test_append_many_writes_what_appends_write(tmp_path: Path) -> None:
    """append_many of a batch leaves the same bytes on disk as one append per item."""
    items = [(f"k{i}".encode(), f"k{i}", i - 3) for i in range(7)] + [
        ("é".encode(), "é", 2**63 - 1)
    ]
    with WriteAheadLog.open(tmp_path / "one") as one:
        for key_bytes, _, value in items:
            one.append(key_bytes, value)
        one.write()
    with WriteAheadLog.open(tmp_path / "many") as many:
        many.append_many(items)
        many.append_many([])
        many.write()
    name = segment_name(1)
    assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert replay_all(tmp_path / "many") == [(1, [(key, value) for _, key, value in items])]


def test_memory_sequence_seals_like_the_log() -> None:
    """MemorySequence gives a new seq per seal that follows appends, and none for empty seals."""
    seq = MemorySequence()
    assert seq.last_seq == 0
    assert seq.seal() == 0
    seq.append(b"a", 1)
    seq.append(b"b", 2)
    assert seq.seal() == 1
    assert seq.seal() == 1
    seq.advance_to(1000)
    assert seq.seal() == 1000
    seq.advance_to(10)
    seq.append(b"a", 1)
    assert seq.write() == 0, "write() seals, as WriteAheadLog.write() does, but writes nothing"
    assert seq.last_seq == 1001
    seq.append_many([])
    assert seq.seal() == 1001
    seq.append_many([(b"a", "a", 1)])
    assert seq.seal() == 1002


def test_memory_sequence_io_is_a_no_op() -> None:
    """write/sync/recycle/close do nothing and report nothing to do."""
    seq = MemorySequence()
    seq.append(b"a", 1)
    assert seq.write() == 0
    seq.sync()
    assert seq.recycle(10) == 0
    assert seq.written_bytes == seq.synced_bytes == 0
    seq.close()
    assert seq.seal() == 1


def test_abandoning_the_segment_moves_the_next_write_to_a_new_one(tmp_path: Path) -> None:
    """abandon_segment() returns the last seq written (0 before any) and the next write goes to
    a new segment, the abandoned one left as it was."""
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.abandon_segment() == 0
        write_frames(wal, FRAMES[:2])
        assert wal.abandon_segment() == 2
        before = (tmp_path / segment_name(1)).read_bytes()
        write_frames(wal, FRAMES[2:])
    assert segments(tmp_path) == [segment_name(1), segment_name(3)]
    assert (tmp_path / segment_name(1)).read_bytes() == before
    assert replay_all(tmp_path) == list(enumerate(FRAMES, start=1))


class _RefusingIO(SegmentIO):
    """Writes fail while `failing`."""

    failing = True

    def write(self, fd: int, data: memoryview) -> int:
        if self.failing:
            raise OSError(28, "No space left on device")
        return super().write(fd, data)


def test_a_failed_write_returns_every_unwritten_frame_and_its_seqs_are_reused(
    tmp_path: Path,
) -> None:
    """After a failed write, discard_unwritten() returns the entries of every frame not handed
    to the OS (two sealed ones and the open one) and the next frames take their seqs; after a
    second failure the same holds from there, and the log on disk stays gapless."""
    with WriteAheadLog.open(tmp_path, segment_bytes=1) as wal:
        write_frames(wal, [FRAMES[0]])
        io = _RefusingIO()
        wal.io = io
        for entries in FRAMES[1:3]:
            for key, value in entries:
                wal.append(key.encode(), value)
            wal.seal()
        wal.append(b"open", 7)
        with pytest.raises(OSError):
            wal.write()
        entries, keys = wal.discard_unwritten()
        assert entries == untimed([*FRAMES[1], *FRAMES[2], ("open", 7)]) and keys == []
        with pytest.raises(OSError):
            write_frames(wal, [FRAMES[3]])
        assert wal.discard_unwritten() == (untimed(FRAMES[3]), [])
        io.failing = False
        write_frames(wal, [FRAMES[3]])
        assert wal.last_seq == 2
    assert replay_all(tmp_path) == [(1, FRAMES[0]), (2, FRAMES[3])]


def _entry(key: bytes, value: int) -> bytes:
    return ENTRY.pack(len(key), value) + key


def _keyed(entries: bytes, records: bytes) -> bytes:
    return ENTRIES_LEN.pack(len(entries)) + entries + records


_ENTRIES = _entry(b"ab", 1) + _entry(b"c", -2)
_RECORD = b"\x01K" + bytes(32)  # a batch record up to its range: key "K", a digest


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\x00\x00", "truncated entries length at byte offset 3"),
        (
            ENTRIES_LEN.pack(99) + _ENTRIES,
            "entries length runs past the payload end at byte offset 3",
        ),
        (_keyed(_ENTRIES[:5], b""), "truncated entry at byte offset 7"),
        (
            _keyed(_entry(b"ab", 1)[:-1], b""),
            "entry key runs past the payload end at byte offset 18",
        ),
    ],
    ids=["short-length", "long-length", "short-entry", "short-key"],
)
def test_counting_a_malformed_keyed_payload_says_where(payload: bytes, error: str) -> None:
    """count_entries() refuses a keyed payload whose parts do not fit, naming the byte offset
    in the buffer (here 3: the payload sits after three other bytes)."""
    buf = b"pre" + payload
    with pytest.raises(ValueError, match=f"^{error}$"):
        count_entries(buf, 3, len(buf), MAGIC_KEYED)


def test_counting_payloads_that_fit_exactly() -> None:
    """Payloads whose parts end exactly at the payload's end are counted, keyed, timed or not
    (plain is the default), wherever the payload sits in the buffer."""
    buf = b"pre" + _ENTRIES
    assert count_entries(buf, 3, len(buf)) == 2
    for entries, count in ((b"", 0), (_ENTRIES, 2)):
        keyed = b"pre" + _keyed(entries, b"")
        assert count_entries(keyed, 3, len(keyed), MAGIC_KEYED) == count
        timed = b"pre" + FRAME_TIME.pack(1) + _keyed(entries, TIMES_COUNT.pack(0))
        assert count_entries(timed, 3, len(timed), MAGIC_TIMED) == count


@pytest.mark.parametrize(
    ("records", "error"),
    [
        (_RECORD + b"\x00" * 7, "batch record runs past the payload end at offset 27"),
        (_RECORD + BATCH_RANGE.pack(10, 20), "batch record at offset 27 points past the entries"),
    ],
    ids=["short-record", "range-past-entries"],
)
def test_decoding_a_malformed_batch_record_says_where(records: bytes, error: str) -> None:
    """decode_payload() refuses a keyed payload whose batch record is cut short or points past
    the entries, naming the record's offset."""
    with pytest.raises(ValueError, match=f"^{error}$"):
        decode_payload(_keyed(_ENTRIES, records), MAGIC_KEYED)
    whole = BATCH_RANGE.pack(0, len(_ENTRIES))
    decoded = decode_payload(_keyed(_ENTRIES, _RECORD + whole), MAGIC_KEYED)
    [batch] = decoded.batches
    assert decoded.entries == batch.entries == [("ab", 1), ("c", -2)]
    assert batch.key == "\nK", "written before keys were scoped: the principal no request has"
    assert decoded.times == batch.times == [], "a keyed frame has no times"


def test_a_frame_with_a_good_crc_and_a_malformed_payload_is_a_problem(tmp_path: Path) -> None:
    """A frame whose crc holds but whose payload cannot be read (written by a bug, never by a
    torn write) is counted as a frame of no increments and named as a problem."""
    path = tmp_path / segment_name(1)
    path.write_bytes(hand_frame(1, _MALFORMED))
    summary = summarize(tmp_path)
    assert (summary.frames, summary.records, summary.last_seq) == (1, 0, 1)
    assert summary.problems == [
        f"{path}: frame seq 1: malformed payload: entry key runs past the payload end at byte "
        f"offset {HEADER.size + len(_MALFORMED)}"
    ]


def test_a_scan_after_damage_names_the_first_valid_frame_that_follows(tmp_path: Path) -> None:
    """Damage followed by two valid frames: the scan resumes at the first of them, not the
    last, and says the damage is not a torn tail."""
    path = _log_with_frames(tmp_path)
    offsets = frame_offsets(path)
    data = bytearray(path.read_bytes())
    data[offsets[1] + HEADER.size] ^= 0x01  # frame 2's payload: its crc fails
    path.write_bytes(bytes(data))
    scan = scan_segment(path, 1)
    assert (scan.damage, scan.damage_offset, scan.resume_offset) == (
        "crc mismatch", offsets[1], offsets[2],
    )  # fmt: skip
    assert not scan.tail_only


def test_a_false_magic_inside_the_damage_is_passed_over_for_the_nexthand_frame(
    tmp_path: Path,
) -> None:
    """Damage holding a magic of its own (a payload overwritten with frame-like bytes): the scan
    tries it, finds no valid frame there, and resumes at the frame right after the damage, not
    at a later one."""
    path = _log_with_frames(tmp_path)
    offsets = frame_offsets(path)
    assert len(offsets) >= 4
    data = bytearray(path.read_bytes())
    start = offsets[1] + HEADER.size
    assert offsets[2] - start >= len(MAGIC) + 1
    data[start : start + len(MAGIC)] = MAGIC  # frame 2's payload: a false magic, a bad crc
    path.write_bytes(bytes(data))
    scan = scan_segment(path, 1)
    assert (scan.damage, scan.damage_offset, scan.resume_offset) == (
        "crc mismatch", offsets[1], offsets[2],
    )  # fmt: skip


def test_an_idempotent_batchs_own_times_come_back_on_their_own_entries(tmp_path: Path) -> None:
    """The times some increments of an idempotent batch carry (own_times: offsets into its
    encoded entries) come back from the WAL on those entries, after plain entries in the same
    frame; the others take the frame's time. The digest tells apart the same counts with the
    time on another entry of the same length."""
    items: list[Validated] = [(k.encode(), k, v) for k, v in (("aa", 1), ("bb", 2), ("cc", 3))]
    frame_ms, own_ms = 1_796_515_200_000, 1_796_515_140_000
    times = [0, own_ms, own_ms + 1]
    encoded = idempotency.encode(items)
    own = idempotency.own_times(items, times)
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append(b"plain", 7)
        wal.frame_ms = frame_ms
        wal.append_batch(b"key:t\x00order-1", bytes(32), encoded, own)
        wal.write()
    with WriteAheadLog.open(tmp_path) as wal:
        (frame,) = list(wal.replay_frames(0))
    assert frame.entries == [("plain", 7), ("aa", 1), ("bb", 2), ("cc", 3)]
    assert frame.times == [frame_ms, frame_ms, own_ms, own_ms + 1]
    (batch,) = frame.batches
    assert batch.times == [frame_ms, own_ms, own_ms + 1]
    moved = idempotency.own_times(items, [0, own_ms + 1, own_ms])
    assert idempotency.digest(encoded, own) != idempotency.digest(encoded, moved)
    elsewhere = idempotency.own_times(items, [own_ms, 0, own_ms + 1])
    assert idempotency.digest(encoded, own) != idempotency.digest(encoded, elsewhere)
    with pytest.raises(ValueError):
        idempotency.own_times(items, times[:2])  # one time per item, or a bug


@pytest.mark.parametrize(
    ("records", "error"),
    [
        (b"\x02", "truncated batch key length at offset 27"),
        (b"\x02\x00", "batch record runs past the payload end at offset 27"),
        (b"\x05\x00key:K", "batch record runs past the payload end at offset 27"),
    ],
    ids=["length cut", "length only", "key only"],
)
def test_decoding_a_scoped_batch_record_cut_short_says_where(records: bytes, error: str) -> None:
    """decode_payload() refuses a scoped batch record (a two-byte key length, then the key)
    cut inside its length, right after it, or after its key, naming the record's offset; the
    whole record decodes with its scoped key."""
    with pytest.raises(ValueError, match=f"^{error}$"):
        decode_payload(_keyed(_ENTRIES, records), MAGIC_SCOPED)
    record = b"\x05\x00key:K" + bytes(32) + BATCH_RANGE.pack(0, len(_ENTRIES))
    [batch] = decode_payload(_keyed(_ENTRIES, record), MAGIC_SCOPED).batches
    assert batch.key == "key:K" and batch.entries == [("ab", 1), ("c", -2)]


def _timed(times: bytes) -> bytes:
    return FRAME_TIME.pack(1_000) + ENTRIES_LEN.pack(len(_ENTRIES)) + _ENTRIES + times


_TIMES_AT = FRAME_TIME.size + ENTRIES_LEN.size + len(_ENTRIES)


@pytest.mark.parametrize(
    ("times", "error"),
    [
        (b"", f"truncated times count at offset {_TIMES_AT}"),
        (b"\x01\x00", f"truncated times count at offset {_TIMES_AT}"),
        (TIMES_COUNT.pack(1), f"times run past the payload end at offset {_TIMES_AT + 4}"),
        (
            TIMES_COUNT.pack(1) + TIME.pack(len(_ENTRIES), 5),
            f"a time points past the entries (offset {len(_ENTRIES)})",
        ),
    ],
    ids=["no count", "count cut", "time missing", "time past the entries"],
)
def test_decoding_malformed_own_times_says_where(times: bytes, error: str) -> None:
    """decode_payload() refuses a timed payload whose own times are cut short or point past
    its entries, naming the offset; a time on the last entry is that entry's."""
    with pytest.raises(ValueError, match=rf"^{re.escape(error)}$"):
        decode_payload(_timed(times), MAGIC_TIMED)
    last = len(_ENTRIES) - ENTRY.size - 1  # the entry ("c", -2)
    decoded = decode_payload(_timed(TIMES_COUNT.pack(1) + TIME.pack(last, 5)), MAGIC_TIMED)
    assert decoded.times == [1_000, 5]


@pytest.mark.parametrize(
    ("payload", "magic", "error"),
    [
        (FRAME_TIME.pack(1_000)[:-1], MAGIC_TIMED, "truncated frame time"),
        (
            FRAME_TIME.pack(1_000),
            MAGIC_TIMED,
            f"truncated entries length at byte offset {FRAME_TIME.size}",
        ),
        (
            ENTRY.pack(5, 1) + b"ab",
            MAGIC,
            f"entry key runs past the payload end ({ENTRY.size + 5} > {ENTRY.size + 2})",
        ),
        (_ENTRIES + b"\x01", MAGIC, f"truncated entry at payload offset {len(_ENTRIES)}"),
    ],
    ids=["frame time cut", "frame time only", "key cut", "entry cut"],
)
def test_decoding_a_cut_payload_says_what_and_where(
    payload: bytes, magic: bytes, error: str
) -> None:
    """decode_payload() names what is cut short in a frame's payload: its frame time, the
    entries' length after a whole frame time, an entry's key, an entry's header."""
    with pytest.raises(ValueError, match=rf"^{re.escape(error)}$"):
        decode_payload(payload, magic)


def test_an_untimed_frame_decodes_with_no_times_and_a_timed_one_with_its_frame_time() -> None:
    """A frame written with buckets off holds no times; a timed frame with no own times gives
    each entry the frame's time."""
    plain = decode_payload(_ENTRIES, MAGIC)
    assert (plain.entries, plain.batches, plain.times) == ([("ab", 1), ("c", -2)], [], [])
    timed = decode_payload(_timed(TIMES_COUNT.pack(0)), MAGIC_TIMED)
    assert (timed.entries, timed.times) == ([("ab", 1), ("c", -2)], [1_000, 1_000])


def test_a_sync_after_a_new_segment_fsyncs_the_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new segment's directory entry is made durable by the next sync (a file fdatasynced in
    a directory never fsynced can vanish in a power cut); a sync with no new segment leaves the
    directory alone, as does the first sync of a log reopened onto its last segment."""
    synced_dirs: list[int] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            synced_dirs.append(status.st_ino)
        fsync(fd)

    with WriteAheadLog.open(tmp_path) as wal:
        monkeypatch.setattr(os, "fsync", spy)
        for value in (1, 2):
            wal.append(b"a", value)
            wal.write()
            wal.sync()
            assert synced_dirs == [tmp_path.stat().st_ino]
    synced_dirs.clear()
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append(b"a", 3)
        wal.write()
        wal.sync()
    assert synced_dirs == [] and segments(tmp_path) == [segment_name(1)]
