"""Where tenant limit state lives: token buckets (requests and tokens per minute) and
concurrency slots. In this process, or in Redis, where each check is one Lua script so several
gateway replicas share one atomic count.

A bucket holds up to `capacity` units and refills at `per_second`; a request takes `amount` now
or is told how long until it could. A slot set holds at most `limit` leases. In Redis each lease
has an expiry that its holder renews while the request runs, so a replica that dies holding
slots gives them back within one lease period; in this process a lease lives until released
(nothing can die holding it without the process dying too).

`RedisLimits.admit` makes every check a request needs before the engine in one round trip, and
in the same script looks the request up in the result cache and claims it (`CacheProbe`).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal, Protocol

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

    async def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float) -> bool:
        """Hold one of `limit` slots under `lease`; in Redis it expires after `ttl_s` unless
        renewed."""
        ...

    async def release_slot(self, key: str, lease: str) -> None: ...


class LocalLimits:
    """This process only: what a single gateway uses, and every replica's fallback."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (level, as of monotonic)
        self._slots: defaultdict[str, set[str]] = defaultdict(set)  # key -> leases

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
        leases = self._slots[key]
        if len(leases) >= limit:
            return False
        leases.add(lease)
        return True

    async def release_slot(self, key: str, lease: str) -> None:
        leases = self._slots.get(key)
        if leases is not None:
            leases.discard(lease)
            if not leases:
                del self._slots[key]


# The scripts share these Lua functions. Time comes from Redis, so replicas with skewed clocks
# agree. A bucket's key expires once it would be full again: a missing key is a full bucket.
_LUA_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

# Take `amount` from the bucket: 0 when taken, else the wait in ms (-1: never).
_LUA_TAKE = """
local function take(key, capacity, rate, amount, now)
  if amount > capacity then return -1 end
  local state = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(state[1]) or capacity
  local at = tonumber(state[2]) or now
  level = math.min(capacity, level + math.max(0, now - at) / 1000 * rate)
  local wait = 0
  if level >= amount then
    level = level - amount
  else
    wait = math.ceil((amount - level) / rate * 1000)
  end
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((capacity - level) / rate * 1000) + 1000)
  return wait
end
"""

# A sorted set of leases scored by expiry (ms): 1 when `lease` got a slot, else 0.
_LUA_ACQUIRE = """
local function acquire(key, limit, lease, ttl_ms, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= limit then return 0 end
  redis.call('ZADD', key, now + ttl_ms, lease)
  redis.call('PEXPIRE', key, ttl_ms)
  return 1
end
"""

# KEYS[1] bucket; ARGV capacity, per_second, amount.
_TAKE = (
    _LUA_NOW_MS
    + _LUA_TAKE
    + """
return take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), now_ms())
"""
)

# Give `amount` back to the bucket, never beyond its capacity.
_LUA_GIVE = """
local function give(key, capacity, rate, amount, now)
  local state = redis.call('HMGET', key, 'level', 'at')
  if not state[1] then return end
  local level = tonumber(state[1])
  local at = tonumber(state[2]) or now
  level = math.min(capacity, level + math.max(0, now - at) / 1000 * rate + amount)
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((capacity - level) / rate * 1000) + 1000)
end
"""

# KEYS[1] bucket; ARGV capacity, per_second, amount.
_GIVE = (
    _LUA_NOW_MS
    + _LUA_GIVE
    + """
give(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), now_ms())
return 0
"""
)

# KEYS[1] slot set; ARGV limit, lease, ttl_ms.
_ACQUIRE = (
    _LUA_NOW_MS
    + _LUA_ACQUIRE
    + """
return acquire(KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), now_ms())
"""
)

# KEYS slot sets; ARGV[1] ttl_ms, then for each key the number of its leases and the leases.
# A lease that expired while Redis was unreachable is added back: its request still runs.
_RENEW = (
    _LUA_NOW_MS
    + """
local ttl = tonumber(ARGV[1])
local expiry = now_ms() + ttl
local i = 2
for _, key in ipairs(KEYS) do
  local count = tonumber(ARGV[i])
  for j = i + 1, i + count do redis.call('ZADD', key, expiry, ARGV[j]) end
  redis.call('PEXPIRE', key, ttl)
  i = i + count + 1
end
return 0
"""
)

