"""The result cache, coalescing, tenant limits and admission on the real thing: `loragate serve`
with vLLM CPU and a real `redis-server`; engine requests counted by vLLM's own metrics."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.adapter_factory import write_peft_adapter
from tests.e2e.conftest import BASE_MODEL, ServeProcess, start_serve
from tests.redis_server import RedisServer
from tests.support import TENANT_KEYS, settled_vllm_requests, vllm_finished_requests

pytestmark = pytest.mark.e2e

RPM = 5


def question(topic: str) -> list[dict[str, str]]:
    # A fresh question per test: the session's Redis outlives single tests.
    tag = uuid.uuid4().hex[:8]
    return [{"role": "user", "content": f"In one sentence, what is {topic}? ({tag})"}]


def chat(
    serve: ServeProcess,
    messages: list[dict[str, str]],
    tenant: str = "acme",
    model: str = BASE_MODEL,
    **extra: Any,
) -> httpx.Response:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 12, **extra}
    headers = {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}
    return httpx.post(f"{serve.url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def engine_requests_since(serve: ServeProcess, before: float, expected: int) -> int:
    return int(settled_vllm_requests(serve.engine_url, before + expected) - before)


def cache_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-loragate-cache"]


def test_a_repeat_is_a_byte_identical_hit_and_costs_no_engine_request(
    vllm_gateway: ServeProcess,
) -> None:
    messages = question("the sea")
    before = vllm_finished_requests(vllm_gateway.engine_url)
    first, second = chat(vllm_gateway, messages), chat(vllm_gateway, messages)
    assert (cache_of(first), cache_of(second)) == ("miss", "hit")
    assert second.content == first.content
    assert engine_requests_since(vllm_gateway, before, 1) == 1

    # The streamed form, through the official client, replays the cached answer as SSE.
    raw = vllm_gateway.client().chat.completions.with_raw_response.create(
        model=BASE_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=12,
        stream=True,  # type: ignore[arg-type]
    )
    assert raw.headers["x-loragate-cache"] == "hit"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.json()["choices"][0]["message"]["content"]
    assert engine_requests_since(vllm_gateway, before, 1) == 1


def test_what_must_miss_misses_and_sampling_bypasses(
    vllm_gateway: ServeProcess, tmp_path: Path
) -> None:
    messages = question("a river")
    assert cache_of(chat(vllm_gateway, messages, tenant="acme")) == "miss"
    assert cache_of(chat(vllm_gateway, messages, tenant="globex")) == "miss"  # B never sees A's
    sampled = [chat(vllm_gateway, messages, temperature=0.8) for _ in range(2)]
    assert [cache_of(r) for r in sampled] == ["bypass", "bypass"]

    old, new = (write_peft_adapter(tmp_path / n, seed=i, scale=3.0) for i, n in enumerate("on"))
    assert vllm_gateway.admin_put("acme", "cached-helper", old).status_code == 201
    tuned = [chat(vllm_gateway, messages, model="cached-helper") for _ in range(2)]
    assert [cache_of(r) for r in tuned] == ["miss", "hit"]
    replaced = vllm_gateway.admin_put("acme", "cached-helper", new, replace="true")
    assert replaced.status_code == 201
    after = chat(vllm_gateway, messages, model="cached-helper")
    assert cache_of(after) == "miss"
    assert after.json()["choices"][0]["message"] != tuned[0].json()["choices"][0]["message"]


def test_twenty_identical_concurrent_requests_make_one_engine_request(
    vllm_gateway: ServeProcess,
) -> None:
    messages = question("a mountain")
    before = vllm_finished_requests(vllm_gateway.engine_url)
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: chat(vllm_gateway, messages), range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
    assert sorted(cache_of(r) for r in responses) == ["hit"] * 19 + ["miss"]
    assert engine_requests_since(vllm_gateway, before, 1) == 1


def test_redis_killed_mid_run_then_restarted(
    vllm_gateway: ServeProcess, redis_server: RedisServer
) -> None:
    topics = [question(f"topic {i}") for i in range(6)]
    finished: list[int] = []

    def one(i: int) -> httpx.Response:
        response = chat(vllm_gateway, topics[i % 6], max_tokens=4)
        finished.append(i)
        return response

    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(one, i) for i in range(24)]
            while len(finished) < 6:
                time.sleep(0.05)
            redis_server.kill()  # with requests in flight and more to come
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 24
        assert "bypass" in {r.headers["x-loragate-cache"] for r in responses[12:]}
    finally:
        redis_server.ensure_running()

    messages = question("a restart")
    results: list[str] = []
    for _ in range(40):  # the gateway tries Redis again every 0.5 s
        results.append(cache_of(chat(vllm_gateway, messages, max_tokens=4)))
        if results[-1] == "hit":
            break
        time.sleep(0.25)
    assert results[-1] == "hit", results


@pytest.fixture(scope="module")
def replicas(
    vllm_gateway: ServeProcess, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServeProcess]]:
    """Two more gateways in front of the session's engine, sharing its Redis; initech is
    limited to RPM requests per minute; each gateway runs one engine request at a time."""
    env = {
        "LORAGATE_REDIS_URL": redis_server.url,
        "LORAGATE_ADMISSION__MAX_RUNNING": "1",
        "LORAGATE_ADMISSION__MAX_QUEUED": "0",
    }
    started = [
        start_serve(
            tmp_path_factory.mktemp(f"replica{i}"),
            env=env,
            args=["--engine-url", vllm_gateway.engine_url],
            limits={"initech": {"requests_per_minute": RPM}},
        )
        for i in range(2)
    ]
    try:
        for serve in started:
            serve.wait_ready(120)
        yield started
    finally:
        for serve in started:
            serve.stop()


def test_two_gateways_enforce_one_requests_per_minute_limit(
    replicas: list[ServeProcess],
) -> None:
    started = time.monotonic()
    responses = [
        chat(gateway, question(f"limit {i}"), tenant="initech", max_tokens=2)
        for i, gateway in enumerate(replicas * RPM)
    ]
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in responses]
    allowed = statuses.count(200)
    # A bucket of RPM refills one request every 60/RPM s: a slow run may earn one more.
    # Counted apart, each gateway would have let RPM through: 2 * RPM in all.
    assert RPM <= allowed <= RPM + int(elapsed // (60 / RPM)), statuses
    assert set(statuses) == {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_exceeded"
            assert int(r.headers["Retry-After"]) >= 1


def test_a_full_engine_queue_is_503(replicas: list[ServeProcess]) -> None:
    gateway = replicas[0]
    stream = gateway.client(cached=False).chat.completions.create(
        model=BASE_MODEL,
        messages=question("a long story"),
        max_tokens=64,
        stream=True,  # type: ignore[arg-type]
    )
    try:
        next(iter(stream))  # running on the engine now: the gateway's one slot is taken
        refused = chat(gateway, question("one more"), temperature=0.5)
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("service_unavailable", "server_overloaded")
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        stream.close()
    deadline = time.monotonic() + 30
    while chat(gateway, question("after"), max_tokens=2).status_code == 503:
        assert time.monotonic() < deadline, "the slot never came back"
        time.sleep(0.2)
