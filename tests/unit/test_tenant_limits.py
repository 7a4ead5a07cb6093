"""Tenant limits: 429s that say which limit and when to retry, token refunds, and each replica
enforcing limits on its own while Redis is down."""

from __future__ import annotations

import pytest

from server.errors import RateLimitError
from server.limit_backends import RedisLimits
from server.metrics import Metrics
from server.redis_link import RedisLink
from server.settings import RedisSettings
from server.tenant_limits import TenantLimiter
from server.tenants import Tenant, TenantLimits
from tests.redis_server import RedisServer


def tenant(**limits: int) -> Tenant:
    return Tenant("acme", TenantLimits(**limits))


async def test_requests_per_minute() -> None:
    limiter = TenantLimiter(None, Metrics(), slot_ttl_s=60)
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
    limiter = TenantLimiter(None, Metrics(), slot_ttl_s=60)
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
    limiter = TenantLimiter(None, Metrics(), slot_ttl_s=60)
    with pytest.raises(RateLimitError) as over:
        await limiter.reserve(tenant(tokens_per_minute=100), 101)
    assert "Request too large" in over.value.message


async def test_concurrency_slots_come_back_when_requests_end() -> None:
    limiter = TenantLimiter(None, Metrics(), slot_ttl_s=60)
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
    limiter = TenantLimiter(RedisLimits(link), metrics, slot_ttl_s=60)
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
