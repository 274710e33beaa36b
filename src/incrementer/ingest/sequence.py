"""The seq contract the intake, flusher and ack gate rely on, and its memory-mode implementation.

A sequenced log hands out a seq per sealed frame (one event-loop tick's increments); the flusher
cuts the buffer at a seq and the database records it as applied. WriteAheadLog (wal.py) meets the
contract with files; MemorySequence meets it without I/O for `--durability memory`.
"""

from __future__ import annotations

from collections.abc import Sequence


class SequencedLog:
    """What the intake, flusher and ack gate use: WriteAheadLog and MemorySequence subclass it.

    A base class rather than a Protocol: the compiled intake (setup.py) then calls append()
    through the class's method table instead of looking the method up by name per request.

    `frame_ms` is the open frame's time in ms since the epoch, 0 until the intake stamps it
    (only with time buckets on): every entry of the frame without a time of its own is counted
    in the bucket of that time, and a log records it with the frame. Sealing resets it.
    """

    def __init__(self) -> None:
        self.frame_ms = 0

    @property
    def last_seq(self) -> int:
        raise NotImplementedError

    @property
    def written_bytes(self) -> int:
        raise NotImplementedError

    @property
    def synced_bytes(self) -> int:
        raise NotImplementedError

    def append(self, key: bytes, value: int) -> None:
        raise NotImplementedError

    def append_at(self, key: bytes, value: int, at_ms: int) -> None:
        raise NotImplementedError

    def append_many(
        self, items: Sequence[tuple[bytes, str, int]], times: Sequence[int] = ()
    ) -> None:
        raise NotImplementedError

    def append_batch(
        self,
        key: bytes,
        digest: bytes,
        encoded: bytes,
        times: Sequence[tuple[int, int]] = (),
    ) -> None:
        raise NotImplementedError

    def seal(self) -> int:
        raise NotImplementedError

    def advance_to(self, seq: int) -> None:
        raise NotImplementedError

    def write(self) -> int:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def recycle(self, applied_seq: int) -> int:
        raise NotImplementedError

    def discard_unwritten(self) -> tuple[list[tuple[str, int, int]], list[str]]:
        raise NotImplementedError

    def abandon_segment(self) -> int:
        raise NotImplementedError

    def probe(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class MemorySequence(SequencedLog):
    """WriteAheadLog's seq and seal without I/O, for `--durability memory`."""

    def __init__(self) -> None:
        super().__init__()
        self._next_seq = 1
        self._dirty = False  # pragma: no mutate

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def written_bytes(self) -> int:
        return 0

    @property
    def synced_bytes(self) -> int:
        return 0

    def append(self, key: bytes, value: int) -> None:
        self._dirty = True

    def append_at(self, key: bytes, value: int, at_ms: int) -> None:
        self._dirty = True

    def append_many(
        self, items: Sequence[tuple[bytes, str, int]], times: Sequence[int] = ()
    ) -> None:
        if items:
            self._dirty = True

    def append_batch(
        self,
        key: bytes,
        digest: bytes,
        encoded: bytes,
        times: Sequence[tuple[int, int]] = (),
    ) -> None:
        self._dirty = True

    def seal(self) -> int:
        if self._dirty:
            self._dirty = False  # pragma: no mutate
            self._next_seq += 1
        self.frame_ms = 0  # pragma: no mutate
        return self._next_seq - 1

    def advance_to(self, seq: int) -> None:
        self._next_seq = max(self._next_seq, seq + 1)

    def write(self) -> int:
        """Seal, as WriteAheadLog.write() does; no I/O. (The ack gate does not call write() or
        sync() in memory mode; the flusher's seal() at each cut is what advances the seq.)"""
        self.seal()
        return 0

    def sync(self) -> None:
        return None

    def recycle(self, applied_seq: int) -> int:
        return 0

    def discard_unwritten(self) -> tuple[list[tuple[str, int, int]], list[str]]:
        return [], []  # nothing is ever written, so nothing fails to be

    def abandon_segment(self) -> int:
        return self.last_seq

    def probe(self) -> None:
        return None

    def close(self) -> None:
        return None
