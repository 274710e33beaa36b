"""Batches sent with an Idempotency-Key: answered as their first copy was, applied once.

A key is its sender's (the principal: `key:NAME`, or `ip:ADDRESS` with auth off): K from one
principal and K from another are two keys, held and stored apart (store/base.py `scoped`). What
a request with `Idempotency-Key: K` gets, in order of what is known of its sender's K:

- this process holds or recently settled K (the ledger, ingest/idempotency.py): the same
  increments get `202` with `Idempotent-Replayed: true` and change nothing; other increments get
  `422 idempotency_key_reused` and change nothing. No I/O.
- otherwise the database is asked (one indexed read): K found there is answered the same way.
- K found nowhere, and its sender has taken in --idempotency-keys-per-client new keys within
  the window already (ingest/idempotency.py `Allowance`): `429 too_many_idempotency_keys`,
  nothing changed.
- K found nowhere: the batch is taken in (WAL, buffer, ledger) and gets `202`. Its flush inserts
  K into `idempotency_keys` and adds its deltas only if that insert wins (store/base.py), so a
  copy taken in meanwhile by another instance, whose flush has not run yet, is applied by
  whichever flush commits first and left out by the other: applied once. Neither instance could
  know, so both answered `202` without the replay header (and, for two different bodies under one
  key, the later-committed one is not applied and logged as a conflict).
- the database is failing (the flusher says so, or the lookup fails or takes over
  LOOKUP_TIMEOUT): taken in unchecked, as above. Availability is kept, and the flush still
  settles it exactly once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, NamedTuple

from incrementer.delivery.durability import AckGate
from incrementer.delivery.flush import Flusher
from incrementer.ingest.idempotency import digest, encode, own_times, parse_key
from incrementer.ingest.intake import Intake
from incrementer.ingest.validate import BadRequest, Validated
from incrementer.metrics import Metrics
from incrementer.store.base import LEGACY_PRINCIPAL, BackendError, Store, scoped, unscoped

ACCEPTED: Final = 0
REPLAYED: Final = 1
LOOKUP_TIMEOUT: Final = 2.0


class Lookup(NamedTuple):
    """A batch whose key this process does not know: to take in after the database lookup."""

    principal: str
    key: str
    """Scoped by the principal."""
    digest: bytes
    encoded: bytes
    items: list[Validated]
    times: list[int]
    """Each item's own time in ms (0: none); [] when no item has one."""
    own_times: list[tuple[int, int]]


Outcome = int | Lookup


class WalUnavailable(Exception):
    """The batch's WAL write failed: it was taken back and nothing was recorded."""


class TooManyKeys(Exception):
    """The sender has taken in its allowance of new keys within the window; nothing changed."""

    def __init__(self, limit: int, window: float, wait: float) -> None:
        super().__init__(limit, window, wait)
        self.wait = wait
        self.refusal = BadRequest(
            "too_many_idempotency_keys",
            f"This client has sent {limit} new Idempotency-Keys within the last {window:g} s, "
            "its most (--idempotency-keys-per-client); nothing was changed. A retry under a "
            "key already sent is still answered; send new batches after Retry-After.",
            429,
        )


def reused() -> BadRequest:
    return BadRequest(
        "idempotency_key_reused",
        "This Idempotency-Key was already used for a different batch; nothing was changed. "
        "Send new increments under a new key.",
        422,
    )


class KeyedBatches:
    def __init__(
        self, intake: Intake, gate: AckGate, store: Store, flusher: Flusher, metrics: Metrics
    ) -> None:
        self.intake = intake
        self.ledger = intake.ledger
        self.gate = gate
        self.store = store
        self.flusher = flusher
        self.counts = metrics.idempotent_requests

    def take(
        self,
        principal: str,
        raw_key: bytes,
        items: list[Validated],
        times: list[int] | None = None,
    ) -> Outcome:
        """ACCEPTED or REPLAYED, at once when this process knows the principal's key or the
        database is down; else a Lookup for look_up(). Raises BadRequest (an invalid key, 400,
        or a reused one, 422), TooManyKeys and Overloaded. `times`: each item's own time in ms
        (0: none), or None."""
        key = parse_key(raw_key)
        encoded = encode(items)
        times = times or []
        own = own_times(items, times) if times else []
        raw_digest = digest(encoded, own)
        hex_digest = raw_digest.hex()
        now = time.monotonic()
        known = self._known(principal, key, hex_digest, now)
        if known is not None:
            return known
        self._check_allowance(principal, now)
        scope = scoped(principal, key)
        if self.flusher.db_error is not None:
            # Answered in this tick like a plain batch: the tick's commit writes it, or turns
            # the 202 into a 503 and takes the batch back.
            self._accept(principal, scope, raw_digest, encoded, items, times, own, now)
            self.counts["unchecked"] += 1
            return ACCEPTED
        return Lookup(principal, scope, raw_digest, encoded, items, times, own)

    def _known(self, principal: str, key: str, hex_digest: str, now: float) -> int | None:
        ledger = self.ledger
        stored = ledger.known(scoped(principal, key), now)
        if stored is None:
            # The same batch, held or settled before keys were scoped (an upgrade): a replay.
            if ledger.known(scoped(LEGACY_PRINCIPAL, key), now) != hex_digest:
                return None
            stored = hex_digest
        if stored != hex_digest:
            self.counts["conflict"] += 1
            raise reused()
        self.counts["replayed"] += 1
        return REPLAYED

    def _check_allowance(self, principal: str, now: float) -> None:
        allowance = self.ledger.allowance
        wait = allowance.wait(principal, now)
        if wait:
            self.counts["refused"] += 1
            raise TooManyKeys(allowance.limit, self.ledger.window, wait)

    def _accept(
        self,
        principal: str,
        scope: str,
        raw_digest: bytes,
        encoded: bytes,
        items: list[Validated],
        times: list[int],
        own: list[tuple[int, int]],
        now: float,
    ) -> None:
        self.intake.accept_keyed(scope, raw_digest, encoded, items, times, own)
        self.ledger.allowance.charge(principal, now)

    async def look_up(self, batch: Lookup) -> int:
        """ACCEPTED or REPLAYED once the database has been asked about the key; BadRequest
        (422), Overloaded, WalUnavailable as take()."""
        principal, key, raw_digest, encoded, items, times, own = batch
        hex_digest = raw_digest.hex()
        outcome = "accepted"
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                stored = await self.store.idempotency_digest(key, hex_digest)
        except (BackendError, TimeoutError):
            stored, outcome = None, "unchecked"
        now = time.monotonic()
        if stored is not None and key not in self.ledger.pending:
            self.ledger.settle(key, stored, now)
        # Also catches a copy of this batch taken in here while the lookup ran.
        known = self._known(principal, unscoped(key)[1], hex_digest, now)
        if known is not None:
            return known
        self._check_allowance(principal, now)  # others may have been taken in meanwhile
        self._accept(principal, key, raw_digest, encoded, items, times, own, now)
        # This answer leaves in a later tick than the append: write now, so that a failed
        # write is known before it says 202 (and a flush never cuts an unwritten batch).
        if not self.gate.log_now():
            raise WalUnavailable
        self.counts[outcome] += 1
        return ACCEPTED
