"""One rate-limit budget for many processes: what a process reports and what the shared store
answers.

Every process enforces its limits locally, without waiting on anything (keyring.TokenBucket),
and reconciles periodically (reconcile.py): it reports, per limited API key name or client IP,
how many requests it let through since its last report, and the store answers with the shared
bucket's level once every report it holds is counted. The store is the supervisor of a
`--workers` group (process/budget_channel.py, which keeps a BudgetTable) or Redis for a fleet
(redis_budgets.py, whose script does exactly what `settle` does).

A shared bucket may go below zero: the processes let through more than it held between two
exchanges (each one only sees the others' requests at its next exchange). That debt is real
traffic, so it stays, and every process waits until it is refilled: the overshoot is bounded by
one exchange interval of everyone's traffic, and paid back after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from incrementer.auth.keyring import TokenBucket

MEMBER_TTL = 5.0
"""A process counts as sharing the limits until this long after its last exchange."""


@dataclass(frozen=True, slots=True)
class Usage:
    """One limit's report: what this process let through since its last report."""

    name: str
    """`key:NAME` (an API key's name: the keys of a rotation share it) or `ip:ADDRESS`."""
    taken: int
    rate: float
    burst: float


@dataclass(frozen=True, slots=True)
class Shared:
    """The store's answer to one exchange."""

    processes: int
    """Processes that exchanged within MEMBER_TTL, this one included: how many share a limit
    when each must enforce it alone (a new key, the store unreachable)."""
    levels: list[float] = field(default_factory=list)
    """The shared bucket of each reported limit, in the order reported."""


class BudgetStoreError(Exception):
    """The shared store did not answer (unreachable, refusing, too slow): limits fail open to
    a local share or fail closed, as --rate-limit-store-down says."""


class BudgetStore:
    """Where the shared buckets live. The process layer implements it for a `--workers` group
    (the supervisor) and this package for Redis; the service hands one to its reconciler."""

    where = "the shared store"
    """Where the buckets are, for the log and errors (a URL with its password redacted)."""
    processes = 1
    """How many processes share the limits, until the first exchange says."""

    async def exchange(self, member: str, usage: Sequence[Usage]) -> Shared:
        """Add each usage's requests to its shared bucket and return the buckets' levels;
        `member` names the calling process. BudgetStoreError when the store cannot answer."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""


def charge(bucket: TokenBucket, tokens: int) -> None:
    """Take `tokens` more from a bucket that let a request through (a batch costs one token per
    increment, and the first was taken to let it in): the bucket may go below zero, and the
    client then waits until the rate has refilled it. Reported like any token taken."""
    bucket.tokens -= tokens
    sharing = bucket.sharing
    if not bucket.taken and sharing is not None:
        sharing.reports.append(bucket)  # an exchange has reported the first token already
    bucket.taken += tokens


def settle(level: float, stamp: float, now: float, taken: int, rate: float, burst: float) -> float:
    """A shared bucket's new level: refilled at `rate` since `stamp` up to `burst`, less the
    requests just reported (which may take it below zero)."""
    return min(burst, level + max(0.0, now - stamp) * rate) - taken


class BudgetTable:
    """The shared buckets held in one process's memory: the supervisor's, for its workers."""

    FORGET_AFTER = 60.0
    """A bucket left alone this long past full is forgotten: it would start full anyway."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}  # name -> (level, stamp)
        self.members: dict[str, float] = {}  # member -> when it last exchanged
        self._swept = 0.0

    def exchange(self, member: str, usage: Sequence[Usage], now: float) -> Shared:
        self.members[member] = now
        levels = []
        buckets = self.buckets
        for item in usage:
            level, stamp = buckets.get(item.name, (item.burst, now))
            level = settle(level, stamp, now, item.taken, item.rate, item.burst)
            buckets[item.name] = (level, now)
            levels.append(level)
        if now - self._swept > self.FORGET_AFTER:
            self._sweep(now)
        live = sum(1 for seen in self.members.values() if now - seen <= MEMBER_TTL)
        return Shared(max(1, live), levels)

    def _sweep(self, now: float) -> None:
        self._swept = now
        self.members = {m: seen for m, seen in self.members.items() if now - seen <= MEMBER_TTL}
        self.buckets = {
            name: (level, stamp)
            for name, (level, stamp) in self.buckets.items()
            if now - stamp < self.FORGET_AFTER or level < 0
        }
