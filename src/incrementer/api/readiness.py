"""GET /readyz: whether this process (and, in a `--workers` group, every worker) should get
traffic, with the reasons why not as codes and ages.

A process is not ready while the database fails, while its oldest unflushed increment is older
than --lag-bound, or while its WAL cannot be written. Warnings say what is wrong without making
it unready: the store of the shared rate limits unreachable (every instance shares it, so taking
them all out of a load balancer for it would turn a degraded limit into an outage). In a `--workers` group a load balancer
reaches whichever worker the kernel picks and must get the same verdict from each, so the answer
is the group's: every worker adds what its peers last published (Peers, implemented by the
process layer's Member), each reason naming its worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from incrementer.auth.keyring import SCOPE_ADMIN, KeyRing
from incrementer.auth.reconcile import Reconciler
from incrementer.delivery.durability import AckGate
from incrementer.delivery.flush import Flusher
from incrementer.http import HttpConnection, responses
from incrementer.metrics import Metrics


@dataclass(frozen=True)
class Peer:
    """Another worker of the group, as it last published."""

    index: int
    reasons: list[dict[str, object]]
    lag: float
    pending_keys: int
    warnings: list[dict[str, object]] = field(default_factory=list)


class Peers(Protocol):
    """The other workers of this process's `--workers` group."""

    @property
    def index(self) -> int:
        """This worker's index in the group."""
        ...

    def peers(self, now: float) -> list[Peer]:
        """The other live workers' last published readiness (monotonic clock: one per host)."""
        ...


class Readiness:
    def __init__(
        self,
        flusher: Flusher,
        gate: AckGate,
        lag_bound: float,
        metrics: Metrics,
        keyring: KeyRing | None = None,
        peers: Peers | None = None,
        limits: Reconciler | None = None,
    ) -> None:
        self.flusher = flusher
        self.gate = gate
        self.lag_bound = lag_bound
        self.metrics = metrics
        self.keyring = keyring
        self.group = peers
        """The worker's group, in a `--workers` group: /readyz then answers for every worker."""
        self.limits = limits

    def problems(self, now: float) -> list[tuple[str, float]]:
        """Why this process is not ready: (code, since when on the monotonic clock)."""
        flusher, gate = self.flusher, self.gate
        found: list[tuple[str, float]] = []
        if flusher.db_error is not None:
            found.append((flusher.db_code, flusher.db_failing_since))
        lag = flusher.oldest_pending_age(now)
        if lag > self.lag_bound:
            found.append(("lag_above_bound", now - lag))
        if gate.failure:
            found.append((gate.failure, gate.failed_since))
        return found

    def warnings(self) -> list[tuple[str, float]]:
        """What is wrong without making this process unready: (code, since when)."""
        return [] if self.limits is None else self.limits.warnings()

    def lag(self, now: float) -> float:
        """Seconds the oldest unflushed increment of this process has waited."""
        return self.flusher.oldest_pending_age(now)

    def pending_keys(self) -> int:
        return self.flusher.pending_keys()

    def ready(self, now: float) -> bool:
        """The verdict /readyz gives (for the whole group in a `--workers` group), as a bool."""
        if self.problems(now):
            return False
        group = self.group
        return group is None or not any(peer.reasons for peer in group.peers(now))

    def readyz(self, conn: HttpConnection, authorization: bytes, keep_alive: bool) -> bytes:
        """Codes and ages for anyone (a load balancer); the why (database errors, which may name
        hosts, and overflowed key names, which may be other tenants') only for a caller with an
        API key that has the admin scope, so never when keys are off: the log has it all.

        In a `--workers` group every reason names its worker; lag is the worst and pending keys
        the sum (the other workers' as they published them, at most a quarter of a second
        ago)."""
        flusher, gate = self.flusher, self.gate
        now = time.monotonic()
        lag = self.lag(now)
        pending = self.pending_keys()
        reasons = [reason_entry(code, now - since) for code, since in self.problems(now)]
        warnings = [reason_entry(code, now - since) for code, since in self.warnings()]
        group = self.group
        if group is not None:
            for entry in reasons + warnings:
                entry["worker"] = group.index
            for peer in group.peers(now):
                reasons += peer.reasons
                warnings += peer.warnings
                lag = max(lag, peer.lag)
                pending += peer.pending_keys
        payload: dict[str, object] = {
            "status": "not_ready" if reasons else "ready",
            "reasons": reasons,
            "warnings": warnings,
            "lag_seconds": round(lag, 3),
            "lag_bound_seconds": self.lag_bound,
            "pending_keys": pending,
            "overflowed_keys": len(flusher.overflowed),
        }
        if group is not None:
            payload["worker"] = group.index
        if self.admin(authorization):
            payload["details"] = {
                "database_error": flusher.db_error,
                "wal_error": gate.failure_detail or None,
                "overflowed_keys": {k: str(v) for k, v in flusher.overflowed.items()},
                "rate_limit_store_error": (self.limits.error or None) if self.limits else None,
            }
        status = 503 if reasons else 200
        self.metrics.count_request("readyz", status)
        return responses.json(conn.clock, status, payload, not keep_alive)

    def admin(self, authorization: bytes) -> bool:
        """The request carries a valid API key with the admin scope."""
        if self.keyring is None:
            return False
        principal = self.keyring.authenticate(authorization)
        return principal is not None and bool(principal.scopes & SCOPE_ADMIN)


def reason_entry(code: str, seconds: float, worker: int | None = None) -> dict[str, object]:
    """One reason of a /readyz answer: its code, for how long, and which worker's (a group's)."""
    found: dict[str, object] = {"code": code, "for_seconds": round(seconds, 3)}
    if worker is not None:
        found["worker"] = worker
    return found
