"""Where the keyring's API keys come from: a reload of every active key as soon as the database
says they changed (store.watch_api_keys: PostgreSQL's NOTIFY, SQLite's data_version), when a
rotated key's grace period ends, and every --auth-refresh seconds in any case (the safety net for
a change the watch missed); between reloads, a lookup by key id when a request brings a key the
keyring does not know, so a key works on its first request. A reload that finds the same keys
changes nothing (the hot path's cache stays warm); one that finds others logs one line.

The lookup runs on the general path only (`App.fast_accept` reads the keyring's cache and never
waits), and it is bounded so that a flood of made-up keys cannot become a flood of queries:
- a key id the database does not have is remembered as absent until the next reload would have
  found it anyway (--auth-refresh seconds): asking again costs a dict lookup;
- requests waiting for the same key id share one query;
- at most --auth-lookup-rate queries a second per client IP (a token bucket each, one second's
  worth of burst), and LOOKUP_CEILING times that from all clients together; past either, a key
  not yet known is answered 401 without a query, and a warning says so, once a minute at most.
  Keys already known are not affected, and one address flooding made-up keys spends only its
  own budget: a key created a moment ago still works on its first request from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime

from incrementer.auth.keyring import ClientLimiter, KeyRing, TokenBucket
from incrementer.store.base import ApiKey, BackendError, Store

log = logging.getLogger("incrementer.auth")

LOOKUP_TIMEOUT = 5.0  # a frozen database answers 401 after this, rather than holding the request
ABSENT_LIMIT = 10_000  # key ids remembered as absent; past it the expired ones are forgotten
THROTTLE_WARNING_INTERVAL = 60.0
GRACE_MARGIN = 1.0  # revocation times are kept to the second: reload just after one passes
LOOKUP_CEILING = 10
"""All clients together may make this many times --auth-lookup-rate lookups a second: the
database's bound when many addresses send made-up keys."""


