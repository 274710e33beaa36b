"""Accepting validated increments: memory budget, then WAL append, then the coalescing buffer.

With time buckets on (--buckets), every increment is also summed under the start of its finest
bucket: the bucket of its own "at", or of the WAL frame's time (its arrival). A frame gets its
time from the first increment appended to it (`stamp`), and the log writes that time with the
frame, so a replay counts every increment in the bucket it was counted in here.

Each client (an API key's name, or the client IP with auth off) may make at most `client_share`
new keys pending between two flush cuts (--max-pending-keys-per-client), so one client cannot
spend the whole --max-pending-keys budget on its own keys: past its share its new keys are shed,
and everyone else's are still taken. Keys already pending cost nothing, whoever sends them. The
request being served says who it is for through `ACCOUNT` (the fast path passes the name
instead); a batch's account also learns how many increments it brought, which the rate limit
charges (api/handler.py).
"""

from __future__ import annotations

from contextvars import ContextVar
from time import monotonic, time_ns

from incrementer.ingest.buffer import CoalescingBuffer
from incrementer.ingest.idempotency import Ledger
from incrementer.ingest.sequence import SequencedLog
from incrementer.ingest.validate import Validated, Validator
from incrementer.metrics import Metrics
from incrementer.store.base import INT64_MAX, IdempotentBatch


class Overloaded(Exception):
    """Too many distinct unflushed keys: shed load (503 + Retry-After) instead of growing."""