# Everything a request checks before the engine, stopping at the first answer:
#   KEYS: rpm bucket, cached value, claim, slot set, tpm bucket (each used only when asked)
#   ARGV: rpm capacity (0: no limit), rpm rate; read the value (0/1); claim ttl_ms (0: no
#         claim), claim owner; slot limit (0: no limit), lease, lease ttl_ms; tpm capacity
#         (0: no limit), tpm rate, tpm amount
# Returns {answer, number, value}: {'rpm', wait_ms}; {'hit', 0, value}; {'follow', own} (another
# request holds the claim, own = 1 when it is this owner's: no slot or tokens taken); {'slot'}
# refused; {'tpm', wait_ms or -1} refused; {'ok', claimed}. A refusal takes nothing: the slot
# and claim it took are given back.
_ADMIT = (
    _LUA_NOW_MS
    + _LUA_TAKE
    + _LUA_ACQUIRE
    + """
local now = now_ms()
local rpm = tonumber(ARGV[1])
if rpm > 0 then
  local wait = take(KEYS[1], rpm, tonumber(ARGV[2]), 1, now)
  if wait ~= 0 then return {'rpm', wait} end
end
if ARGV[3] == '1' then
  local value = redis.call('GET', KEYS[2])
  if value then return {'hit', 0, value} end
end
local claim_ttl = tonumber(ARGV[4])
local claimed = 0
if claim_ttl > 0 then
  if not redis.call('SET', KEYS[3], ARGV[5], 'NX', 'PX', claim_ttl) then
    if redis.call('GET', KEYS[3]) == ARGV[5] then return {'follow', 1} end
    return {'follow', 0}
  end
  claimed = 1
end
local function unclaim()
  if claimed == 1 then redis.call('DEL', KEYS[3]) end
end
local slots = tonumber(ARGV[6])
if slots > 0 and acquire(KEYS[4], slots, ARGV[7], tonumber(ARGV[8]), now) == 0 then
  unclaim()
  return {'slot'}
end
local tpm = tonumber(ARGV[9])
if tpm > 0 then
  local wait = take(KEYS[5], tpm, tonumber(ARGV[10]), tonumber(ARGV[11]), now)
  if wait ~= 0 then
    if slots > 0 then redis.call('ZREM', KEYS[4], ARGV[7]) end
    unclaim()
    return {'tpm', wait}
  end
end
return {'ok', claimed}
"""
)

# What an admitted request took, given back (its caller was cancelled as the script ran):
#   KEYS: slot set, tpm bucket, claim; ARGV: lease ('' : none), tpm capacity (0: none), tpm
#   rate, tpm amount, claim owner ('': none)
_UNDO_ADMIT = (
    _LUA_NOW_MS
    + _LUA_GIVE
    + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
if tonumber(ARGV[2]) > 0 then
  give(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), now_ms())
end
if ARGV[5] ~= '' and redis.call('GET', KEYS[3]) == ARGV[5] then redis.call('DEL', KEYS[3]) end
return 0
"""
)


@dataclass(frozen=True)
class Bucket:
    """A token bucket to take from: `amount` of `capacity`, refilled at `per_second`."""

    key: str
    capacity: int
    per_second: float
    amount: int


@dataclass(frozen=True)
class SlotAsk:
    key: str
    limit: int
    lease: str
    ttl_s: float


@dataclass(frozen=True)
class CacheProbe:
    """The result-cache part of an admission: read `value_key` (when `read`), and claim
    `claim_key` for `owner` (when `claim_ttl_ms` > 0) unless the value is there."""

    value_key: str
    read: bool
    claim_key: str
    owner: str
    claim_ttl_ms: int


@dataclass(frozen=True)
class ProbeOutcome:
    """The cached value (a hit), or a miss that this request leads (`claimed`) or that another
    request already computes: of this replica (`own_claim`; a live one is in flight here, or it
    is stale: its holder failed to drop it) or of another."""

    value: bytes | None
    claimed: bool
    own_claim: bool = False


Answer = Literal["rpm", "hit", "follow", "slot", "tpm", "ok"]


@dataclass(frozen=True)
class AdmitAnswer:
    """What the admission script answered: `wait_s` for a bucket refusal (NEVER: the request
    can never fit), `value` for a hit, `claimed` for an admitted request that holds the claim,
    `own_claim` when the claim another request holds is this owner's."""

    answer: Answer
    wait_s: float = 0.0
    value: bytes | None = None
    claimed: bool = False
    own_claim: bool = False


