"""Tenant limits: 429s that say which limit and when to retry, token refunds, and each replica
enforcing limits on its own while Redis is down."""

from __future__ import annotations

import pytest

from server.cache.result_store import RedisResultStore
from server.errors import RateLimitError
from server.limits.backends import ProbeOutcome, RedisLimits
from server.limits.tenant_limits import Admitted, TenantLimiter
from server.metrics import Metrics
from server.redis_link import RedisLink
from server.settings import RedisSettings
from server.tenants import Tenant, TenantLimits
from tests.redis_server import RedisServer


def tenant(**limits: int) -> Tenant:
    return Tenant("acme", TenantLimits(**limits))


async def test_requests_per_minute() -> None:
    limiter = TenantLimiter(None, Metrics(), lease_ttl_s=60)
    t = tenant(requests_per_minute=2)
    await limiter.check_request(t)
    await limiter.check_request(t)
    with pytest.raises(RateLimitError) as over:
        await limiter.check_request(t)
    error = over.value
    assert (error.status_code, error.error_type, error.code) == (
        429, "rate_limit_exceeded", "requests_per_minute"
    )  # fmt: skip
    assert 25 <= int(error.headers()["Retry-After"]) <= 30
    await limiter.check_request(tenant())  # no limits: never refused


async def test_tokens_are_reserved_up_front_and_the_unused_part_given_back() -> None:
    limiter = TenantLimiter(None, Metrics(), lease_ttl_s=60)
    t = tenant(tokens_per_minute=1000)
    first = await limiter.reserve(t, 600)
    with pytest.raises(RateLimitError) as over:
        await limiter.reserve(t, 600)
    assert over.value.code == "tokens_per_minute"
    first.record_usage(100)
    await first.close()  # 500 come back
    second = await limiter.reserve(t, 600)
    await second.close()  # usage unknown (a stream cut short): nothing comes back
    with pytest.raises(RateLimitError):
        await limiter.reserve(t, 600)
    refused = await limiter.reserve(t, 300)
    await refused.close(engine_refused=True)  # the engine did no work: all 300 come back
    await (await limiter.reserve(t, 300)).close()


async def test_a_request_larger_than_the_whole_budget_is_refused_outright() -> None:
    limiter = TenantLimiter(None, Metrics(), lease_ttl_s=60)
    with pytest.raises(RateLimitError) as over:
        await limiter.reserve(tenant(tokens_per_minute=100), 101)
    assert "Request too large" in over.value.message


async def test_concurrency_slots_come_back_when_requests_end() -> None:
    limiter = TenantLimiter(None, Metrics(), lease_ttl_s=60)
    t = tenant(max_concurrent=1, tokens_per_minute=100)
    held = await limiter.reserve(t, 10)
    with pytest.raises(RateLimitError) as over:
        await limiter.reserve(t, 10)
    assert over.value.code == "max_concurrent"
    await held.close()
    await (await limiter.reserve(t, 10)).close()
    # A token refusal does not keep the slot it took first.
    with pytest.raises(RateLimitError):
        await limiter.reserve(t, 1000)
    await (await limiter.reserve(t, 10)).close()


async def test_without_redis_each_replica_enforces_limits_alone(redis: RedisServer) -> None:
    metrics = Metrics()
    link = RedisLink(redis.url, RedisSettings(timeout_s=0.2, retry_after_s=30), metrics)
    limiter = TenantLimiter(RedisLimits(link), metrics, lease_ttl_s=60)
    t = tenant(requests_per_minute=2)
    try:
        await limiter.check_request(t)
        redis.kill()
        await limiter.check_request(t)  # served: the local count starts full
        await limiter.check_request(t)
        with pytest.raises(RateLimitError):
            await limiter.check_request(t)
        assert metrics.registry.get_sample_value("loragate_limit_local_fallbacks_total") == 3
    finally:
        redis.ensure_running()
        await link.aclose()


async def test_one_admission_script_stops_at_the_first_answer(redis: RedisServer) -> None:
    metrics = Metrics()
    link = RedisLink(redis.url, RedisSettings(timeout_s=0.5), metrics)
    limiter = TenantLimiter(RedisLimits(link), metrics, lease_ttl_s=60)
    store = RedisResultStore(link, ttl_s=60, claim_ttl_s=60)
    other_replica = RedisResultStore(link, ttl_s=60, claim_ttl_s=60)

    def slots() -> int:
        return int(redis.command("ZCARD", "loragate:limits:acme:concurrent").strip()[1:])

    def claimed(key: str) -> bool:
        return redis.command("EXISTS", f"loragate:claim:{key}").strip() == b":1"

    try:
        t = tenant(requests_per_minute=100, tokens_per_minute=100, max_concurrent=1)
        # A miss: this request leads (claims the key) and takes its slot and tokens.
        led = await limiter.admit(t, 60, store.probe("k1"))
        assert led.probe == ProbeOutcome(None, True) and led.reservation is not None
        assert slots() == 1 and claimed("k1")
        # Refused for the slot: the claim it took is given back.
        with pytest.raises(RateLimitError) as over:
            await limiter.admit(t, 10, store.probe("k2"))
        assert over.value.code == "max_concurrent" and not claimed("k2")
        await led.reservation.close()
        await store.unclaim("k1")
        # Refused for tokens (60 of 100 are used): neither the slot nor the claim is kept.
        with pytest.raises(RateLimitError) as over:
            await limiter.admit(t, 60, store.probe("k2"))
        assert over.value.code == "tokens_per_minute" and slots() == 0 and not claimed("k2")
        # Another replica computes k3: this one follows, and takes neither slot nor tokens.
        assert await other_replica.claim("k3")
        follower = await limiter.admit(t, 30, store.probe("k3"))
        assert follower == Admitted(ProbeOutcome(None, False), None) and slots() == 0
        # A hit takes neither either.
        await store.put("k4", b"cached")
        assert await limiter.admit(t, 30, store.probe("k4")) == Admitted(
            ProbeOutcome(b"cached", False), None
        )
        assert slots() == 0
        # Without a probe (not cacheable): the limits alone.
        plain = await limiter.admit(t, 30, None)
        assert plain.probe is None and plain.reservation is not None and slots() == 1
        await plain.reservation.close()
        # Over the request rate: nothing else is looked at.
        hasty = tenant(requests_per_minute=1, max_concurrent=5)
        await limiter.admit(hasty, 1, None)
        with pytest.raises(RateLimitError) as over:
            await limiter.admit(hasty, 1, store.probe("k4"))
        assert over.value.code == "requests_per_minute"
    finally:
        await link.aclose()