class KeySource:
    def __init__(self, keyring: KeyRing, store: Store, refresh: float, lookup_rate: float) -> None:
        self.keyring = keyring
        self.store = store
        self.refresh = refresh
        self.lookup_rate = lookup_rate
        self.lookups = 0
        """Queries made for single keys (tests and the log read it)."""
        self.absent: dict[bytes, float] = {}  # key id -> monotonic time until it is asked again
        self._in_flight: dict[bytes, asyncio.Future[None]] = {}
        ceiling = lookup_rate * LOOKUP_CEILING
        self._bucket = TokenBucket(ceiling, max(1.0, ceiling), time.monotonic())
        self._per_client = ClientLimiter(lookup_rate, max(1, int(lookup_rate)))
        self._throttled = 0
        self._warned_at = -THROTTLE_WARNING_INTERVAL
        self._loaded: list[ApiKey] = []
        self._changed = asyncio.Event()
        self.reloads = 0
        """Reloads that found the keys changed (tests read it)."""

    async def load(self) -> int:
        """The first load, at start: BackendError propagates (the service cannot start)."""
        keys = await self.store.api_keys()
        self.keyring.load(keys, time.monotonic())
        self._loaded = keys
        return len(keys)

    def changed(self) -> None:
        """The keys may have changed in the database: reload now."""
        self._changed.set()

    async def refresh_forever(self) -> None:
        """Reload when told of a change, when a grace period ends, or every --auth-refresh
        seconds; one log line when the key set changed."""
        watch = asyncio.create_task(self.store.watch_api_keys(self.changed), name="key-watch")
        failing = False
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self._until_next_reload())
                self._changed.clear()
                try:
                    keys = await self.store.api_keys()
                except BackendError as exc:
                    if not failing:
                        log.warning("cannot reload API keys, keeping the current set: %s", exc)
                    failing = True
                    continue
                failing = False
                self._apply(keys)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    def _apply(self, keys: list[ApiKey]) -> None:
        if keys == self._loaded:
            return
        self._loaded = keys
        self.reloads += 1
        before = _key_set(self.keyring)
        self.keyring.load(keys, time.monotonic())
        change = describe_change(before, _key_set(self.keyring))
        if change:
            log.info("API keys reloaded: %d active; %s", len(keys), change)

    def _until_next_reload(self) -> float:
        """--auth-refresh, or less when a loaded key's grace period ends sooner."""
        now = time.time()
        wait = self.refresh
        for key in self._loaded:
            if key.revoked_at is not None:
                ends = datetime.fromisoformat(key.revoked_at).timestamp()
                wait = min(wait, max(0.0, ends - now) + GRACE_MARGIN)
        return wait

    def wanted(self, authorization: bytes) -> bytes | None:
        """The key id to look up before this request is authenticated, None when there is
        nothing to ask the database (a key already known or known absent, no Bearer key)."""
        if self.lookup_rate <= 0:
            return None
        key_id = self.keyring.key_id(authorization)
        if key_id is None:
            return None
        if self.absent.get(key_id, 0.0) > time.monotonic():
            return None
        return key_id

    async def look_up(self, key_id: bytes, client: str = "") -> None:
        """Ask the database for key_id once: found, it joins the keyring; absent, it is
        remembered. A failure or the rate cap (`client`'s, the client IP, or everyone's)
        changes nothing: the request is answered 401."""
        now = time.monotonic()
        if key_id in self.keyring.by_id or self.absent.get(key_id, 0.0) > now:
            return  # settled by another request's lookup since this one asked
        shared = self._in_flight.get(key_id)
        if shared is not None:
            await asyncio.shield(shared)  # a waiter's cancellation must not cancel the others'
            return
        own = self._per_client.bucket(client, now)
        if own.take(now):
            self._throttle(now)
            return
        if self._bucket.take(now):
            own.refund()
            self._throttle(now)
            return
        done = asyncio.get_running_loop().create_future()
        self._in_flight[key_id] = done
        try:
            self.lookups += 1
            key = await asyncio.wait_for(self.store.api_key(key_id.decode()), LOOKUP_TIMEOUT)
        except (BackendError, TimeoutError) as exc:
            log.warning("cannot look up API key %s: %s", key_id.decode(), exc or "timed out")
            return
        finally:
            del self._in_flight[key_id]
            done.set_result(None)
        now = time.monotonic()
        if key is None:
            self._remember_absent(key_id, now)
            return
        self.keyring.add(key, now)
        self._loaded = [*self._loaded, key]  # so that a reload without it drops it
        log.info("API key %r (%s) added on its first request", key.name, key.key_id)

    def _remember_absent(self, key_id: bytes, now: float) -> None:
        if len(self.absent) >= ABSENT_LIMIT:
            self.absent = {k: until for k, until in self.absent.items() if until > now}
            if len(self.absent) >= ABSENT_LIMIT:
                self.absent.clear()  # the rate cap still bounds the queries
        self.absent[key_id] = now + self.refresh

    def _throttle(self, now: float) -> None:
        self._throttled += 1
        if now - self._warned_at < THROTTLE_WARNING_INTERVAL:
            return
        log.warning(
            "API key lookups over --auth-lookup-rate (%g/s per client address, %g/s in all): "
            "%d unknown keys answered 401 without a lookup (a flood of made-up keys?); known "
            "keys are not affected",
            self.lookup_rate,
            self.lookup_rate * LOOKUP_CEILING,
            self._throttled,
        )
        self._warned_at = now
        self._throttled = 0


def _key_set(keyring: KeyRing) -> dict[str, str]:
    return {key_id.decode(): p.name for key_id, p in keyring.by_id.items()}


def describe_change(before: dict[str, str], after: dict[str, str]) -> str:
    """ "new: 'a' (id), ...; gone: 'b' (id)" between two {key id: name} sets; '' if equal."""
    parts = []
    for label, ids in (
        ("new", after.keys() - before.keys()),
        ("gone", before.keys() - after.keys()),
    ):
        if ids:
            names = before | after
            # Quoted (repr): a name cannot start a line of its own, nor pass for another field.
            listed = ", ".join(f"{names[i]!r} ({i})" for i in sorted(ids, key=lambda i: names[i]))
            parts.append(f"{label}: {listed}")
    return "; ".join(parts)
