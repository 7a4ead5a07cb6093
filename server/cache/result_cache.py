"""The result cache as requests see it: look up, wait for an identical request already in
flight (coalescing), or lead: compute, store, and hand the result to those waiting.

Coalescing works at two levels. In this process, followers await the leader's future. Across
replicas (Redis), the leader claims the key in Redis (a claim that expires unless renewed: its
leader renews it while it computes) and the other replicas' leaders poll until the value appears
or the claim goes. A follower whose leader fails or is cancelled goes on and
computes the result itself; a follower never waits longer than `coalesce_wait_s`.

With Redis, the first read and claim are made by the tenant limiter's admission script, in the
same round trip as the request's limits (`probe`); `lookup` then starts from its outcome.

A cache failure never fails a request: it is counted (`error`) and the request is served uncached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.cache.policy import CachePlan, CacheStatus
from server.cache.result_store import ResultStore
from server.limits.backends import CacheProbe, ProbeOutcome
from server.metrics import Metrics
from server.redis_link import RedisUnavailableError, run_upkeep
from server.settings import CacheSettings

logger = logging.getLogger(__name__)

POLL_FIRST_S = 0.01
POLL_MAX_S = 0.1
MAX_UNCLAIMS_PER_ROUND = 1000
MAX_UNCLAIMED = 100_000  # beyond, the oldest is left to expire


@dataclass
class Lookup:
    """The outcome of a lookup: `value` to answer with (a hit), or the caller computes the result
    and passes it to `store` (a miss or bypass)."""

    status: CacheStatus
    value: bytes | None = None
    _cache: ResultCache | None = field(default=None, repr=False)
    _key: str | None = None
    _write: bool = False
    stored: bytes | None = field(default=None, repr=False)  # what followers are handed

    async def store(self, value: bytes) -> None:
        if self._cache is None or self._key is None:
            return
        self.stored = value
        if self._write:
            await self._cache.put(self._key, value)


@dataclass
class _Flight:
    key: str
    future: asyncio.Future[bytes | None]
    claimed: bool = False


class ResultCache:
    def __init__(self, store: ResultStore, settings: CacheSettings, metrics: Metrics) -> None:
        self._store = store
        self._max_entry_bytes = settings.max_entry_bytes
        self._wait_s = settings.coalesce_wait_s
        self._metrics = metrics
        self._flights: dict[str, asyncio.Future[bytes | None]] = {}
        self._unclaimed: dict[str, None] = {}  # claims to drop when Redis is back, in order
        self._claimed: set[str] = set()  # keys this process leads with a claim in Redis
        self._renew_every_s = settings.claim_ttl_s / 3

    def probe(self, plan: CachePlan) -> CacheProbe | None:
        """What the admission script should read and claim for `plan`; None: nothing (no
        lookup, or a store outside Redis)."""
        if plan.key is None or not plan.read:
            return None
        return self._store.probe(plan.key)

    @contextlib.asynccontextmanager
    async def lookup(
        self, plan: CachePlan, probed: ProbeOutcome | None = None
    ) -> AsyncIterator[Lookup]:
        """Look `plan` up, starting from what the admission script found (`probed`) if it
        probed the key."""
        key = plan.key
        if key is None or not plan.read:
            self._count("bypass")
            yield Lookup("bypass", None, self, key, plan.write)
            return
        if probed is None:
            value, failed = await self._get(key)
        else:
            value, failed = probed.value, False
        if value is not None:
            self._count("hit")
            yield Lookup("hit", value)
            return
        value, flight = await self._join(key, probed)
        if value is not None:
            self._count("hit")
            yield Lookup("hit", value)
            return
        self._count("error" if failed else "miss")
        lookup = Lookup("bypass" if failed else "miss", None, self, key, plan.write)
        try:
            yield lookup
        finally:
            if flight is not None:
                await self._land(flight, lookup.stored)

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self._max_entry_bytes:
            return
        started = time.perf_counter()
        try:
            await self._store.put(key, value)
        except RedisUnavailableError:
            return  # counted by the Redis link; the result was served all the same
        self._metrics.cache_seconds.labels("put").observe(time.perf_counter() - started)

    async def _get(self, key: str) -> tuple[bytes | None, bool]:
        started = time.perf_counter()
        try:
            value = await self._store.get(key)
        except RedisUnavailableError:
            return None, True
        self._metrics.cache_seconds.labels("get").observe(time.perf_counter() - started)
        return value, False

    async def _join(
        self, key: str, probed: ProbeOutcome | None
    ) -> tuple[bytes | None, _Flight | None]:
        """Wait for an identical request in flight, or lead one. Returns (value, None) when
        another request computed it, (None, flight) when the caller leads, (None, None) when
        the caller should compute on its own. A caller whose admission claimed the key in
        Redis leads at once: it must never wait while holding the claim others wait on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        if probed is not None and probed.claimed:
            return None, self._lead(key, claimed=True)
        while True:
            while (leader := self._flights.get(key)) is not None:
                try:
                    async with asyncio.timeout_at(deadline):
                        value = await asyncio.shield(leader)
                except TimeoutError:
                    return None, None
                if value is not None:
                    self._metrics.cache_coalesced.labels("local").inc()
                    return value, None
                # The leader failed or was cancelled: try to lead.
            if probed is None or not probed.own_claim:
                break
            # This replica's claim, and no request here computes the key any more: its leader
            # has finished since the probe (its value is stored by now), or failed to drop the
            # claim. Never wait on that claim; look once more before computing.
            value, _ = await self._get(key)
            if value is not None:
                self._metrics.cache_coalesced.labels("local").inc()
                return value, None
            if key not in self._flights:
                return None, self._lead(key, claimed=True)
            # Another request here took the lead during the look: follow it.
        flight = self._lead(key, claimed=False)
        try:
            if probed is None:
                try:
                    flight.claimed = await self._store.claim(key)
                    if flight.claimed:
                        self._claimed.add(key)
                except RedisUnavailableError:
                    # Lead within this process only. A claim that reached Redis (this one, or
                    # the admission script's) may still land once it answers again: drop it then.
                    self._remember_unclaim(key)
                    return None, flight
            # else: the admission script found the claim held by another replica
            if not flight.claimed:
                value = await self._wait_remote(key, deadline)
                if value is not None:
                    self._metrics.cache_coalesced.labels("remote").inc()
                    await self._land(flight, value)
                    return value, None
            return None, flight
        except BaseException:
            await self._land(flight, None)
            raise

    def _lead(self, key: str, claimed: bool) -> _Flight:
        flight = _Flight(key, asyncio.get_running_loop().create_future(), claimed)
        self._flights[key] = flight.future
        if claimed:
            self._claimed.add(key)
        return flight

    async def _wait_remote(self, key: str, deadline: float) -> bytes | None:
        """Another replica computes `key`: wait for its value, until its claim goes."""
        loop = asyncio.get_running_loop()
        delay = POLL_FIRST_S
        while loop.time() + delay < deadline:
            await asyncio.sleep(delay)
            try:
                value, claimed = await self._store.poll(key)
            except RedisUnavailableError:
                return None
            if value is not None or not claimed:
                return value
            delay = min(delay * 2, POLL_MAX_S)
        return None

    async def _land(self, flight: _Flight, value: bytes | None) -> None:
        # Followers first (no await before this), so a cancelled leader never strands them.
        if not flight.future.done():
            flight.future.set_result(value)
        if self._flights.get(flight.key) is flight.future:
            del self._flights[flight.key]
        if flight.claimed:
            flight.claimed = False
            self._claimed.discard(flight.key)
            try:
                await self._store.unclaim(flight.key)
            except RedisUnavailableError:
                self._remember_unclaim(flight.key)

    def _remember_unclaim(self, key: str) -> None:
        if len(self._unclaimed) >= MAX_UNCLAIMED:
            del self._unclaimed[next(iter(self._unclaimed))]  # it expires on its own
        self._unclaimed[key] = None

    async def run(self) -> None:
        """Until cancelled: renew the claims of this process's leaders every third of their
        lifetime (so a dead replica's claims go soon), and drop the claims Redis missed the
        release of every second (other replicas would wait on them until they expire)."""
        await run_upkeep("claim", self.retry_unclaims, self.renew_claims, self._renew_every_s)

    async def renew_claims(self) -> None:
        if not self._claimed:
            return
        # Failing, they live until their expiry; renewed on the next round.
        with contextlib.suppress(RedisUnavailableError):
            await self._store.renew_claims(list(self._claimed))

    async def retry_unclaims(self) -> None:
        # Not while a request here computes the key: its claim, if any, is live until it ends.
        keys = [key for key in self._unclaimed if key not in self._flights]
        keys = keys[:MAX_UNCLAIMS_PER_ROUND]
        if not keys:
            return
        try:
            await self._store.unclaim_many(keys)
        except RedisUnavailableError:
            return  # Redis is still away: next round
        for key in keys:
            self._unclaimed.pop(key, None)

    @property
    def unclaimed(self) -> int:
        """Claims whose release Redis has not taken yet."""
        return len(self._unclaimed)

    def _count(self, result: str) -> None:
        self._metrics.cache_requests.labels(result).inc()
