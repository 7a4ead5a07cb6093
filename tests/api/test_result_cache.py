"""The result cache in front of the fake engine: what hits, what misses, what bypasses,
coalescing of identical requests, and Redis failing without failing a request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.settings import Settings
from tests.adapter_factory import write_peft_adapter
from tests.api.conftest import MODEL, Gateway, make_settings, running_gateway, serving
from tests.api.test_adapters_admin import upload
from tests.api.test_openai_routes import chat_body, sse_events
from tests.redis_server import RedisServer

CHAT = "/v1/chat/completions"
GREEDY = {"temperature": 0, "max_tokens": 8}


def post(
    gateway: Gateway, body: dict[str, Any], tenant: str = "acme", **headers: str
) -> httpx.Response:
    return gateway.client.post(CHAT, json=body, headers={**gateway.headers(tenant), **headers})


def cache_of(response: httpx.Response) -> str:
    return response.headers["x-loragate-cache"]


def cache_count(gateway: Gateway, result: str) -> float:
    value = gateway.app.state.services.metrics.registry.get_sample_value(
        "loragate_cache_requests_total", {"result": result}
    )
    return value or 0.0


@pytest.fixture
def redis_settings(tmp_path: Path, redis: RedisServer) -> Settings:
    return make_settings(
        tmp_path,
        redis_url=redis.url,
        redis={"timeout_s": 0.2, "retry_after_s": 0.3},
        engine={"health_interval_s": 0.2, "max_loras": 2},
        max_loaded_adapters=2,
    )


@pytest.fixture
def redis_gateway(redis_settings: Settings, knobs: FakeEngineKnobs) -> Iterator[Gateway]:
    with running_gateway(redis_settings, knobs) as gw:
        yield gw


@pytest.fixture(params=["memory", "redis"])
def any_gateway(request: pytest.FixtureRequest) -> Gateway:
    name = "gateway" if request.param == "memory" else "redis_gateway"
    gw: Gateway = request.getfixturevalue(name)
    return gw


def test_a_repeated_greedy_request_is_served_from_the_cache(any_gateway: Gateway) -> None:
    gw = any_gateway
    body = chat_body("what is cached", **GREEDY)
    first, second = post(gw, body), post(gw, body)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (cache_of(first), cache_of(second)) == ("miss", "hit")
    assert second.content == first.content  # byte for byte
    assert gw.engine_calls == 1
    assert (cache_count(gw, "miss"), cache_count(gw, "hit")) == (1, 1)


def test_streamed_and_plain_requests_share_an_entry(any_gateway: Gateway) -> None:
    gw = any_gateway
    body = chat_body("stream me", **GREEDY)
    plain = post(gw, body)
    streamed = post(gw, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert cache_of(streamed) == "hit"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain.json()["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == plain.json()["usage"]
    assert gw.engine_calls == 1

    # And the other way round: a streamed miss is captured for a later plain request.
    other = chat_body("stream first", **GREEDY)
    first = post(gw, {**other, "stream": True})
    assert cache_of(first) == "miss"
    streamed_text = "".join(
        json.loads(e)["choices"][0]["delta"].get("content", "") for e in sse_events(first.text)[:-1]
    )
    again = post(gw, other)
    assert cache_of(again) == "hit"
    assert again.json()["choices"][0]["message"]["content"] == streamed_text
    assert gw.engine_calls == 2


def test_text_completions_are_cached_too(gateway: Gateway) -> None:
    body = {"model": MODEL, "prompt": "one two", "temperature": 0, "max_tokens": 8}
    first = gateway.client.post("/v1/completions", json=body, headers=gateway.headers())
    streamed = gateway.client.post(
        "/v1/completions", json={**body, "stream": True}, headers=gateway.headers()
    )
    assert cache_of(streamed) == "hit"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in sse_events(streamed.text)[:-1])
    assert text == first.json()["choices"][0]["text"] == "echo: one two"
    assert gateway.engine_calls == 1


@pytest.mark.parametrize(
    "extra",
    [{"temperature": 0.8}, {}, {"temperature": 0, "n": 2}],
    ids=["sampled", "default-temperature", "n=2"],
)
def test_requests_that_are_not_reproducible_bypass_the_cache(
    gateway: Gateway, extra: dict[str, Any]
) -> None:
    body = chat_body("sampled", **extra)
    responses = [post(gateway, body) for _ in range(2)]
    assert [cache_of(r) for r in responses] == ["bypass", "bypass"]
    assert gateway.engine_calls == 2


def test_a_fixed_seed_is_reproducible(gateway: Gateway) -> None:
    body = chat_body("seeded", temperature=0.9, seed=42)
    assert [cache_of(post(gateway, body)) for _ in range(2)] == ["miss", "hit"]


def test_cache_control_no_cache_and_no_store(gateway: Gateway) -> None:
    body = chat_body("opt out", **GREEDY)
    stored = post(gateway, body)
    fresh = post(gateway, body, **{"Cache-Control": "no-cache"})
    assert cache_of(fresh) == "bypass"  # not read...
    assert gateway.engine_calls == 2
    assert fresh.content != stored.content  # a new completion (new id)
    assert post(gateway, body).content == fresh.content  # ...but written

    unstored = chat_body("never stored", **GREEDY)
    assert cache_of(post(gateway, unstored, **{"Cache-Control": "no-store"})) == "miss"
    assert cache_of(post(gateway, unstored)) == "miss"
    assert cache_of(post(gateway, unstored)) == "hit"


def test_another_tenant_never_sees_a_cached_result(gateway: Gateway) -> None:
    body = chat_body("private", **GREEDY)
    post(gateway, body, tenant="acme")
    assert cache_of(post(gateway, body, tenant="globex")) == "miss"
    assert gateway.engine_calls == 2


def test_replacing_an_adapter_retires_its_cached_results(gateway: Gateway, tmp_path: Path) -> None:
    old, new = (write_peft_adapter(tmp_path / n, seed=i) for i, n in enumerate(["old", "new"]))
    upload(gateway, old, name="helper")
    body = {**chat_body("tuned", **GREEDY), "model": "helper"}
    assert [cache_of(post(gateway, body)) for _ in range(2)] == ["miss", "hit"]
    assert upload(gateway, new, name="helper", replace="true").status_code == 201
    replaced = post(gateway, body)
    assert cache_of(replaced) == "miss"
    assert cache_of(post(gateway, body)) == "hit"
    gateway.client.delete("/admin/v1/tenants/acme/adapters/helper", headers=gateway.admin)
    assert post(gateway, body).status_code == 404
    # Uploaded again, even with the same content, it is a new version: nothing old is served.
    assert upload(gateway, new, name="helper").status_code == 201
    assert cache_of(post(gateway, body)) == "miss"


def test_results_over_the_entry_size_are_not_stored(tmp_path: Path, knobs: FakeEngineKnobs) -> None:
    settings = make_settings(tmp_path, cache={"max_entry_bytes": 1024})
    with running_gateway(settings, knobs) as gw:
        big = chat_body(" ".join(["word"] * 400), temperature=0, max_tokens=400)
        assert [cache_of(post(gw, big)) for _ in range(2)] == ["miss", "miss"]
        small = chat_body("small", **GREEDY)
        assert [cache_of(post(gw, small)) for _ in range(2)] == ["miss", "hit"]


def test_a_hit_is_served_while_the_engine_is_down(gateway: Gateway) -> None:
    body = chat_body("resilient", **GREEDY)
    post(gateway, body)
    gateway.knobs.healthy = False
    gateway.app.state.services.pool.members[0].monitor.mark_unreachable()
    assert cache_of(post(gateway, body)) == "hit"
    assert post(gateway, chat_body("uncached", **GREEDY)).status_code == 503


def test_identical_concurrent_requests_make_one_engine_call(any_gateway: Gateway) -> None:
    gw = any_gateway
    gw.knobs.ttft_s = 0.3
    responses = gw.send_together([chat_body("together", **GREEDY)] * 20)
    assert [r.status_code for r in responses] == [200] * 20
    assert gw.engine_calls == 1
    assert len({r.content for r in responses}) == 1
    assert sorted(cache_of(r) for r in responses) == ["hit"] * 19 + ["miss"]


def test_replicas_sharing_redis_share_results_and_coalesce(
    redis_settings: Settings, knobs: FakeEngineKnobs
) -> None:
    knobs.ttft_s = 0.3
    fake = create_fake_engine_app(knobs)  # one engine behind both replicas
    with (
        serving(fake) as fake.state.url,
        running_gateway(redis_settings, knobs, fake) as a,
        running_gateway(redis_settings, knobs, fake) as b,
    ):
        body = chat_body("across replicas", **GREEDY)
        with ThreadPoolExecutor(2) as pool:
            bursts = list(pool.map(lambda gw: gw.send_together([body] * 5), [a, b]))
        responses = [r for group in bursts for r in group]
        assert [r.status_code for r in responses] == [200] * 10
        assert a.engine_calls == 1  # the shared fake counts both replicas' calls
        assert len({r.content for r in responses}) == 1
        assert cache_of(post(b, body)) == "hit"


def test_redis_down_serves_uncached_and_recovers(
    redis_gateway: Gateway, redis: RedisServer
) -> None:
    gw = redis_gateway
    body = chat_body("while redis is down", **GREEDY)
    post(gw, body)
    redis.kill()
    try:
        down = [post(gw, body) for _ in range(3)]
        assert [r.status_code for r in down] == [200] * 3
        assert {cache_of(r) for r in down} == {"bypass"}
        assert cache_count(gw, "error") == 3
    finally:
        redis.start()
    # Back after the link's retry period; the restarted Redis kept nothing.
    statuses: list[str] = []
    for _ in range(50):
        statuses.append(cache_of(post(gw, body)))
        if statuses[-1] == "hit":
            break
        asyncio.run(asyncio.sleep(0.1))
    assert statuses[-1] == "hit", statuses


def test_stalled_redis_costs_a_timeout_not_an_error(
    redis_gateway: Gateway, redis: RedisServer
) -> None:
    body = chat_body("while redis is stalled", **GREEDY)
    redis.pause()
    try:
        responses = [post(redis_gateway, body) for _ in range(3)]
    finally:
        redis.resume()
    assert [r.status_code for r in responses] == [200] * 3
    assert {cache_of(r) for r in responses} == {"bypass"}


def claims_held(redis: RedisServer) -> int:
    reply = redis.command("KEYS", "loragate:claim:*")  # an array: "*<count>" first
    return int(reply.split(b"\r\n", 1)[0][1:])


@contextlib.contextmanager
def two_replicas_and_a_leader(
    settings: Settings, knobs: FakeEngineKnobs, redis: RedisServer, body: dict[str, Any]
) -> Iterator[tuple[Gateway, Gateway, Future[httpx.Response]]]:
    """Two replicas sharing Redis and one fake engine; `body` sent to the first from a thread
    (its response is the future), yielded once its coalescing claim is in Redis."""
    fake = create_fake_engine_app(knobs)
    with (
        serving(fake) as fake.state.url,
        running_gateway(settings, knobs, fake) as a,
        running_gateway(settings, knobs, fake) as b,
        ThreadPoolExecutor(1) as pool,
    ):
        leader = pool.submit(post, a, body)
        deadline = time.monotonic() + 5
        while claims_held(redis) < 1:
            assert time.monotonic() < deadline, "the leader never claimed the key"
            time.sleep(0.02)
        yield a, b, leader


def test_a_claim_whose_release_redis_missed_does_not_hold_up_identical_requests(
    tmp_path: Path, knobs: FakeEngineKnobs, redis: RedisServer
) -> None:
    """A leader that ends while the gateway skips a stalled Redis cannot drop its coalescing
    claim; it is dropped once Redis is back, and until then neither replica waits on it."""
    settings = make_settings(
        tmp_path,
        redis_url=redis.url,
        redis={"timeout_s": 0.1, "retry_after_s": 0.5, "failure_threshold": 1},
        cache={"coalesce_wait_s": 60},
    )
    knobs.ttft_s = 0.8
    body = chat_body("claimed while redis stalls", **GREEDY)
    with two_replicas_and_a_leader(settings, knobs, redis, body) as (a, b, leader):
        redis.pause()
        try:
            # A call that times out opens a's breaker: a skips Redis as its leader ends.
            other = chat_body("opens the breaker", **GREEDY)
            assert post(a, other, "globex").status_code == 200
            assert leader.result(timeout=10).status_code == 200
            # The leader's claim, and the one the timed-out script may take once Redis runs it.
            assert a.app.state.services.generation._cache.unclaimed == 2
        finally:
            redis.resume()
        assert claims_held(redis) >= 1  # left behind
        knobs.ttft_s = 0
        for gw in (a, b):  # neither waits on it (60 s) for a result that never comes
            started = time.monotonic()
            assert post(gw, body).status_code == 200
            assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while claims_held(redis) > 0:
            assert time.monotonic() < deadline, "the missed release was never made"
            time.sleep(0.1)
        assert a.app.state.services.generation._cache.unclaimed == 0


def test_a_leader_computing_longer_than_its_claim_lasts_keeps_it(
    tmp_path: Path, knobs: FakeEngineKnobs, redis: RedisServer
) -> None:
    """Claims are short (a dead replica holds others up briefly) and renewed by their leader:
    one that outlives its first expiry still makes the other replica wait, not compute."""
    settings = make_settings(tmp_path, redis_url=redis.url, cache={"claim_ttl_s": 3})
    knobs.ttft_s = 5
    body = chat_body("a long computation", **GREEDY)
    with two_replicas_and_a_leader(settings, knobs, redis, body) as (a, b, leader):
        time.sleep(3.5)  # past the claim's first expiry
        assert claims_held(redis) == 1
        follower = post(b, body)
        assert leader.result(timeout=10).status_code == 200
        assert follower.status_code == 200 and cache_of(follower) == "hit"
        assert a.engine_calls == 1  # the shared fake counts both replicas' calls