class RedisLimits:
    """Shared by every replica; raises RedisUnavailableError when Redis cannot answer."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        client = link.client
        self._take = client.register_script(_TAKE)
        self._give = client.register_script(_GIVE)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._admit = client.register_script(_ADMIT)
        self._undo_admit = client.register_script(_UNDO_ADMIT)

    def _key(self, key: str) -> str:
        return self._link.key("limits", key)

    async def take(self, key: str, capacity: int, per_second: float, amount: int) -> float:
        args: list[str | int] = [capacity, repr(per_second), amount]

        async def undo(wait_ms: int) -> None:
            if int(wait_ms) == 0:
                await self.give(key, capacity, per_second, amount)

        wait_ms = await self._link.call_or_undo(
            "limit_take", lambda c: self._take(keys=[self._key(key)], args=args, client=c), undo
        )
        return _wait_s(int(wait_ms))

    async def give(self, key: str, capacity: int, per_second: float, amount: int) -> None:
        args: list[str | int] = [capacity, repr(per_second), amount]
        await self._link.call(
            "limit_give", lambda c: self._give(keys=[self._key(key)], args=args, client=c)
        )

    async def acquire_slot(self, key: str, limit: int, lease: str, ttl_s: float) -> bool:
        args: list[str | int] = [limit, lease, _ms(ttl_s)]

        async def undo(granted: int) -> None:
            if granted:
                await self.release_slot(key, lease)

        granted = await self._link.call_or_undo(
            "limit_acquire",
            lambda c: self._acquire(keys=[self._key(key)], args=args, client=c),
            undo,
        )
        return bool(granted)

    async def release_slot(self, key: str, lease: str) -> None:
        await self.release_slots([(key, lease)])

    async def release_slots(self, leases: list[tuple[str, str]]) -> None:
        """Release many leases in one round trip."""

        async def release(client: Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for key, lease in leases:
                    pipe.zrem(self._key(key), lease)
                await pipe.execute()

        await self._link.call("limit_release", release)

    async def renew_slots(self, held: dict[str, list[str]], ttl_s: float) -> None:
        """Push back the expiry of every lease in `held` (slot key -> leases), in one call."""
        keys = [self._key(key) for key in held]
        args: list[str | int] = [_ms(ttl_s)]
        for leases in held.values():
            args += [len(leases), *leases]
        await self._link.call("limit_renew", lambda c: self._renew(keys=keys, args=args, client=c))

    async def admit(
        self,
        rpm: Bucket | None,
        cache: CacheProbe | None,
        slot: SlotAsk | None,
        tpm: Bucket | None,
    ) -> AdmitAnswer:
        """Every check before the engine in one round trip; see `_ADMIT`."""
        absent = self._link.key("none")  # a key no part reads or writes
        keys = [
            self._key(rpm.key) if rpm else absent,
            cache.value_key if cache else absent,
            cache.claim_key if cache else absent,
            self._key(slot.key) if slot else absent,
            self._key(tpm.key) if tpm else absent,
        ]
        args: list[str | int] = [
            rpm.capacity if rpm else 0, repr(rpm.per_second) if rpm else 0,
            int(cache is not None and cache.read),
            cache.claim_ttl_ms if cache else 0, cache.owner if cache else "",
            slot.limit if slot else 0, slot.lease if slot else "", _ms(slot.ttl_s) if slot else 0,
            tpm.capacity if tpm else 0, repr(tpm.per_second) if tpm else 0,
            tpm.amount if tpm else 0,
        ]  # fmt: skip

        async def undo(reply: list[Any]) -> None:
            if _text(reply[0]) != "ok":
                return  # refused, a hit or a follower: it took nothing but the request count
            claimed = cache is not None and bool(int(reply[1]))
            undo_args: list[str | int] = [
                slot.lease if slot else "",
                tpm.capacity if tpm else 0, repr(tpm.per_second) if tpm else 0,
                tpm.amount if tpm else 0,
                cache.owner if cache and claimed else "",
            ]  # fmt: skip
            await self._link.call(
                "admit_undo",
                lambda c: self._undo_admit(
                    keys=[keys[3], keys[4], keys[2]], args=undo_args, client=c
                ),
            )

        reply = await self._link.call_or_undo(
            "admit", lambda c: self._admit(keys=keys, args=args, client=c), undo
        )
        match _text(reply[0]):
            case "rpm":
                return AdmitAnswer("rpm", wait_s=_wait_s(int(reply[1])))
            case "tpm":
                return AdmitAnswer("tpm", wait_s=_wait_s(int(reply[1])))
            case "hit":
                value = reply[2]
                return AdmitAnswer("hit", value=value.encode() if isinstance(value, str) else value)
            case "ok":
                return AdmitAnswer("ok", claimed=bool(int(reply[1])))
            case "follow":
                return AdmitAnswer("follow", own_claim=bool(int(reply[1])))
            case "slot":
                return AdmitAnswer("slot")
        raise RuntimeError(f"unexpected admission answer {reply!r}")


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _wait_s(wait_ms: int) -> float:
    return NEVER if wait_ms < 0 else wait_ms / 1000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
