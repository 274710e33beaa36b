"""The shared buckets of a fleet, in Redis (--rate-limit-store redis://HOST:PORT/DB, or rediss://).

One exchange is one EVALSHA of the script below, whatever the number of limits: it registers
the calling process, refills and charges every reported bucket exactly as budgets.settle does
(on Redis's clock, so the instances' clocks never matter), and returns the processes sharing the
limits and each bucket's level. A bucket is a hash (`level`, `stamp`) under
`incrementer:budget:NAME` that expires once it would be full again; the processes are a sorted
set `incrementer:members` scored by their last exchange. Give each fleet its own database
number: two fleets on one database would share the budgets of equally named keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from incrementer.auth.budgets import MEMBER_TTL, BudgetStore, BudgetStoreError, Shared, Usage
from incrementer.urls import redact_url, scrub

PREFIX = "incrementer:budget:"
MEMBERS = "incrementer:members"
CONNECT_TIMEOUT = 1.0

# KEYS: the members set, then one bucket per usage. ARGV: member, member TTL, then per usage
# its taken, rate and burst. Levels go back as text: Redis turns a Lua number into an integer.
SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2000))
local answer = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS do
    local at = 3 + (i - 2) * 3
    local taken, rate, burst = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
    local state = redis.call('HMGET', KEYS[i], 'level', 'stamp')
    local level, stamp = tonumber(state[1]), tonumber(state[2])
    if level == nil or stamp == nil then
        level, stamp = burst, now
    end
    level = math.min(burst, level + math.max(0, now - stamp) * rate) - taken
    redis.call('HSET', KEYS[i], 'level', string.format('%.17g', level), 'stamp',
        string.format('%.17g', now))
    redis.call('PEXPIRE', KEYS[i], math.ceil(((burst - level) / rate + 60) * 1000))
    answer[i] = string.format('%.17g', level)
end
return answer
"""


class RedisBudgets(BudgetStore):
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.where = redact_url(url)
        self._client = redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=timeout
        )
        self._script = self._client.register_script(SCRIPT)

    async def exchange(self, member: str, usage: Sequence[Usage]) -> Shared:
        keys = [MEMBERS, *(PREFIX + item.name for item in usage)]
        args: list[Any] = [member, MEMBER_TTL]
        for item in usage:
            args += [item.taken, repr(float(item.rate)), repr(float(item.burst))]
        try:
            answer = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise BudgetStoreError(scrub(str(exc), self.url) or type(exc).__name__) from exc
        return Shared(max(1, int(answer[0])), [float(level) for level in answer[1:]])

    async def close(self) -> None:
        await self._client.aclose()
