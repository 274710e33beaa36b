"""API keys (Bearer) and token-bucket rate limits.

A key looks like `ik_<key_id>.<secret>`. key_id is public and finds the row; the SHA-256 of the
whole key is compared in constant time. Successful lookups are cached by the raw header bytes until
the next reload, so the hot path pays one dict lookup per request, not a hash.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from incrementer.store.base import ApiKey

KEY_PREFIX = b"ik_"
CACHE_LIMIT = 10_000
KEY_ID_LIMIT = 64  # ours are 12 hex digits; anything much longer is not worth a query
IP_BUCKET_LIMIT = 100_000


def new_key() -> tuple[str, str, str]:
    """A fresh key: (the key to hand out once, its key_id, the hex SHA-256 to store)."""
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX.decode()}{key_id}.{secrets.token_urlsafe(32)}"
    return key, key_id, hashlib.sha256(key.encode()).hexdigest()


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until one is available."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def refund(self) -> None:
        """Give back the token of a successful take() whose request turned out not to count."""
        self.tokens += 1.0


@dataclass(slots=True)
class Principal:
    name: str
    digest: bytes
    bucket: TokenBucket | None


class KeyRing:
    """The active API keys of the database, reloaded every --auth-refresh seconds."""

    def __init__(self, default_rate: float, default_burst: int) -> None:
        self.default_rate = default_rate
        self.default_burst = default_burst
        self.by_id: dict[bytes, Principal] = {}
        self.cache: dict[bytes, Principal] = {}

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
            if bucket is None or bucket.rate != rate or bucket.burst != max(burst, 1):
                bucket = TokenBucket(rate, max(burst, 1), now)
        return Principal(key.name, bytes.fromhex(key.key_hash), bucket)

    def key_id(self, authorization: bytes) -> bytes | None:
        """The key id of a Bearer header that is neither cached nor loaded, the one a lookup
        could find; None for a header that cannot hold a key, or whose key id is known."""
        if authorization in self.cache:
            return None
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token.startswith(KEY_PREFIX):
            return None
        key_id, dot, secret = token[len(KEY_PREFIX) :].partition(b".")
        if not (dot and secret and 0 < len(key_id) <= KEY_ID_LIMIT and key_id.isalnum()):
            return None
        return None if key_id in self.by_id else key_id

    def authenticate(self, authorization: bytes) -> Principal | None:
        principal = self.cache.get(authorization)
        if principal is not None:
            return principal
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip()
        if not token.startswith(KEY_PREFIX):
            return None
        key_id, dot, _ = token[len(KEY_PREFIX) :].partition(b".")
        found = self.by_id.get(key_id) if dot else None
        digest = hashlib.sha256(token).digest()
        # Hash and compare even for an unknown key_id, so timing says nothing about which exist.
        expected = found.digest if found is not None else bytes(32)
        if not hmac.compare_digest(digest, expected) or found is None:
            return None
        if len(self.cache) >= CACHE_LIMIT:
            self.cache.clear()
        self.cache[authorization] = found
        return found


class ClientLimiter:
    """Per client IP buckets, for when auth is off."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.buckets: dict[str, TokenBucket] = {}

    def bucket(self, ip: str, now: float) -> TokenBucket:
        bucket = self.buckets.get(ip)
        if bucket is None:
            if len(self.buckets) >= IP_BUCKET_LIMIT:
                self.prune(now)
            bucket = self.buckets[ip] = TokenBucket(self.rate, self.burst, now)
        return bucket

    def prune(self, now: float) -> None:
        """Forget clients whose bucket has refilled: they would start full anyway."""
        self.buckets = {
            ip: b for ip, b in self.buckets.items() if b.tokens + (now - b.stamp) * b.rate < b.burst
        }
