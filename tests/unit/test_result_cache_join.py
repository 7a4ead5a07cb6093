"""ResultCache.lookup when the admission script's probe is already stale: the request it saw
computing the key on this replica has finished before this one reaches the cache."""

from __future__ import annotations

import asyncio

from server.cache.policy import CachePlan
from server.cache.result_cache import ResultCache
from server.cache.result_store import MemoryResultStore
from server.limits.backends import ProbeOutcome
from server.metrics import Metrics
from server.settings import CacheSettings

KEY = "k"
PLAN = CachePlan(KEY, read=True, write=True)
OWN_CLAIM_SEEN = ProbeOutcome(None, claimed=False, own_claim=True)


def make_cache() -> tuple[ResultCache, MemoryResultStore]:
    store = MemoryResultStore(1 << 20, ttl_s=60)
    return ResultCache(store, CacheSettings(coalesce_wait_s=5), Metrics()), store


def test_a_leader_that_finished_since_the_probe_is_a_hit_not_a_second_computation() -> None:
    async def run() -> str:
        cache, store = make_cache()
        await store.put(KEY, b"answer")  # what the finished leader stored
        async with cache.lookup(PLAN, OWN_CLAIM_SEEN) as found:
            assert found.value in (None, b"answer")
            return found.status

    assert asyncio.run(run()) == "hit"


def test_a_stale_own_claim_with_nothing_stored_is_led_at_once() -> None:
    async def run() -> str:
        cache, _ = make_cache()
        async with asyncio.timeout(1):  # never waits on the stale claim
            async with cache.lookup(PLAN, OWN_CLAIM_SEEN) as found:
                return found.status

    assert asyncio.run(run()) == "miss"


def test_requests_that_saw_the_same_stale_claim_share_one_leader() -> None:
    async def run() -> list[str]:
        cache, _ = make_cache()
        computed = 0

        async def request() -> str:
            nonlocal computed
            async with cache.lookup(PLAN, OWN_CLAIM_SEEN) as found:
                if found.status == "miss":
                    computed += 1
                    await asyncio.sleep(0.05)
                    await found.store(b"answer")
                return found.status

        statuses = await asyncio.gather(*(request() for _ in range(5)))
        assert computed == 1
        return sorted(statuses)

    assert asyncio.run(run()) == ["hit"] * 4 + ["miss"]
