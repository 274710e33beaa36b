"""Keeping this process's rate-limit buckets in step with the buckets its group or fleet shares.

Every `interval` (--rate-limit-sync, 0.05 s) one exchange with the shared store (budgets.py)
reports, for every limit that let a request through here since the last one, how many, and sets
each local bucket to the shared level it gets back; a limit active here but quiet since its last
exchange rides along once every IDLE_EVERY only (its level matters once a request comes, and
costs the store and this loop a key's work per exchange). The request path never waits on it:
it spends from the local bucket. A limit is active here from its first request until ACTIVE_FOR
seconds after its last; outside that, its bucket enforces this process's share of the limit
alone (keyring.TokenBucket.local_share), as every bucket does while the store is unreachable and
limits fail open. Failing closed instead, every limited request is refused (429) until the store
answers again. Either way one log line says so when it starts and one when it ends, the
`incrementer_rate_limit_store_up` gauge drops to 0, and /readyz carries a warning (not a reason:
every instance shares the store, and taking them all out of a load balancer would be an outage).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from incrementer.auth.budgets import BudgetStore, BudgetStoreError, Usage
from incrementer.auth.keyring import Sharing, TokenBucket
from incrementer.metrics import Metrics

log = logging.getLogger("incrementer.limits")

ACTIVE_FOR = 10.0
"""A limit is reconciled until this long after the last request this process let through."""
IDLE_EVERY = 1.0
"""A quiet limit is exchanged this often; with none active, an empty exchange this often keeps
the count of processes current and shows an unreachable store."""
TIMEOUT_INTERVALS = 20
"""An exchange unanswered after this many intervals (at least a second) counts as failed."""
STORE_DOWN = "rate_limit_store_unavailable"


class Active:
    """A limit this process reconciles: its bucket, when it last let a request through, when it
    was last exchanged."""

    __slots__ = ("bucket", "exchanged_at", "used_at")

    def __init__(self, bucket: TokenBucket, now: float) -> None:
        self.bucket = bucket
        self.used_at = now
        self.exchanged_at = -IDLE_EVERY


class Reconciler:
    def __init__(
        self,
        store: BudgetStore,
        sharing: Sharing,
        interval: float,
        fail_open: bool,
        metrics: Metrics,
        member: str = "",
    ) -> None:
        self.store = store
        self.sharing = sharing
        self.interval = interval
        self.fail_open = fail_open
        self.metrics = metrics
        self.member = member or f"{socket.gethostname()}:{os.getpid()}"
        self.timeout = max(1.0, TIMEOUT_INTERVALS * interval)
        self.active: dict[str, Active] = {}
        """Limits reconciled, by name."""
        self.down_since: float | None = None
        """When the store stopped answering (monotonic), while it does not."""
        self.error = ""
        self._exchanged_at = -IDLE_EVERY

    @classmethod
    async def started(
        cls, store: BudgetStore, interval: float, fail_open: bool, metrics: Metrics, member: str
    ) -> Reconciler:
        """A reconciler whose first exchange has run, so that a store that cannot be reached
        shows in the start-up log (the service starts all the same, failing open or closed),
        with its gauge registered; run() it."""
        reconciler = cls(store, Sharing(store.processes), interval, fail_open, metrics, member)
        await reconciler.reconcile(time.monotonic())
        if reconciler.down_since is None:
            log.info(
                "rate limits shared through %s with %d processes",
                store.where,
                reconciler.sharing.processes,
            )
        metrics.gauge(
            "incrementer_rate_limit_store_up",
            "1 while the store of the shared rate limits answers, 0 while limits fail open or "
            "closed without it.",
            lambda: 0.0 if reconciler.down_since is not None else 1.0,
        )
        return reconciler

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.reconcile(time.monotonic())
                except Exception:  # a bug of ours: say so, keep reconciling
                    log.exception("internal error reconciling the shared rate limits")
        finally:
            await self.store.close()

    async def reconcile(self, now: float) -> None:
        """One exchange for every active limit (or a keep-alive exchange when none is)."""
        self._collect(now)
        sent: list[tuple[TokenBucket, int]] = []
        usage: list[Usage] = []
        for name, active in self.active.items():
            bucket = active.bucket
            if not bucket.taken and now - active.exchanged_at < IDLE_EVERY:
                continue
            active.exchanged_at = now
            usage.append(Usage(name, bucket.taken, bucket.limit_rate, bucket.limit_burst))
            sent.append((bucket, bucket.taken))
            bucket.taken = 0
        if not usage and now - self._exchanged_at < IDLE_EVERY:
            return
        self._exchanged_at = now
        try:
            shared = await asyncio.wait_for(self.store.exchange(self.member, usage), self.timeout)
        except (BudgetStoreError, TimeoutError) as exc:
            self._failed(str(exc) or f"no answer within {self.timeout:g} s", sent, now)
            return
        after = time.monotonic()
        self.metrics.rate_limit_syncs["ok"] += 1
        self.metrics.rate_limit_sync_seconds.observe(after - now)
        self._recovered(after)
        self.sharing.processes = shared.processes
        for (bucket, _), level in zip(sent, shared.levels, strict=True):
            bucket.shared(level, after)

    def _collect(self, now: float) -> None:
        """Take in the buckets that let a request through since the last exchange; let go of
        those idle for ACTIVE_FOR (they enforce this process's share alone until used again)."""
        reports, self.sharing.reports = self.sharing.reports, []
        for bucket in reports:
            active = self.active.get(bucket.name)
            if active is None or active.bucket is not bucket:
                self.active[bucket.name] = Active(bucket, now)
            else:
                active.used_at = now
        for name, active in list(self.active.items()):
            if now - active.used_at > ACTIVE_FOR and not active.bucket.taken:
                del self.active[name]
                active.bucket.local_share(self.sharing.processes)

    def _failed(self, why: str, sent: list[tuple[TokenBucket, int]], now: float) -> None:
        self.metrics.rate_limit_syncs["failed"] += 1
        for bucket, taken in sent:
            # Reported again next time, up to one burst: an outage's own traffic stayed within
            # the shares, and must not come back as a debt that blocks everyone afterwards.
            bucket.taken = min(bucket.taken + taken, int(bucket.limit_burst))
        self.error = why
        if self.down_since is not None:
            return
        self.down_since = now
        if self.fail_open:
            for active in self.active.values():
                active.bucket.local_share(self.sharing.processes)
            log.warning(
                "rate-limit store %s unreachable (%s): limits fail open, this process "
                "allowing 1/%d of each (its share) until the store answers again",
                self.store.where,
                why,
                self.sharing.processes,
            )
        else:
            self.sharing.closed = True
            log.error(
                "rate-limit store %s unreachable (%s): limits fail closed, every limited "
                "request is refused (429) until it answers again",
                self.store.where,
                why,
            )

    def _recovered(self, now: float) -> None:
        if self.down_since is None:
            return
        log.info(
            "rate-limit store %s reachable again after %.1f s; limits shared again",
            self.store.where,
            now - self.down_since,
        )
        self.down_since = None
        self.error = ""
        self.sharing.closed = False

    def warnings(self) -> list[tuple[str, float]]:
        """/readyz's warnings: (code, since when on the monotonic clock)."""
        return [] if self.down_since is None else [(STORE_DOWN, self.down_since)]
