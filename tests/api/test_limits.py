"""Tenant limits (429) and admission control (503) in front of the fake engine, in one gateway
and across two gateways sharing Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.redis_link import RedisLink
from tests.api.conftest import make_settings, running_gateway, serving
from tests.api.test_errors import assert_envelope
from tests.api.test_openai_routes import chat_body
from tests.api.test_result_cache import GREEDY, cache_of, post
from tests.redis_server import RedisServer


def assert_rate_limited(response: httpx.Response, limit: str) -> None:
    error = assert_envelope(response, 429)
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", limit)
    assert int(response.headers["Retry-After"]) >= 1


def test_requests_per_minute(tmp_path: Path, knobs: FakeEngineKnobs) -> None:
    settings = make_settings(tmp_path, limits={"acme": {"requests_per_minute": 3}})
    with running_gateway(settings, knobs) as gw:
        body = chat_body("counted", **GREEDY)
        responses = [post(gw, body) for _ in range(4)]
        # Cache hits count too: a request is a request.
        assert [cache_of(r) for r in responses[:3]] == ["miss", "hit", "hit"]
        assert_rate_limited(responses[3], "requests_per_minute")
        assert 15 <= int(responses[3].headers["Retry-After"]) <= 20
        assert post(gw, body, tenant="globex").status_code == 200  # others are not affected
        rejected = gw.app.state.services.metrics.registry.get_sample_value(
            "loragate_limit_rejections_total", {"limit": "requests_per_minute"}
        )
        assert rejected == 1


def test_tokens_are_reserved_and_the_unused_part_given_back(
    tmp_path: Path, knobs: FakeEngineKnobs
) -> None:
    settings = make_settings(tmp_path, limits={"acme": {"tokens_per_minute": 100}})
    with running_gateway(settings, knobs) as gw:
        # Each reserves ~80 tokens and uses ~10: without the refund the second would not fit.
        for i in range(3):
            assert post(gw, chat_body(f"short {i}", max_tokens=80)).status_code == 200
        too_big = post(gw, chat_body("big", max_tokens=200))
        assert_rate_limited(too_big, "tokens_per_minute")
        assert "Request too large" in too_big.json()["error"]["message"]


def test_tokens_held_by_running_requests_count(tmp_path: Path, knobs: FakeEngineKnobs) -> None:
    settings = make_settings(tmp_path, limits={"acme": {"tokens_per_minute": 100}})
    knobs.ttft_s = 0.3
    with running_gateway(settings, knobs) as gw:
        responses = gw.send_together([chat_body(f"at once {i}", max_tokens=60) for i in range(2)])
        assert sorted(r.status_code for r in responses) == [200, 429]


def test_max_concurrent(tmp_path: Path, knobs: FakeEngineKnobs) -> None:
    settings = make_settings(tmp_path, limits={"acme": {"max_concurrent": 2}})
    knobs.ttft_s = 0.3
    with running_gateway(settings, knobs) as gw:
        responses = gw.send_together([chat_body(f"parallel {i}") for i in range(4)])
        assert sorted(r.status_code for r in responses) == [200, 200, 429, 429]
        for r in responses:
            if r.status_code == 429:
                assert_rate_limited(r, "max_concurrent")
        assert post(gw, chat_body("after")).status_code == 200  # the slots came back


def test_a_full_engine_queue_is_503_not_429(tmp_path: Path, knobs: FakeEngineKnobs) -> None:
    settings = make_settings(tmp_path, admission={"max_running": 1, "max_queued": 1})
    knobs.ttft_s = 0.3
    with running_gateway(settings, knobs) as gw:
        responses = gw.send_together([chat_body(f"queued {i}") for i in range(4)])
        assert sorted(r.status_code for r in responses) == [200, 200, 503, 503]
        for r in responses:
            if r.status_code == 503:
                error = assert_envelope(r, 503)
                assert error["type"] == "service_unavailable"
                assert error["code"] == "server_overloaded"
                assert r.headers["Retry-After"] == "1"
        metrics = gw.app.state.services.metrics.registry
        assert metrics.get_sample_value("loragate_engine_queue_depth", {"engine": "local"}) == 0
        running = metrics.get_sample_value("loragate_engine_requests_running", {"engine": "local"})
        assert running == 0


def test_a_cache_hit_needs_no_engine_turn(tmp_path: Path, knobs: FakeEngineKnobs) -> None:
    settings = make_settings(tmp_path, admission={"max_running": 1, "max_queued": 0})
    knobs.ttft_s = 0.3
    with running_gateway(settings, knobs) as gw:
        cached = chat_body("cached", **GREEDY)
        post(gw, cached)
        responses = gw.send_together([chat_body("slow"), cached, cached])
        assert [r.status_code for r in responses] == [200, 200, 200]


@pytest.mark.parametrize("redis_up", [True, False], ids=["shared", "redis-down"])
def test_two_replicas_share_one_limit_through_redis(
    tmp_path: Path, knobs: FakeEngineKnobs, redis: RedisServer, redis_up: bool
) -> None:
    settings = make_settings(
        tmp_path,
        limits={"acme": {"requests_per_minute": 4}},
        redis_url=redis.url,
        redis={"timeout_s": 0.2, "retry_after_s": 30},
    )
    fake = create_fake_engine_app(knobs)
    with (
        serving(fake) as fake.state.url,
        running_gateway(settings, knobs, fake) as a,
        running_gateway(settings, knobs, fake) as b,
    ):
        if not redis_up:
            redis.kill()
        statuses = [post(gw, chat_body(f"r{i}")).status_code for i, gw in enumerate([a, b] * 4)]
    redis.ensure_running()
    if redis_up:
        assert sorted(statuses) == [200] * 4 + [429] * 4
    else:
        # Each replica enforces the limit alone: twice the limit gets through, no more.
        assert statuses == [200] * 8


def slots_held(redis: RedisServer, tenant: str) -> int:
    reply = redis.command("ZCARD", f"loragate:limits:{tenant}:concurrent")
    return int(reply.strip().lstrip(b":"))


def test_a_redis_stall_as_requests_end_costs_the_tenant_no_slots(
    tmp_path: Path, knobs: FakeEngineKnobs, redis: RedisServer
) -> None:
    """Releases made while the gateway skips a stalled Redis (SIGSTOP; the breaker open, so
    they never reach it) are made once Redis is back: the tenant gets its full concurrency at
    once, not after the leases expire."""
    settings = make_settings(
        tmp_path,
        limits={"acme": {"max_concurrent": 2}},
        redis_url=redis.url,
        redis={"timeout_s": 0.1, "retry_after_s": 0.5, "failure_threshold": 1,
               "lease_ttl_s": 600},
    )  # fmt: skip
    knobs.ttft_s = 0.8
    with running_gateway(settings, knobs) as gw:
        limiter = gw.app.state.services.generation._limiter
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(gw.send_together, [chat_body(f"held {i}") for i in range(2)])
            deadline = time.monotonic() + 5
            while slots_held(redis, "acme") < 2:
                assert time.monotonic() < deadline, "the requests never took their slots"
                time.sleep(0.02)
            redis.pause()
            try:
                # A call that times out opens the breaker: the gateway skips Redis.
                assert (
                    post(gw, chat_body("opens the breaker", **GREEDY), "globex").status_code == 200
                )
                assert (
                    gw.app.state.services.metrics.registry.get_sample_value("loragate_redis_up")
                    == 0
                )
                # Both requests end while Redis is skipped: their releases are kept for later.
                assert [r.status_code for r in running.result(timeout=10)] == [200, 200]
                assert limiter.unreleased == 2
            finally:
                redis.resume()
        deadline = time.monotonic() + 5
        while slots_held(redis, "acme") > 0 or limiter.unreleased > 0:
            assert time.monotonic() < deadline, "the missed releases were never made"
            time.sleep(0.1)
        knobs.ttft_s = 0.3
        responses = gw.send_together([chat_body(f"after {i}") for i in range(2)])
        assert [r.status_code for r in responses] == [200, 200]


def test_a_cacheable_request_checks_its_limits_and_the_cache_in_one_round_trip(
    tmp_path: Path, knobs: FakeEngineKnobs, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(
        tmp_path,
        limits={
            "acme": {"requests_per_minute": 100, "tokens_per_minute": 10_000, "max_concurrent": 4}
        },
        redis_url=redis.url,
    )
    calls: list[str] = []
    real_call = RedisLink.call

    async def counted(self: RedisLink, op: str, command: Any) -> Any:
        calls.append(op)
        return await real_call(self, op, command)

    monkeypatch.setattr(RedisLink, "call", counted)
    with running_gateway(settings, knobs) as gw:
        body = chat_body("counted trips", stream=True, **GREEDY)
        calls.clear()
        engine_calls = gw.engine_calls
        with gw.client.stream("POST", "/v1/chat/completions", json=body, headers=gw.headers()) as r:
            assert r.status_code == 200 and cache_of(r) == "miss"
            r.read()
        assert gw.engine_calls == engine_calls + 1
        # Before the engine: one script (rate, cache read and claim, slot, tokens). After: the
        # result stored, the claim dropped, unused tokens given back, the slot released.
        assert calls[0] == "admit" and calls.count("admit") == 1
        assert sorted(calls[1:]) == ["cache_put", "cache_unclaim", "limit_give", "limit_release"]
        calls.clear()
        assert cache_of(post(gw, {**body, "stream": False})) == "hit"
        assert calls == ["admit"]  # a hit takes no slot or tokens
        assert slots_held(redis, "acme") == 0


def test_a_request_longer_than_its_lease_keeps_its_slot(
    tmp_path: Path, knobs: FakeEngineKnobs, redis: RedisServer
) -> None:
    """Leases are short (a dead replica's slots come back soon) and renewed while the request
    runs: a request that outlives its first expiry still holds its slot."""
    settings = make_settings(
        tmp_path,
        limits={"acme": {"max_concurrent": 1}},
        redis_url=redis.url,
        redis={"lease_ttl_s": 3},
    )
    knobs.ttft_s = 6
    with running_gateway(settings, knobs) as gw, ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, gw, chat_body("long"))
        deadline = time.monotonic() + 5
        while slots_held(redis, "acme") < 1:
            assert time.monotonic() < deadline, "the request never took its slot"
            time.sleep(0.02)
        time.sleep(4.5)  # past the lease's first expiry
        assert slots_held(redis, "acme") == 1
        refused = post(gw, chat_body("meanwhile"))
        assert_rate_limited(refused, "max_concurrent")
        assert running.result(timeout=10).status_code == 200
        assert slots_held(redis, "acme") == 0
