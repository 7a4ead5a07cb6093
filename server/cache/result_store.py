"""Where cached results live: a bounded in-process LRU (the embedded default) or Redis (shared by
every gateway replica). Values are opaque bytes that expire after the TTL.

Claims let replicas coalesce: the first replica to claim a key computes it, the others wait for
the value to appear or the claim to go. In-process there is no one else to coordinate with, so a
claim always succeeds (coalescing within the process is `result_cache`'s job).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Protocol

from redis.asyncio import Redis

from server.limits.backends import CacheProbe
from server.redis_link import RedisLink


class ResultStore(Protocol):
    """Raises RedisUnavailableError (Redis store) when it cannot answer."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None: ...

    async def claim(self, key: str) -> bool:
        """True: the caller computes `key` and must `unclaim` it after storing the value. Call
        it only with no request for `key` in flight in this process: a claim already held by
        this process is then stale, and taken over."""
        ...

    async def unclaim(self, key: str) -> None: ...

    async def unclaim_many(self, keys: list[str]) -> None:
        """`unclaim` each of `keys`, in one round trip."""
        ...

    async def poll(self, key: str) -> tuple[bytes | None, bool]:
        """The value if it is there yet, and whether another replica still claims the key."""
        ...

    def probe(self, key: str) -> CacheProbe | None:
        """How the admission script reads and claims `key` in Redis; None: not in Redis."""
        ...

    async def renew_claims(self, keys: list[str]) -> None:
        """Push back the expiry of this process's claims on `keys` (its leaders still run)."""
        ...


class MemoryResultStore:
    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # LRU order
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + self._ttl_s, value)
        self._bytes += len(value)
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self._bytes -= len(value)

    async def claim(self, key: str) -> bool:
        return True

    async def unclaim(self, key: str) -> None:
        return None

    async def unclaim_many(self, keys: list[str]) -> None:
        return None

    async def poll(self, key: str) -> tuple[bytes | None, bool]:
        return await self.get(key), False

    def probe(self, key: str) -> CacheProbe | None:
        return None

    async def renew_claims(self, keys: list[str]) -> None:
        return None


# Delete the claims only if still ours: one may have expired and been taken by another.
_UNCLAIM = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""

# KEYS claims; ARGV owner, ttl_ms. Only claims still ours: one may have expired and been taken.
_RENEW_CLAIMS = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]) end
end
return 0
"""

# Claim the key, or find it already ours: the caller has no request in flight for it here, so a
# claim of ours is one its leader failed to drop (Redis was away), never to be waited on.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class RedisResultStore:
    def __init__(self, link: RedisLink, ttl_s: int, claim_ttl_s: float) -> None:
        self._link = link
        self._ttl_s = ttl_s
        self._claim_ttl_ms = max(1, int(claim_ttl_s * 1000))
        self._owner = uuid.uuid4().hex  # this replica, as the value of its claims
        self._unclaim = link.client.register_script(_UNCLAIM)
        self._claim = link.client.register_script(_CLAIM)
        self._renew_claims = link.client.register_script(_RENEW_CLAIMS)

    def _value_key(self, key: str) -> str:
        return self._link.key("cache", key)

    def _claim_key(self, key: str) -> str:
        return self._link.key("claim", key)

    async def get(self, key: str) -> bytes | None:
        async def get(client: Redis) -> bytes | None:
            value = await client.get(self._value_key(key))
            return value.encode() if isinstance(value, str) else value

        return await self._link.call("cache_get", get)

    async def put(self, key: str, value: bytes) -> None:
        async def put(client: Redis) -> None:
            await client.set(self._value_key(key), value, ex=self._ttl_s)

        await self._link.call("cache_put", put)

    async def claim(self, key: str) -> bool:
        args: list[str | int] = [self._owner, self._claim_ttl_ms]

        async def undo(claimed: int) -> None:
            if claimed:
                await self.unclaim(key)

        claimed = await self._link.call_or_undo(
            "cache_claim",
            lambda c: self._claim(keys=[self._claim_key(key)], args=args, client=c),
            undo,
        )
        return bool(claimed)

    async def unclaim(self, key: str) -> None:
        await self.unclaim_many([key])

    async def unclaim_many(self, keys: list[str]) -> None:
        claim_keys = [self._claim_key(key) for key in keys]
        await self._link.call(
            "cache_unclaim",
            lambda c: self._unclaim(keys=claim_keys, args=[self._owner], client=c),
        )

    async def poll(self, key: str) -> tuple[bytes | None, bool]:
        async def poll(client: Redis) -> tuple[bytes | None, bool]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.get(self._value_key(key))
                pipe.exists(self._claim_key(key))
                value, claimed = await pipe.execute()
            return value, bool(claimed)

        return await self._link.call("cache_poll", poll)

    async def renew_claims(self, keys: list[str]) -> None:
        claim_keys = [self._claim_key(key) for key in keys]
        args: list[str | int] = [self._owner, self._claim_ttl_ms]
        await self._link.call(
            "cache_renew_claims",
            lambda c: self._renew_claims(keys=claim_keys, args=args, client=c),
        )

    def probe(self, key: str) -> CacheProbe:
        return CacheProbe(
            self._value_key(key), True, self._claim_key(key), self._owner, self._claim_ttl_ms
        )
