"""The write-ahead log under stress: a syncing thread, kill -9, failed writes, random histories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from incrementer.ingest.wal import WriteAheadLog

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Frame = list[tuple[str, int]]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sync_in_a_thread_during_appends_writes_rotation_and_recycle(tmp_path: Path) -> None:
    """sync() and recycle() in other threads, while the loop thread rotates, lose nothing."""
    fds_before = open_fds()
    wal = WriteAheadLog.open(tmp_path, segment_bytes=1024)
    stop = threading.Event()
    errors: list[BaseException] = []
    applied = 0
    syncs = 0

    def syncer() -> None:
        nonlocal syncs
        while not stop.is_set():
            try:
                wal.sync()
                syncs += 1
            except BaseException as exc:
                errors.append(exc)
                return

    def recycler() -> None:
        while not stop.is_set():
            try:
                wal.recycle(applied)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=syncer), threading.Thread(target=recycler)]
    for thread in threads:
        thread.start()
    frames: dict[int, Frame] = {}
    entries: Frame = []
    try:
        for i in range(30_000):
            key = f"key-{i % 101}"
            wal.append(key.encode(), i)
            entries.append((key, i))
            if i % 7 == 6:
                frames[wal.seal()] = entries
                entries = []
                wal.write()
            if i % 5000 == 4999:
                applied = wal.last_seq - 100
        frames[wal.seal()] = entries
        wal.write()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert syncs > 0
    rotated = wal.segment_count
    wal.sync()
    assert wal.synced_bytes == wal.written_bytes
    assert open_fds() == fds_before + 2, "one segment fd and the directory fd; rotated ones closed"
    wal.close()
    assert open_fds() == fds_before
    with WriteAheadLog.open(tmp_path) as reopened:
        assert list(reopened.replay(applied)) == [(s, e) for s, e in frames.items() if s > applied]
        assert reopened.segment_count == rotated > 10


def test_kill_9_after_write_loses_nothing_written(tmp_path: Path) -> None:
    """Frames written before a SIGKILL are all replayed; appends never written are not."""
    result = run_python(
        """
        import os, signal, sys
        from pathlib import Path
        from incrementer.ingest.wal import WriteAheadLog

        wal = WriteAheadLog.open(Path(sys.argv[1]), segment_bytes=512)
        for i in range(1000):
            wal.append(f"k{i}".encode(), i)
            if i % 10 == 9:
                wal.write()
        wal.append(b"never-written", 1)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(tmp_path),
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    with WriteAheadLog.open(tmp_path) as wal:
        replayed = list(wal.replay(0))
    assert [seq for seq, _ in replayed] == list(range(1, 101))
    assert [entry for _, entries in replayed for entry in entries] == [
        (f"k{i}", i) for i in range(1000)
    ]


def test_failed_partial_write_is_cut_back_and_retried(tmp_path: Path) -> None:
    """A write that fails halfway (file size limit) leaves whole frames only; a retry succeeds."""
    result = run_python(
        """
        import os, resource, signal, sys
        from pathlib import Path
        from incrementer.ingest.wal import WriteAheadLog

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        directory = Path(sys.argv[1])
        wal = WriteAheadLog.open(directory)
        wal.append(b"a" * 100, 1)
        first = wal.write()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (first + 50, hard))
        wal.append(b"b" * 100, 2)
        try:
            wal.write()
        except OSError as exc:
            print("error", exc.errno)
        print("size", sum(p.stat().st_size for p in directory.iterdir()), first)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        wal.append(b"c", 3)
        wal.close()
        """,
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    error, size = result.stdout.splitlines()
    assert error == "error 27"  # EFBIG
    _, on_disk, first = size.split()
    assert on_disk == first, "the partial frame was truncated off"
    with WriteAheadLog.open(tmp_path) as wal:
        assert list(wal.replay(0)) == [
            (1, [("a" * 100, 1)]),
            (2, [("b" * 100, 2)]),
            (3, [("c", 3)]),
        ]


# --- a property: any history of operations replays as the model says ----------------------

keys = st.text(max_size=6)
values = st.integers(INT64_MIN, INT64_MAX)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), keys, values),
        st.tuples(st.just("seal")),
        st.tuples(st.just("write")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("advance"), st.integers(0, 3)),
        st.tuples(st.just("apply"), st.integers(0, 4)),
    ),
    max_size=60,
)


@settings(deadline=None, max_examples=150)
@given(ops=operations, segment_bytes=st.sampled_from([1, 80, 400, 1 << 20]))
def test_random_histories_replay_like_the_model(
    ops: list[tuple[str | int, ...]], segment_bytes: int
) -> None:
    """append/seal/write/reopen/advance_to/recycle in any order: replay equals a simple model."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        wal = WriteAheadLog.open(directory, segment_bytes=segment_bytes)
        sealed: dict[int, Frame] = {}
        open_frame: Frame = []
        next_seq, applied = 1, 0

        def seal() -> None:
            nonlocal next_seq, open_frame
            if open_frame:
                sealed[next_seq], open_frame = open_frame, []
                next_seq += 1

        try:
            for op in ops:
                if op[0] == "append":
                    key, value = str(op[1]), int(op[2])
                    wal.append(key.encode(), value)
                    open_frame.append((key, value))
                elif op[0] in ("seal", "write"):
                    getattr(wal, str(op[0]))()
                    seal()
                elif op[0] == "reopen":
                    wal.close()
                    seal()
                    wal = WriteAheadLog.open(directory, segment_bytes=segment_bytes)
                    expected = [(s, e) for s, e in sealed.items() if s > applied]
                    assert list(wal.replay(applied)) == expected
                    wal.advance_to(applied)  # as the service does at every start
                elif op[0] == "advance":
                    # the database says it applied everything up to last_seq + k
                    applied = max(applied, next_seq - 1 + int(op[1]))
                    wal.advance_to(applied)
                    next_seq = max(next_seq, applied + 1)
                else:
                    applied = max(applied, next_seq - 1 - int(op[1]))
                    wal.recycle(applied)
                assert wal.last_seq == next_seq - 1
            wal.close()
            seal()
        finally:
            wal.close()
        with WriteAheadLog.open(directory) as reopened:
            assert list(reopened.replay(applied)) == [
                (s, e) for s, e in sealed.items() if s > applied
            ]
            reopened.advance_to(applied)
            assert reopened.last_seq == next_seq - 1
        names = sorted(p.name for p in directory.iterdir())
        assert all(name.startswith("wal-") for name in names), names
        firsts = [int(name[4:24]) for name in names]
        assert all(seq in sealed for seq in firsts), "each segment is named by its first frame"
