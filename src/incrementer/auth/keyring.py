"""API keys (Bearer) and token-bucket rate limits, each bucket shared with the other processes of
a group or a fleet when they share the limit (Sharing; reconcile.py keeps them in step).

A key looks like `ik_<key_id>.<secret>`. key_id is public and finds the row; the SHA-256 of the
whole key is compared in constant time. The header takes one form only: the scheme `Bearer` (in any
case, RFC 9110 11.1), one space, the key; padding (two spaces, a tab, a trailing space) is
refused, so one key has one spelling that matters.

Successful checks are cached until the next reload, keyed by the normalised form of the key
(`Bearer <key>`, the scheme in this case): every spelling of one key shares one entry, so the cache
holds at most one entry per valid key and a client cannot push another's out by sending its own key
in many spellings. The hot path looks the raw header up directly, one dict lookup: the usual
spelling is the normalised one, and any other takes the general path, which normalises it. Only
past CACHE_LIMIT keys does an entry have to go: the least recently used one, and the hot path then
also keeps the order of use (CACHE_CROWDED), so that below it a hit costs nothing more.

Each key carries its scopes and prefix (SCOPE_WRITE, SCOPE_READ, SCOPE_ADMIN; api/access.py checks
them); `writes_anywhere` says in one attribute whether the fast path may take an increment for it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass

from incrementer.store.base import SCOPES, ApiKey

KEY_PREFIX = b"ik_"
BEARER = b"Bearer "
CACHE_LIMIT = 10_000
CACHE_CROWDED = CACHE_LIMIT // 2
"""Past this many cached keys, hits keep the order of use too, for the LRU eviction."""
KEY_ID_LIMIT = 64  # ours are 12 hex digits; anything much longer is not worth a query
IP_BUCKET_LIMIT = 100_000


def new_key() -> tuple[str, str, str]:
    """A fresh key: (the key to hand out once, its key_id, the hex SHA-256 to store)."""
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX.decode()}{key_id}.{secrets.token_urlsafe(32)}"
    return key, key_id, hashlib.sha256(key.encode()).hexdigest()


class Sharing:
    """What the buckets of a process share with its reconciler (reconcile.py) when their limits
    are shared with other processes (a `--workers` group, or a fleet on Redis): the buckets
    that let a request through since the last exchange, how many processes share each limit,
    and whether limited requests are refused outright (the store unreachable, fail-closed)."""

    __slots__ = ("closed", "processes", "reports")

    def __init__(self, processes: int) -> None:
        self.reports: list[TokenBucket] = []
        self.processes = max(1, processes)
        self.closed = False


class TokenBucket:
    """A token bucket: `limit_rate` per second, up to `limit_burst`, the limit as configured.

    Alone, a process enforces that limit with it. With `sharing`, the bucket is this process's
    copy of a bucket the group or the fleet shares: every exchange with the shared store
    (reconcile.py) sets its level to the shared one (`shared`), and `taken` counts what it let
    through since, which the next exchange reports. A bucket no exchange covers (new here, idle
    for a while, or the store unreachable and failing open) enforces this process's share of the
    limit (`local_share`): rate and burst divided by the processes sharing it."""

    __slots__ = (
        "burst",
        "fields_prefix",
        "last_fields",
        "last_left",
        "last_wait",
        "limit_burst",
        "limit_rate",
        "name",
        "rate",
        "sharing",
        "stamp",
        "taken",
        "tokens",
    )

    def __init__(
        self, rate: float, burst: float, now: float, name: str = "", sharing: Sharing | None = None
    ) -> None:
        self.limit_rate = rate
        self.limit_burst = burst
        self.name = name
        """What the limit applies to, as the shared store knows it: `key:NAME` or `ip:ADDRESS`."""
        self.sharing = sharing
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now
        self.taken = 0
        self.fields_prefix = policy_fields(name.partition(":")[0], rate, burst)
        # The last fields built, reused while they read the same (a bucket at its burst does).
        self.last_left = -1
        self.last_wait = -1
        self.last_fields = b""
        if sharing is not None:
            self.local_share(sharing.processes)

    def take(self, now: float) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until one is available."""
        sharing = self.sharing
        if sharing is not None and sharing.closed:
            return 1.0
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            if not self.taken and sharing is not None:
                sharing.reports.append(self)  # the next exchange reports it
            self.taken += 1
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def refund(self) -> None:
        """Give back the token of a successful take() whose request turned out not to count."""
        self.tokens += 1.0
        self.taken -= 1

    def local_share(self, processes: int) -> None:
        """Enforce this process's share of the limit on its own, without the shared level: a
        burst of at least one request, so a limit smaller than its processes still lets a
        request through to start an exchange."""
        self.rate = self.limit_rate / processes
        self.burst = max(1.0, self.limit_burst / processes)
        if self.tokens > self.burst:
            self.tokens = self.burst

    def shared(self, level: float, now: float) -> None:
        """The shared store's answer: the shared bucket holds `level` after every report it
        has, this process's last one included; what this process let through since it sent
        that report (`taken`) is not in it yet."""
        self.rate = self.limit_rate
        self.burst = self.limit_burst
        self.tokens = level - self.taken
        self.stamp = now

    def fields(self) -> bytes:
        """The RateLimit-Policy and RateLimit header fields (draft-ietf-httpapi-ratelimit-headers)
        for the bucket as it is now: the requests left (r) and, unless the bucket is full, the
        seconds until one more is (t)."""
        sharing = self.sharing
        if sharing is not None and sharing.closed:
            return self.fields_prefix + b"0;t=1\r\n"  # as take() says while failing closed
        tokens = self.tokens
        whole = math.floor(tokens)
        wait = 0
        if tokens < self.burst:
            wait = math.ceil((max(whole + 1, 1) - tokens) / self.rate)
        left = max(whole, 0)
        if left == self.last_left and wait == self.last_wait:
            return self.last_fields
        if wait:
            built = self.fields_prefix + b"%d;t=%d\r\n" % (left, wait)
        else:
            built = self.fields_prefix + b"%d\r\n" % left
        self.last_left, self.last_wait, self.last_fields = left, wait, built
        return built


