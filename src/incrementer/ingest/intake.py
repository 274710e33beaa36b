"""Accepting validated increments: memory budget, then WAL append, then the coalescing buffer."""

from __future__ import annotations

from time import monotonic

from incrementer.ingest.buffer import CoalescingBuffer
from incrementer.ingest.idempotency import Ledger
from incrementer.ingest.sequence import SequencedLog
from incrementer.ingest.validate import Validated, Validator
from incrementer.metrics import Metrics
from incrementer.store.base import INT64_MAX, IdempotentBatch


class Overloaded(Exception):
    """Too many distinct unflushed keys: shed load (503 + Retry-After) instead of growing."""


class Intake:
    __slots__ = (
        "_decode",
        "_max_key_bytes",
        "_max_value",
        "_min_value",
        "buffer",
        "key_budget",
        "ledger",
        "max_pending_keys",
        "metrics",
        "wal",
    )

    def __init__(
        self,
        buffer: CoalescingBuffer,
        wal: SequencedLog,
        validator: Validator,
        max_pending_keys: int,
        metrics: Metrics,
        ledger: Ledger,
    ) -> None:
        self.buffer = buffer
        self.wal = wal
        self.max_pending_keys = max_pending_keys
        self.key_budget = max_pending_keys
        """Distinct keys the buffer may hold; the flusher lowers it by the batch in flight, and
        idempotent batches by the deltas they hold until their flush."""
        self.metrics = metrics
        self.ledger = ledger
        self._decode = validator.decode_one
        self._max_key_bytes = validator.max_key_bytes
        self._min_value = validator.min_value
        self._max_value = INT64_MAX  # an attribute: the compiled check reads no module global

    def accept_json(self, body: bytes) -> bool:
        """POST /increment's whole success path in one call: decode, check, budget, WAL, buffer.

        False when anything is off (bad JSON, a key or value the fast check does not pass, the
        key budget spent): nothing was changed, and the general path (Validator.json_one, then
        accept) decodes again and answers with the precise error. The check is
        Validator.check's first branch, repeated here to save three calls per request.
        """
        try:
            inc = self._decode(body)
            raw = inc.key.encode()
        except ValueError:  # msgspec.DecodeError, UnicodeDecodeError, UnicodeEncodeError
            return False
        key = inc.key
        value = inc.value
        if not (
            len(raw) == len(key)  # ASCII: any other character takes more than one byte
            and 0 < len(key) <= self._max_key_bytes
            and key.isprintable()
            and self._min_value <= value <= self._max_value
        ):
            return False
        buffer = self.buffer
        deltas = buffer.deltas
        pending = deltas.get(key)
        if pending is not None:
            deltas[key] = pending + value
        elif len(deltas) < self.key_budget:
            if not deltas:
                buffer.oldest = monotonic()
            deltas[key] = value
        else:
            return False
        # After the buffer, unlike accept(): nothing runs in between on the one event-loop
        # thread, and the frame is written before any response of this tick leaves.
        self.wal.append(raw, value)
        return True

    def accept(self, item: Validated) -> None:
        """One validated increment (the general path of POST /increment)."""
        key_bytes, key, value = item
        deltas = self.buffer.deltas
        # A key already pending costs no memory, so only new keys are shed.
        if len(deltas) >= self.key_budget and key not in deltas:
            raise Overloaded
        self.wal.append(key_bytes, value)
        self.buffer.add(key, value)

    def retract(self, entries: list[tuple[str, int]], batch_keys: list[str]) -> None:
        """Take back increments whose WAL write failed: never logged, so never to be applied.
        batch_keys are the idempotent batches among them: forgotten, so their retry is taken in
        afresh rather than answered as a replay of something that never counted.

        A key whose delta comes back to zero is dropped, as if it had never been pending (a
        key whose logged increments alone summed to zero is dropped too: its flush would have
        added 0, so only whether an empty row gets created differs).
        """
        if batch_keys:
            self._drop_keyed(set(batch_keys))
        deltas = self.buffer.deltas
        for key, value in entries:
            pending = deltas.get(key)
            if pending is None:
                continue  # not added after all (a bug between append and add answered 500)
            if pending == value:
                del deltas[key]
            else:
                deltas[key] = pending - value

    def _drop_keyed(self, keys: set[str]) -> None:
        buffer = self.buffer
        kept = []
        for batch in buffer.keyed:
            if batch.key in keys:
                buffer.held -= len(batch.deltas)
                self.key_budget += len(batch.deltas)
            else:
                kept.append(batch)
        buffer.keyed = kept
        self.ledger.release(keys)

    def accept_keyed(
        self, key: str, digest: bytes, encoded: bytes, items: list[Validated]
    ) -> IdempotentBatch:
        """An idempotent batch, all or nothing: logged with its key and digest (`encoded`: its
        increments as the WAL stores them), summed into the buffer, held until its flush. What
        it holds counts against the budget as well as its new keys until then."""
        deltas = self.buffer.deltas
        if len(deltas) + 2 * len(items) > self.key_budget:  # only then count what is new
            new_keys = {name for _, name, _ in items if name not in deltas}
            if len(deltas) + len(new_keys) + len(items) > self.key_budget:
                raise Overloaded
        self.wal.append_batch(key.encode("ascii"), digest, encoded)
        batch = self.buffer.add_keyed(key, digest.hex(), items)
        self.key_budget -= len(batch.deltas)
        self.ledger.hold(key, batch.digest)
        self.metrics.accepted_batch_increments += len(items)
        return batch

    def accept_many(self, items: list[Validated]) -> None:
        """All or nothing: the budget is checked for the whole batch before anything is added."""
        deltas = self.buffer.deltas
        if len(deltas) + len(items) > self.key_budget:  # only then count the keys that are new
            new_keys = {key for _, key, _ in items if key not in deltas}
            if len(deltas) + len(new_keys) > self.key_budget:
                raise Overloaded
        self.wal.append_many(items)
        self.buffer.add_many(items)
        self.metrics.accepted_batch_increments += len(items)
