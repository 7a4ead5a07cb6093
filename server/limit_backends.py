"""Where tenant limit state lives: token buckets (requests and tokens per minute) and
concurrency slots. In this process, or in Redis, where each check is one Lua script so several
gateway replicas share one atomic count.

A bucket holds up to `capacity` units and refills at `per_second`; a request takes `amount` now
or is told how long until it could. A slot set holds at most `limit` leases, each with an expiry,
so a replica that dies holding slots gives them back after `ttl_s`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Protocol

from redis.asyncio import Redis

from server.redis_link import RedisLink

NEVER = math.inf  # `take` asked for more than the bucket can ever hold


class LimitBackend(Protocol):
    async def take(self, key: str, capacity: int, per_second: float, amount: int) -> float:
        """Take `amount` from the bucket: 0.0 when taken, else seconds until it could be."""
        ...

    async def give(self, key: str, capacity: int, per_second: float, amount: int) -> None:
        """Return `amount` to the bucket (never beyond its capacity)."""
        ...

    async def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float) -> bool: ...

    async def release_slot(self, key: str, lease: str) -> None: ...


class LocalLimits:
    """This process only: what a single gateway uses, and every replica's fallback."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (level, as of monotonic)
        self._slots: defaultdict[str, dict[str, float]] = defaultdict(dict)  # lease -> expiry

    def _level(self, key: str, capacity: int, per_second: float, now: float) -> float:
        level, as_of = self._buckets.get(key, (float(capacity), now))
        return min(float(capacity), level + (now - as_of) * per_second)

    async def take(self, key: str, capacity: int, per_second: float, amount: int) -> float:
        if amount > capacity:
            return NEVER
        now = time.monotonic()
        level = self._level(key, capacity, per_second, now)
        if level >= amount:
            self._buckets[key] = (level - amount, now)
            return 0.0
        self._buckets[key] = (level, now)
        return (amount - level) / per_second

    async def give(self, key: str, capacity: int, per_second: float, amount: int) -> None:
        now = time.monotonic()
        level = self._level(key, capacity, per_second, now)
        self._buckets[key] = (min(float(capacity), level + amount), now)

    async def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float) -> bool:
        now = time.monotonic()
        leases = self._slots[key]
        for expired in [k for k, expiry in leases.items() if expiry <= now]:
            del leases[expired]
        if len(leases) >= limit:
            return False
        leases[lease] = now + ttl_s
        return True

    async def release_slot(self, key: str, lease: str) -> None:
        self._slots[key].pop(lease, None)


# KEYS[1] bucket; ARGV capacity, per_second, amount. Returns 0 when taken, else the wait in ms
# (-1: never). Time comes from Redis, so replicas with skewed clocks agree. The key expires once
# the bucket would be full again: a missing key is a full bucket.
_TAKE = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
if amount > capacity then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
level = math.min(capacity, level + math.max(0, now - at) * rate)
local wait = 0
if level >= amount then
  level = level - amount
else
  wait = math.ceil((amount - level) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - level) / rate * 1000) + 1000)
return wait
"""

_GIVE = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'level', 'at')
if not state[1] then return 0 end
local level = tonumber(state[1])
local at = tonumber(state[2]) or now
level = math.min(capacity, level + math.max(0, now - at) * rate + amount)
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - level) / rate * 1000) + 1000)
return 0
"""

# KEYS[1] sorted set of leases scored by expiry (ms); ARGV limit, lease, ttl_ms.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class RedisLimits:
    """Shared by every replica; raises RedisUnavailableError when Redis cannot answer."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        client = link.client
        self._take = client.register_script(_TAKE)
        self._give = client.register_script(_GIVE)
        self._acquire = client.register_script(_ACQUIRE)

    def _key(self, key: str) -> str:
        return self._link.key("limits", key)

    async def take(self, key: str, capacity: int, per_second: float, amount: int) -> float:
        args: list[str | int] = [capacity, repr(per_second), amount]
        wait_ms = await self._link.call(
            "limit_take", lambda c: self._take(keys=[self._key(key)], args=args, client=c)
        )
        return NEVER if int(wait_ms) < 0 else int(wait_ms) / 1000

    async def give(self, key: str, capacity: int, per_second: float, amount: int) -> None:
        args: list[str | int] = [capacity, repr(per_second), amount]
        await self._link.call(
            "limit_give", lambda c: self._give(keys=[self._key(key)], args=args, client=c)
        )

    async def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float) -> bool:
        args: list[str | int] = [limit, lease, math.ceil(ttl_s * 1000)]
        granted = await self._link.call(
            "limit_acquire", lambda c: self._acquire(keys=[self._key(key)], args=args, client=c)
        )
        return bool(granted)

    async def release_slot(self, key: str, lease: str) -> None:
        async def release(client: Redis) -> None:
            await client.zrem(self._key(key), lease)

        await self._link.call("limit_release", release)