def policy_fields(policy: str, rate: float, burst: float) -> bytes:
    """The fields' constant part: the policy as a quota of `burst` requests per the seconds the
    bucket takes to refill (rounded up: a window may not be a fraction), and the start of the
    RateLimit field, to which only the remaining requests and the wait are added per answer."""
    name = f'"per-{policy or "client"}"'
    window = max(1, math.ceil(burst / rate)) if rate > 0 else 1
    return (
        f"RateLimit-Policy: {name};q={math.floor(burst)};w={window}\r\nRateLimit: {name};r="
    ).encode()


SCOPE_WRITE, SCOPE_READ, SCOPE_ADMIN = 1, 2, 4
ALL_SCOPES = SCOPE_WRITE | SCOPE_READ | SCOPE_ADMIN
SCOPE_BITS = dict(zip(SCOPES, (SCOPE_WRITE, SCOPE_READ, SCOPE_ADMIN), strict=True))
# RFC 9110 11.2's token68: what may follow `Bearer ` (one space); anything else is refused.
_TOKEN68 = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")


def scope_mask(scopes: tuple[str, ...]) -> int:
    mask = 0
    for scope in scopes:
        mask |= SCOPE_BITS.get(scope, 0)
    return mask


def bearer_token(authorization: bytes) -> bytes | None:
    """The token of `Bearer <token>` (the scheme in any case, one space, a token68); None for
    any other form, padded ones included."""
    if authorization[:7].lower() != b"bearer ":
        return None
    token = authorization[7:]
    return token if _TOKEN68.fullmatch(token) else None


@dataclass(slots=True)
class Principal:
    name: str
    digest: bytes
    bucket: TokenBucket | None
    scopes: int = ALL_SCOPES
    """SCOPE_* bits."""
    prefix: str | None = None
    """Set: the key may only use counters whose names start with it."""
    writes_anywhere: bool = True
    """Write scope and no prefix: the fast path may take an increment without looking further."""


