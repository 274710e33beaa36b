"""Idempotency keys: what a key may look like, what makes two batches "the same", and what this
process remembers of the keys it has seen.

A batch sent with `Idempotency-Key: K` is applied once however often it arrives, at whichever
instance: the flush transaction inserts K into `idempotency_keys` and applies the batch's deltas
only if that insert wins (store/). What this module keeps in memory only makes the answers right
and cheap: a retry that this process has seen is answered at once, a replay with `202` and
`Idempotent-Replayed: true`, a reuse of K with another body with `422`; a key it does not know
is looked up in the database first (delivery/keyed_batches.py).

Two batches are the same when their increments are: the same keys with the same values in the
same order. The digest is the SHA-256 of those increments in the WAL's entry encoding (u16 key
length, i64 value, UTF-8 key), which the WAL then stores as they are, so JSON spelling
(whitespace, member order, escapes) does not matter and nothing is encoded twice. When any
increment carries its own time ("at"), the digest covers those times too (each as u32 offset of
its entry, i64 ms, as the WAL stores them): the same counts at other times are another batch.

Keys belong to their sender, the principal: `key:NAME` (the API key's name) or `ip:ADDRESS`
(the client's IP, with auth off). Everything here and below holds a key scoped by it
(store/base.py `scoped`), so one principal's key is never another's replay or conflict, and
`Allowance` bounds how many new keys each principal has taken in within the window.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

from incrementer.ingest.validate import BadRequest, Validated
from incrementer.ingest.wal_reader import ENTRY, TIME

MAX_KEY_LENGTH: Final = 128
SETTLED_LIMIT: Final = 100_000
"""Settled keys remembered at most (the oldest are forgotten first; the database still has them)."""

ALLOWANCE_SLOTS: Final = 8
"""The window is counted in slots of a eighth of it: a key counts for between one window and
one window and a slot after it was taken in."""

_pack_entry: Final = ENTRY.pack
_pack_time: Final = TIME.pack


def parse_key(raw: bytes) -> str:
    """The Idempotency-Key header's value, or BadRequest: 1-128 visible ASCII characters
    (0x21-0x7e), compared byte for byte."""
    if not 0 < len(raw) <= MAX_KEY_LENGTH or not all(0x21 <= byte <= 0x7E for byte in raw):
        raise BadRequest(
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} visible ASCII characters "
            "(no spaces); a random UUID is a good key.",
        )
    return raw.decode("ascii")  # pragma: no mutate


def encode(items: list[Validated]) -> bytes:
    """The increments as the WAL stores them: the text the digest is computed over."""
    out = bytearray()
    pack = _pack_entry
    for key, _, value in items:
        out += pack(len(key), value)
        out += key
    return bytes(out)


def own_times(items: list[Validated], times: list[int]) -> list[tuple[int, int]]:
    """(offset in encode(items), ms) of each item that carries its own time (times[i] != 0)."""
    found = []
    offset = 0
    for (key, _, _), at_ms in zip(items, times, strict=True):
        if at_ms:
            found.append((offset, at_ms))
        offset += ENTRY.size + len(key)
    return found


def digest(encoded: bytes, times: list[tuple[int, int]] | None = None) -> bytes:
    """SHA-256 of the batch's entries, followed by its own times when it has any."""
    hashed = hashlib.sha256(encoded)
    for offset, at_ms in times or ():
        hashed.update(_pack_time(offset, at_ms))
    return hashed.digest()


class Ledger:
    """The idempotency keys this process knows: batches it holds unflushed (in the WAL and the
    buffer), and keys recently settled in the database, each with its batch's digest.

    Pending keys are never forgotten before their flush: nothing else on this instance knows
    them yet. Settled ones are forgotten after `window` seconds (the database's keys are swept
    after the same time) or when more than `limit` are remembered: a key forgotten here is
    looked up in the database.
    """

    def __init__(self, window: float, limit: int = SETTLED_LIMIT, per_client: int = 0) -> None:
        self.window = window
        self.limit = limit
        self.allowance = Allowance(per_client, window)
        self.pending: dict[str, str] = {}
        # key -> (digest, monotonic time settled), oldest first; OrderedDict: the oldest goes in O(1)
        self.settled: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.pending) + len(self.settled)

    def known(self, key: str, now: float) -> str | None:
        """The digest of the batch this process knows under key, or None."""
        held = self.pending.get(key)
        if held is not None:
            return held
        settled = self.settled.get(key)
        if settled is None:
            return None
        if now - settled[1] > self.window:
            del self.settled[key]
            return None
        return settled[0]

    def hold(self, key: str, digest: str) -> None:
        """A batch taken in under key and not yet flushed."""
        self.pending[key] = digest

    def release(self, keys: Iterable[str]) -> None:
        """Batches taken back before they were logged: as if never seen."""
        for key in keys:
            self.pending.pop(key, None)

    def settle(self, key: str, digest: str, now: float) -> None:
        """The database holds key with this digest (flushed from here, or found there)."""
        self.pending.pop(key, None)
        settled = self.settled
        settled.pop(key, None)
        if len(settled) >= self.limit:
            settled.popitem(last=False)  # pragma: no mutate
        settled[key] = (digest, now)

    def forget(self, key: str) -> None:
        self.pending.pop(key, None)
        self.settled.pop(key, None)

    def expire(self, now: float) -> int:
        """Forget settled keys older than the window; how many went."""
        settled = self.settled
        gone = 0
        while settled:
            key = next(iter(settled))
            if now - settled[key][1] <= self.window:
                break  # oldest first: the rest are younger
            settled.popitem(last=False)  # pragma: no mutate
            gone += 1
        self.allowance.expire(now)
        return gone


class Allowance:
    """How many new idempotency keys each principal has had taken in lately, against `limit`
    per window (0: no limit).

    Counted per slot of window / ALLOWANCE_SLOTS, the last ALLOWANCE_SLOTS + 1 slots summed:
    every key taken in within the window counts, so no window ever sees more than `limit` new
    keys of one principal, nor the database more than that many of its rows from one window.
    A key counts when it is taken in (a replay or a 422 takes nothing in); one taken back after
    a failed WAL write still counts. Memory: a few integers per principal seen within the
    window, whatever its number of keys.
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.slot = window / ALLOWANCE_SLOTS
        self.counts: dict[str, dict[int, int]] = {}
        """principal -> {slot number (monotonic time // slot): keys taken in during it}"""

    def used(self, principal: str, now: float) -> int:
        """The keys principal has taken in within the window (and at most a slot before it)."""
        slots = self.counts.get(principal)
        if not slots:
            return 0
        oldest = int(now // self.slot) - ALLOWANCE_SLOTS
        for number in [n for n in slots if n < oldest]:
            del slots[number]
        return sum(slots.values())

    def wait(self, principal: str, now: float) -> float:
        """0.0 when principal may take in one more new key; else the seconds until its oldest
        counted keys stop counting."""
        if not self.limit or self.used(principal, now) < self.limit:
            return 0.0
        oldest = min(self.counts[principal])
        return max((oldest + ALLOWANCE_SLOTS + 1) * self.slot - now, 0.001)

    def charge(self, principal: str, now: float) -> None:
        """One new key taken in for principal."""
        if not self.limit:
            return
        slots = self.counts.get(principal)
        if slots is None:
            slots = self.counts[principal] = {}
        number = int(now // self.slot)
        slots[number] = slots.get(number, 0) + 1

    def expire(self, now: float) -> None:
        """Forget the principals none of whose keys count any more."""
        gone = [principal for principal in self.counts if not self.used(principal, now)]
        for principal in gone:
            del self.counts[principal]