class Account:
    """Who the request being served is for, and what its increments cost: set by the handler
    (ACCOUNT) before a route runs, read by the intake when it takes the request's increments."""

    __slots__ = ("items", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.items = 0
        """Increments taken for this request (a batch's length), once taken."""


ACCOUNT: ContextVar[Account | None] = ContextVar("incrementer_account", default=None)
"""The request being served. A context variable, not an attribute: an idempotent batch is taken
in after a database lookup, in the request's own task, while other requests have been served."""


class Intake:
    __slots__ = (
        "_decode",
        "_max_key_bytes",
        "_max_value",
        "_min_value",
        "buffer",
        "client_share",
        "finest",
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
        finest: int = 0,
        client_share: int = 0,
    ) -> None:
        self.buffer = buffer
        self.client_share = client_share or max(1, max_pending_keys // 4)
        """New keys one client may make pending between two flush cuts."""
        self.finest = finest
        """The finest kept bucket length in seconds; 0 with time buckets off."""
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

    def accept_json(self, body: bytes, client: str) -> bool:
        """POST /increment's whole success path in one call: decode, check, budget, WAL, buffer.
        `client`: who sends it (an API key's name, or the client IP).

        False when anything is off (bad JSON, a key or value the fast check does not pass, the
        key budget or the client's share spent): nothing was changed, and the general path
        (Validator.json_one, then accept) decodes again and answers with the precise error. The
        check is Validator.check's first branch, repeated here to save three calls per request.
        """
        try:
            inc = self._decode(body)
            raw = inc.key.encode()
        except ValueError:  # msgspec.DecodeError, UnicodeDecodeError, UnicodeEncodeError
            return False
        if inc.at is not None:
            return False  # the general path checks and records its own time
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
            owners = buffer.owners
            held = owners.get(client, 0)
            if held >= self.client_share:
                return False
            owners[client] = held + 1
            if not deltas:
                buffer.oldest = monotonic()
            deltas[key] = value
        else:
            return False
        if self.finest:
            current = buffer.current if self.wal.frame_ms else self.stamp()
            current[key] = current.get(key, 0) + value
        # After the buffer, unlike accept(): nothing runs in between on the one event-loop
        # thread, and the frame is written before any response of this tick leaves.
        self.wal.append(raw, value)
        return True

    def stamp(self) -> dict[str, int]:
        """Give the open WAL frame its time, now, and make the bucket of that time the buffer's
        current one (the frame's increments without an "at" of their own are counted there)."""
        ms = time_ns() // 1_000_000
        self.wal.frame_ms = ms
        seconds = ms // 1000
        current = self.buffer.bucket(seconds - seconds % self.finest)
        self.buffer.current = current
        return current

    def _start_of(self, at_ms: int) -> int:
        """The finest bucket an increment counts in: its own time's, else the open frame's.
        Either way the open frame is stamped first if this is its first increment: a frame
        holding increments with their own times is written with its time too."""
        frame_ms = self.wal.frame_ms
        if not frame_ms:
            self.stamp()
            frame_ms = self.wal.frame_ms
        seconds = (at_ms or frame_ms) // 1000
        return seconds - seconds % self.finest

    def accept(self, item: Validated, at_ms: int = 0) -> None:
        """One validated increment (the general path of POST /increment); `at_ms`, its own time
        (0: none), places it in a time bucket when they are on and is ignored otherwise."""
        key_bytes, key, value = item
        buffer = self.buffer
        deltas = buffer.deltas
        account = ACCOUNT.get()
        # A key already pending costs no memory, so only new keys are shed.
        if key not in deltas:
            if len(deltas) >= self.key_budget:
                raise Overloaded
            if account is not None:
                held = buffer.owners.get(account.name, 0)
                if held >= self.client_share:
                    raise Overloaded
                buffer.owners[account.name] = held + 1
        if self.finest:
            into = buffer.bucket(self._start_of(at_ms))
            into[key] = into.get(key, 0) + value
            if at_ms:
                self.wal.append_at(key_bytes, value, at_ms)
            else:
                self.wal.append(key_bytes, value)
        else:
            self.wal.append(key_bytes, value)
        buffer.add(key, value)
        if account is not None:
            account.items += 1

    def _admit(self, items: list[Validated], extra: int) -> Account | None:
        """Raise Overloaded unless a batch's new keys (plus `extra`, what it holds until its
        flush) fit the budget and its client's share; the request's account, if any."""
        deltas = self.buffer.deltas
        account = ACCOUNT.get()
        held = self.buffer.owners.get(account.name, 0) if account is not None else 0
        over_budget = len(deltas) + len(items) + extra > self.key_budget
        if over_budget or (account is not None and held + len(items) > self.client_share):
            # Only then count the keys that are new.
            new = len({name for _, name, _ in items if name not in deltas})
            if len(deltas) + new + extra > self.key_budget:
                raise Overloaded
            if account is not None and held + new > self.client_share:
                raise Overloaded
        return account

    def _charged(self, account: Account | None, before: int, items: int) -> None:
        """Count a batch just added: the new keys against its client's share, its increments
        for the rate limit."""
        if account is not None:
            added = len(self.buffer.deltas) - before
            if added:
                owners = self.buffer.owners
                owners[account.name] = owners.get(account.name, 0) + added
            account.items += items

    def retract(self, entries: list[tuple[str, int, int]], batch_keys: list[str]) -> None:
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
        for key, value, at_ms in entries:
            pending = deltas.get(key)
            if pending is None:
                continue  # not added after all (a bug between append and add answered 500)
            if pending == value:
                del deltas[key]
            else:
                deltas[key] = pending - value
            if at_ms and self.finest:
                self._retract_bucket(key, value, at_ms)

    def _retract_bucket(self, key: str, value: int, at_ms: int) -> None:
        seconds = at_ms // 1000
        start = seconds - seconds % self.finest
        buckets = self.buffer.buckets
        into = buckets.get(start)
        if into is None or key not in into:
            return
        if into[key] == value:
            del into[key]
            if not into:
                # The write that failed sealed the open frame: the next one is stamped afresh.
                del buckets[start]
        else:
            into[key] -= value

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
        self,
        key: str,
        digest: bytes,
        encoded: bytes,
        items: list[Validated],
        times: list[int] | None = None,
        own_times: list[tuple[int, int]] | None = None,
    ) -> IdempotentBatch:
        """An idempotent batch, all or nothing: logged with its key (scoped by its sender) and
        digest (`encoded`: its increments as the WAL stores them; `own_times`, where its entries
        with an "at" of their own are in it: ingest/idempotency.py), summed into the buffer,
        held until its flush.
        What it holds counts against the budget as well as its new keys until then. `times`:
        each item's own time in ms (0: none), or None when no item has one."""
        account = self._admit(items, len(items))
        before = len(self.buffer.deltas)
        starts = None
        if self.finest:
            start_of = self._start_of
            starts = [start_of(at_ms) for at_ms in times] if times else [start_of(0)] * len(items)
            self.wal.append_batch(key.encode(), digest, encoded, own_times or ())
        else:
            self.wal.append_batch(key.encode(), digest, encoded)
        batch = self.buffer.add_keyed(key, digest.hex(), items, starts)
        self._charged(account, before, len(items))
        self.key_budget -= len(batch.deltas)
        self.ledger.hold(key, batch.digest)
        self.metrics.accepted_batch_increments += len(items)
        return batch

    def accept_many(self, items: list[Validated], times: list[int] | None = None) -> None:
        """All or nothing: the budget is checked for the whole batch before anything is added.
        `times`: each item's own time in ms (0: none), or None when no item has one."""
        buffer = self.buffer
        account = self._admit(items, 0)
        before = len(buffer.deltas)
        if self.finest:
            current = buffer.bucket(self._start_of(0))
            if times:
                start_of = self._start_of
                for (_, name, value), at_ms in zip(items, times, strict=True):
                    into = buffer.bucket(start_of(at_ms)) if at_ms else current
                    into[name] = into.get(name, 0) + value
                self.wal.append_many(items, times)
            else:
                get = current.get
                for _, name, value in items:
                    current[name] = get(name, 0) + value
                self.wal.append_many(items)
        else:
            self.wal.append_many(items)
        buffer.add_many(items)
        self._charged(account, before, len(items))
        self.metrics.accepted_batch_increments += len(items)
