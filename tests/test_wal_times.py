"""The WAL's timed frames (time buckets on): each increment's bucket time survives the log;
frames written with buckets off keep their format byte for byte, and a log that holds both
kinds replays both."""

from __future__ import annotations

from pathlib import Path

from support import hand_frame

from incrementer.ingest.idempotency import digest, encode, own_times
from incrementer.ingest.wal import WriteAheadLog, summarize
from incrementer.ingest.wal_reader import (
    ENTRY,
    HEADER,
    MAGIC,
    MAGIC_SCOPED,
    MAGIC_TIMED,
    MAGIC_TIMED_SCOPED,
    segment_name,
)

T = 1_796_515_200_000  # ms


def magics(directory: Path) -> list[bytes]:
    data = (directory / segment_name(1)).read_bytes()
    found, offset = [], 0
    while offset < len(data):
        magic, length, _, _ = HEADER.unpack_from(data, offset)
        found.append(magic)
        offset += HEADER.size + length
    return found


def test_every_increment_replays_with_the_time_it_was_counted_at(tmp_path: Path) -> None:
    """A stamped frame records its time for its plain entries and each own time (append_at,
    append_many's times, an idempotent batch's): replay gives every entry's time, and each
    batch's entries with theirs."""
    items = [(b"k", "k", 2), (b"j", "j", 3), (b"k", "k", 4)]
    times = [0, T - 5000, T - 9000]
    encoded = encode(items)
    with WriteAheadLog.open(tmp_path) as wal:
        wal.frame_ms = T
        wal.append(b"a", 1)
        wal.append_at(b"b", 2, T - 60_000)
        wal.append_many([(b"c", "c", 3), (b"d", "d", 4)], [T - 120_000, 0])
        own = own_times(items, times)
        wal.append_batch(b"idem", digest(encoded, own), encoded, own)
        wal.write()
        wal.append(b"later", 1)  # an unstamped frame after it: buckets off
        wal.write()
        frames = list(wal.replay_frames(0))
    first, second = frames
    assert first.entries == [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("k", 2), ("j", 3), ("k", 4)]
    assert first.times == [T, T - 60_000, T - 120_000, T, T, T - 5000, T - 9000]
    (batch,) = first.batches
    assert batch.entries == [("k", 2), ("j", 3), ("k", 4)]
    assert batch.times == [T, T - 5000, T - 9000]
    assert batch.digest == digest(encoded, own).hex() != digest(encoded).hex()
    assert (second.entries, second.times) == ([("later", 1)], [])
    assert magics(tmp_path) == [MAGIC_TIMED_SCOPED, MAGIC]  # a batch's keys are scoped
    assert summarize(tmp_path).records == 8


def test_frames_written_with_buckets_off_keep_the_old_format(tmp_path: Path) -> None:
    """Without a frame time a log writes what it wrote before time buckets existed: a plain
    frame is the hand-built old frame byte for byte, a batch's frame is MAGIC_SCOPED."""
    payload = ENTRY.pack(3, 7) + b"old"
    old = hand_frame(1, payload)
    items = [(b"k", "k", 2)]
    with WriteAheadLog.open(tmp_path / "log") as wal:
        wal.append(b"old", 7)
        wal.write()
        wal.append_batch(b"idem", digest(encode(items)), encode(items))
        wal.write()
    assert (tmp_path / "log" / segment_name(1)).read_bytes().startswith(old)
    assert magics(tmp_path / "log") == [MAGIC, MAGIC_SCOPED]


def test_own_times_never_leak_into_the_next_frame(tmp_path: Path) -> None:
    """A frame whose increments carry own times but no frame time (a caller that forgot to
    stamp) is still written timed, and the next frame starts without those times."""
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_at(b"a", 1, T)
        wal.write()
        wal.append(b"b", 2)
        wal.write()
        first, second = wal.replay_frames(0)
    assert first.times[0] == T
    assert second.times == []
    assert magics(tmp_path) == [MAGIC_TIMED, MAGIC]


def test_a_failed_write_gives_back_each_increment_with_its_time(tmp_path: Path) -> None:
    """discard_unwritten returns (key, value, ms) of the frames not written, 0 for a frame
    without times, so the intake takes each back out of its bucket."""
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append(b"plain", 1)
        wal.seal()
        wal.frame_ms = T
        wal.append(b"a", 2)
        wal.append_at(b"b", 3, T - 60_000)
        entries, keys = wal.discard_unwritten()
        assert entries == [("plain", 1, 0), ("a", 2, T), ("b", 3, T - 60_000)]
        assert keys == []
        assert wal.frame_ms == 0