class KeyRing:
    """The active API keys of the database, reloaded every --auth-refresh seconds."""

    def __init__(
        self, default_rate: float, default_burst: int, sharing: Sharing | None = None
    ) -> None:
        self.default_rate = default_rate
        self.default_burst = default_burst
        self.sharing = sharing
        self.by_id: dict[bytes, Principal] = {}
        self.cache: dict[bytes, Principal] = {}
        """Normalised header (`Bearer <key>`) -> its key, least recently used first once crowded."""
        self.crowded = False
        """More than CACHE_CROWDED entries: a hit then moves its entry to the end."""

    def load(self, keys: list[ApiKey], now: float) -> None:
        """Replace the key set; buckets of keys that stay keep their state. The keys of one name
        (a rotation's old and new key, during its grace period) share one bucket: a rate limit
        belongs to the name."""
        old = {p.name: p for p in self.by_id.values()}
        loaded: dict[str, Principal] = {}
        by_id: dict[bytes, Principal] = {}
        for key in keys:
            kept = loaded.get(key.name) or old.get(key.name)
            by_id[key.key_id.encode()] = loaded[key.name] = self._principal(key, kept, now)
        self.by_id = by_id
        self.cache = {}  # a revoked key must stop working now, not when its cache entry ages
        self.crowded = False

    def add(self, key: ApiKey, now: float) -> None:
        """One key found since the last load (its first request): the next load keeps it if it
        is still active. A key sharing its name with one already here (a rotation) shares its
        bucket, as the two would after a load."""
        kept = next((p for p in self.by_id.values() if p.name == key.name), None)
        self.by_id[key.key_id.encode()] = self._principal(key, kept, now)

    def _principal(self, key: ApiKey, kept: Principal | None, now: float) -> Principal:
        rate = key.rate if key.rate is not None else self.default_rate
        burst = key.burst if key.burst is not None else self.default_burst
        bucket = None
        if rate > 0:
            bucket = kept.bucket if kept is not None and kept.bucket is not None else None
            if bucket is None or bucket.limit_rate != rate or bucket.limit_burst != max(burst, 1):
                bucket = TokenBucket(rate, max(burst, 1), now, f"key:{key.name}", self.sharing)
        scopes = scope_mask(key.scopes)
        return Principal(
            key.name,
            bytes.fromhex(key.key_hash),
            bucket,
            scopes,
            key.prefix,
            bool(scopes & SCOPE_WRITE) and key.prefix is None,
        )

    def key_id(self, authorization: bytes) -> bytes | None:
        """The key id of a Bearer header that is neither cached nor loaded, the one a lookup
        could find; None for a header that cannot hold a key, or whose key id is known."""
        if authorization in self.cache:
            return None
        token = bearer_token(authorization)
        if token is None or not token.startswith(KEY_PREFIX):
            return None
        key_id, dot, secret = token[len(KEY_PREFIX) :].partition(b".")
        if not (dot and secret and 0 < len(key_id) <= KEY_ID_LIMIT and key_id.isalnum()):
            return None
        return None if key_id in self.by_id else key_id

    def authenticate(self, authorization: bytes) -> Principal | None:
        cache = self.cache
        principal = cache.get(authorization)
        if principal is None:
            token = bearer_token(authorization)
            if token is None:
                return None
            authorization = BEARER + token  # the normalised form, which the cache is keyed by
            principal = cache.get(authorization)
            if principal is None:
                return self._check(token, authorization)
        if self.crowded:
            self.used(authorization, principal)
        return principal

    def used(self, normalised: bytes, principal: Principal) -> None:
        """Mark a cached key as the most recently used (dicts keep insertion order)."""
        cache = self.cache
        del cache[normalised]
        cache[normalised] = principal

    def _check(self, token: bytes, normalised: bytes) -> Principal | None:
        """A token the cache does not hold: checked against the keyring, cached if valid."""
        if not token.startswith(KEY_PREFIX):
            return None
        key_id, dot, _ = token[len(KEY_PREFIX) :].partition(b".")
        found = self.by_id.get(key_id) if dot else None
        digest = hashlib.sha256(token).digest()
        # Hash and compare even for an unknown key_id, so timing says nothing about which exist.
        expected = found.digest if found is not None else bytes(32)
        if not hmac.compare_digest(digest, expected) or found is None:
            return None
        cache = self.cache
        if len(cache) >= CACHE_LIMIT:
            del cache[next(iter(cache))]  # the least recently used
        cache[normalised] = found
        self.crowded = len(cache) > CACHE_CROWDED
        return found


class ClientLimiter:
    """Per client IP buckets, for when auth is off."""

    def __init__(self, rate: float, burst: int, sharing: Sharing | None = None) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.sharing = sharing
        self.buckets: dict[str, TokenBucket] = {}

    def bucket(self, ip: str, now: float) -> TokenBucket:
        bucket = self.buckets.get(ip)
        if bucket is None:
            if len(self.buckets) >= IP_BUCKET_LIMIT:
                self.prune(now)
            bucket = self.buckets[ip] = TokenBucket(
                self.rate, self.burst, now, f"ip:{ip}", self.sharing
            )
        return bucket

    def prune(self, now: float) -> None:
        """Forget clients whose bucket has refilled: they would start full anyway."""
        self.buckets = {
            ip: b for ip, b in self.buckets.items() if b.tokens + (now - b.stamp) * b.rate < b.burst
        }
