"""The result stores and limit backends, in-process and in a real Redis, held to one contract;
and the Redis link that keeps a dead or stalled Redis from failing requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.cache.result_store import MemoryResultStore, RedisResultStore, ResultStore
from server.limits.backends import NEVER, LimitBackend, LocalLimits, RedisLimits
from server.metrics import Metrics
from server.redis_link import RedisLink, RedisUnavailableError
from server.settings import RedisSettings
from tests.redis_server import RedisServer

FAST = RedisSettings(timeout_s=0.2, retry_after_s=0.5)


@pytest.fixture
async def link(redis: RedisServer) -> AsyncIterator[RedisLink]:
    link = RedisLink(redis.url, FAST, Metrics())
    yield link
    await link.aclose()


@pytest.fixture(params=["local", "redis"])
async def limits(request: pytest.FixtureRequest) -> AsyncIterator[LimitBackend]:
    if request.param == "local":
        yield LocalLimits()
        return
    link = RedisLink(request.getfixturevalue("redis").url, FAST, Metrics())
    yield RedisLimits(link)
    await link.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ResultStore]:
    if request.param == "memory":
        yield MemoryResultStore(max_bytes=1 << 20, ttl_s=60)
        return
    link = RedisLink(request.getfixturevalue("redis").url, FAST, Metrics())
    yield RedisResultStore(link, ttl_s=60, claim_ttl_s=5)
    await link.aclose()


async def test_store_round_trips_values(store: ResultStore) -> None:
    assert await store.get("k") is None
    await store.put("k", b"\x00value\xff")
    assert await store.get("k") == b"\x00value\xff"


async def test_memory_store_is_bounded_and_expires() -> None:
    store = MemoryResultStore(max_bytes=10, ttl_s=60)
    await store.put("a", b"12345")
    await store.put("b", b"12345")
    await store.get("a")  # a is now the most recently used
    await store.put("c", b"12345")
    assert await store.get("b") is None
    assert await store.get("a") == b"12345" and await store.get("c") == b"12345"
    await store.put("huge", b"x" * 11)  # larger than the whole store: not kept
    assert await store.get("huge") is None

    expiring = MemoryResultStore(max_bytes=100, ttl_s=0.05)
    await expiring.put("a", b"1")
    await asyncio.sleep(0.1)
    assert await expiring.get("a") is None


async def test_redis_claims_exclude_other_replicas(link: RedisLink) -> None:
    mine = RedisResultStore(link, ttl_s=60, claim_ttl_s=5)
    theirs = RedisResultStore(link, ttl_s=60, claim_ttl_s=5)
    assert await mine.claim("k")
    assert not await theirs.claim("k")
    # A replica claims only keys it computes nothing for: finding its own claim, it is stale
    # (its leader failed to drop it), and taken over.
    assert await mine.claim("k")
    assert await theirs.poll("k") == (None, True)
    await theirs.unclaim("k")  # not theirs to release
    assert await theirs.poll("k") == (None, True)
    await mine.put("k", b"v")
    await mine.unclaim("k")
    assert await theirs.poll("k") == (b"v", False)


async def test_redis_claims_expire_when_a_replica_dies(link: RedisLink) -> None:
    dead = RedisResultStore(link, ttl_s=60, claim_ttl_s=0.1)
    assert await dead.claim("k")
    await asyncio.sleep(0.2)
    assert await RedisResultStore(link, ttl_s=60, claim_ttl_s=5).claim("k")


async def test_bucket_takes_until_empty_then_says_how_long_to_wait(limits: LimitBackend) -> None:
    for _ in range(3):
        assert await limits.take("t:rpm", 3, 3 / 60, 1) == 0
    wait = await limits.take("t:rpm", 3, 3 / 60, 1)
    assert 15 < wait <= 20  # one request refills in 20 s
    assert await limits.take("t:rpm", 3, 3 / 60, 4) == NEVER  # more than it can ever hold
    assert await limits.take("other:rpm", 3, 3 / 60, 1) == 0  # buckets are per key


async def test_bucket_refills_and_takes_refunds(limits: LimitBackend) -> None:
    assert await limits.take("t:tpm", 100, 1000.0, 100) == 0
    assert await limits.take("t:tpm", 100, 1000.0, 100) > 0
    await asyncio.sleep(0.15)  # 1000/s refills the 100 in 0.1 s
    assert await limits.take("t:tpm", 100, 1000.0, 100) == 0
    slow = 100 / 3600
    assert await limits.take("t:slow", 100, slow, 100) == 0
    await limits.give("t:slow", 100, slow, 60)
    assert await limits.take("t:slow", 100, slow, 60) == 0
    assert await limits.take("t:slow", 100, slow, 10) > 0
    await limits.give("t:slow", 100, slow, 10_000)  # never beyond capacity
    assert await limits.take("t:slow", 100, slow, 100) == 0


async def test_slots_are_bounded_and_released(limits: LimitBackend) -> None:
    assert await limits.acquire_slot("t:c", 2, "a", 60)
    assert await limits.acquire_slot("t:c", 2, "b", 60)
    assert not await limits.acquire_slot("t:c", 2, "c", 60)
    await limits.release_slot("t:c", "a")
    assert await limits.acquire_slot("t:c", 2, "c", 60)


async def test_local_slots_never_expire() -> None:
    # Nothing can die holding a lease in this process without the process dying too.
    limits = LocalLimits()
    assert await limits.acquire_slot("t:c", 1, "a", 0.01)
    await asyncio.sleep(0.05)
    assert not await limits.acquire_slot("t:c", 1, "b", 60)


async def test_redis_leases_expire_unless_renewed(link: RedisLink) -> None:
    limits = RedisLimits(link)
    assert await limits.acquire_slot("t:short", 1, "x", 0.05)
    await asyncio.sleep(0.1)  # its holder died: the lease expired
    assert await limits.acquire_slot("t:short", 1, "y", 0.3)
    for _ in range(3):  # renewed past its first expiry, it still holds the slot
        await asyncio.sleep(0.15)
        await limits.renew_slots({"t:short": ["y"]}, 0.3)
    assert not await limits.acquire_slot("t:short", 1, "z", 60)
    await limits.release_slots([("t:short", "y")])
    assert await limits.acquire_slot("t:short", 1, "z", 0.05)
    await asyncio.sleep(0.1)
    # A lease that expired while Redis was away is put back: its request still runs.
    await limits.renew_slots({"t:short": ["z"], "t:other": ["a", "b"]}, 60)
    assert not await limits.acquire_slot("t:short", 1, "w", 60)
    assert not await limits.acquire_slot("t:other", 2, "c", 60)


async def test_redis_limits_are_shared_by_replicas(redis: RedisServer) -> None:
    links = [RedisLink(redis.url, FAST, Metrics()) for _ in range(2)]
    try:
        a, b = (RedisLimits(link) for link in links)
        results = await asyncio.gather(*(x.take("t:rpm", 5, 5 / 60, 1) for x in [a, b] * 5))
        assert sum(1 for wait in results if wait == 0) == 5
    finally:
        for link in links:
            await link.aclose()


async def test_dead_redis_fails_fast_and_recovers(redis: RedisServer) -> None:
    metrics = Metrics()
    link = RedisLink(redis.url, FAST, metrics)
    store = RedisResultStore(link, ttl_s=60, claim_ttl_s=5)
    try:
        await store.put("k", b"v")
        redis.kill()
        with pytest.raises(RedisUnavailableError):
            await store.get("k")
        assert metrics.registry.get_sample_value("loragate_redis_up") == 0
        started = time.perf_counter()
        with pytest.raises(RedisUnavailableError):
            await store.get("k")  # left alone: no network call at all
        assert time.perf_counter() - started < 0.05
        redis.start()
        await asyncio.sleep(FAST.retry_after_s)
        assert await store.get("k") is None  # back (empty: it was not persisted)
        assert metrics.registry.get_sample_value("loragate_redis_up") == 1
    finally:
        redis.ensure_running()
        await link.aclose()


async def test_stalled_redis_costs_one_timeout(redis: RedisServer) -> None:
    link = RedisLink(redis.url, FAST, Metrics())
    store = RedisResultStore(link, ttl_s=60, claim_ttl_s=5)
    try:
        await store.put("k", b"v")
        redis.pause()
        started = time.perf_counter()
        results: list[Any] = await asyncio.gather(
            *(store.get("k") for _ in range(20)), return_exceptions=True
        )
        elapsed = time.perf_counter() - started
        assert all(isinstance(r, RedisUnavailableError) for r in results)
        assert elapsed < FAST.timeout_s * 3
    finally:
        redis.resume()
        await link.aclose()


async def test_a_caller_cancelled_mid_acquire_leaks_no_slot(
    link: RedisLink, redis: RedisServer
) -> None:
    """Cancelled while its script is on the way (the client left), the acquire still lands in
    Redis; what it took is given back once it answers, not left to expire."""
    limits = RedisLimits(link)
    assert await limits.acquire_slot("t:warm", 1, "w", 1)  # a pooled connection, open
    redis.pause()  # the script waits in Redis's socket until Redis runs again
    try:
        acquiring = asyncio.create_task(limits.acquire_slot("t:c", 1, "gone", 600))
        await asyncio.sleep(0.02)
        acquiring.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acquiring
    finally:
        redis.resume()
    deadline = time.monotonic() + 2
    while not await limits.acquire_slot("t:c", 1, "next", 600):
        assert time.monotonic() < deadline, "the cancelled acquire kept its slot"
        await asyncio.sleep(0.02)
