"""The fake engine's vLLM-like extras: its key (`--api-key`), /tokenize, the LoRA resolver
(`--resolve-adapters`), /metrics, and the capacity model it can cost requests by."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from server.engine_servers.capacity import Capacity
from server.engine_servers.fake_engine import (
    FakeEngineKnobs,
    create_fake_engine_app,
    parse_knobs,
)
from server.engines.openai_http import OpenAIHttpEngine
from server.errors import EngineError
from tests.api.conftest import serving
from tests.api.test_disconnects import eventually

MODEL = "fake-base"
KEY = "sk-engine"
DIGEST = "ab" * 32
ADAPTER = f"lg-{DIGEST}"


def chat(model: str = MODEL, text: str = "one two three", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def client_for(knobs: FakeEngineKnobs) -> AsyncIterator[httpx.AsyncClient]:
    app = create_fake_engine_app(knobs)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def knobs() -> FakeEngineKnobs:
    return FakeEngineKnobs(model=MODEL)


@pytest.fixture
async def client(knobs: FakeEngineKnobs) -> AsyncIterator[httpx.AsyncClient]:
    async for c in client_for(knobs):
        yield c


def gauges(text: str) -> dict[str, float]:
    """`name{labels}` -> value of a Prometheus text exposition."""
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#")]
    return {name: float(value) for name, value in lines}


RUNNING = f'vllm:num_requests_running{{model_name="{MODEL}",engine="0"}}'
WAITING = f'vllm:num_requests_waiting{{model_name="{MODEL}",engine="0"}}'


# --- the key ----------------------------------------------------------------------------------


async def test_with_a_key_v1_paths_need_it_as_vllm_does(
    knobs: FakeEngineKnobs, client: httpx.AsyncClient
) -> None:
    knobs.api_key = KEY
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        response = await client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json() == {"error": "Unauthorized"}  # vLLM 0.32's body, verbatim
        response = await client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert response.status_code == 401
    for scheme in ("Bearer", "bearer"):
        headers = {"Authorization": f"{scheme} {KEY}"}
        assert (await client.get("/v1/models", headers=headers)).status_code == 200
        response = await client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert response.status_code == 200
    # vLLM guards /v1 only: the probes, the metrics and /tokenize stay open.
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200
    tokenize = await client.post("/tokenize", json={"model": MODEL, "prompt": "a"})
    assert tokenize.status_code == 200


async def test_without_a_key_everything_is_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models")).status_code == 200


async def test_the_gateways_client_sends_the_key(knobs: FakeEngineKnobs) -> None:
    knobs.api_key = KEY
    with serving(create_fake_engine_app(knobs)) as url:
        keyed = OpenAIHttpEngine(url, request_timeout_s=10, connect_timeout_s=2, api_key=KEY)
        keyless = OpenAIHttpEngine(url, request_timeout_s=10, connect_timeout_s=2)
        try:
            assert [m.id for m in await keyed.served_models()] == [MODEL]
            with pytest.raises(EngineError):
                await keyless.generate("chat", chat())
        finally:
            await keyed.aclose()
            await keyless.aclose()


# --- /tokenize and the resolver ---------------------------------------------------------------


async def test_tokenize_answers_as_vllm(client: httpx.AsyncClient) -> None:
    response = await client.post("/tokenize", json={"model": MODEL, "prompt": "hello big world"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == 3 == len(body["tokens"])
    assert body["max_model_len"] == 2048 and body["token_strs"] is None
    again = await client.post("/tokenize", json={"prompt": "hello big world"})  # model optional
    assert again.json()["tokens"] == body["tokens"]
    strs = await client.post("/tokenize", json={**chat(text="a b"), "return_token_strs": True})
    assert strs.json()["token_strs"] == ["a", "b"]


async def test_unknown_models_are_404_without_the_resolver(client: httpx.AsyncClient) -> None:
    for path, body in [
        ("/tokenize", {"model": ADAPTER, "prompt": "a"}),
        ("/v1/chat/completions", chat(ADAPTER)),
    ]:
        response = await client.post(path, json=body)
        assert response.status_code == 404
        assert response.json()["error"]["param"] == "model"
    assert client.app.state.stats.loads == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/tokenize", "/v1/chat/completions", "/v1/completions"])
async def test_the_resolver_loads_an_adapter_a_request_names(
    knobs: FakeEngineKnobs, client: httpx.AsyncClient, path: str
) -> None:
    knobs.resolve_adapters = True
    knobs.load_s = 0.2
    body = {"model": ADAPTER, "prompt": "a b"} if path != "/v1/chat/completions" else chat(ADAPTER)
    started = time.monotonic()
    responses = await asyncio.gather(*(client.post(path, json=body) for _ in range(3)))
    assert time.monotonic() - started >= 0.2  # the load's time
    assert [r.status_code for r in responses] == [200] * 3
    stats = client.app.state.stats  # type: ignore[attr-defined]
    assert stats.loads == 1  # once, for the three that named it together
    assert stats.adapters == {ADAPTER: DIGEST}
    models = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == [MODEL, ADAPTER]
    if path != "/tokenize":
        answer = responses[0].json()["choices"][0]
        text = answer["text"] if "text" in answer else answer["message"]["content"]
        assert text.startswith(f"[{DIGEST[:8]}]")  # as if loaded from .../<digest>


async def test_the_resolver_only_knows_loragate_names(
    knobs: FakeEngineKnobs, client: httpx.AsyncClient
) -> None:
    knobs.resolve_adapters = True
    for model in ["someone-else", "lg-" + "ab" * 31, "lg-" + "AB" * 32]:
        response = await client.post("/tokenize", json={"model": model, "prompt": "a"})
        assert response.status_code == 404
    assert client.app.state.stats.loads == 0  # type: ignore[attr-defined]


async def test_the_gateways_tokenize_load_goes_through_the_resolver(
    knobs: FakeEngineKnobs,
) -> None:
    knobs.resolve_adapters = True
    fake = create_fake_engine_app(knobs)
    with serving(fake) as url:
        engine = OpenAIHttpEngine(url, request_timeout_s=10, connect_timeout_s=2)
        try:
            await engine.load_adapter(ADAPTER, None)  # no path: the engine finds it by name
            assert fake.state.stats.adapters == {ADAPTER: DIGEST}
        finally:
            await engine.aclose()


# --- /metrics and the capacity model ----------------------------------------------------------


async def test_metrics_show_vllms_gauges(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE vllm:num_requests_running gauge" in response.text
    assert gauges(response.text) == {RUNNING: 0.0, WAITING: 0.0}


async def test_without_a_model_every_request_in_flight_runs(
    knobs: FakeEngineKnobs, client: httpx.AsyncClient
) -> None:
    knobs.ttft_s = 0.3
    completion = {"model": MODEL, "prompt": "x"}
    requests = [
        asyncio.create_task(client.post("/v1/chat/completions", json=chat())),
        asyncio.create_task(client.post("/v1/completions", json=completion)),
    ]
    await asyncio.sleep(0.1)
    assert gauges((await client.get("/metrics")).text) == {RUNNING: 2.0, WAITING: 0.0}
    await asyncio.gather(*requests)


async def test_beyond_max_batch_requests_wait_and_metrics_say_so(
    knobs: FakeEngineKnobs, client: httpx.AsyncClient
) -> None:
    knobs.capacity = Capacity(token_s=0.05, batch_growth=0, max_batch=2)
    body = chat(text="a b c")  # four tokens: "echo:" and three words, 0.2 s in a batch
    started = time.monotonic()
    requests = [
        asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(3)
    ]
    await asyncio.sleep(0.1)
    assert gauges((await client.get("/metrics")).text) == {RUNNING: 2.0, WAITING: 1.0}
    responses = await asyncio.gather(*requests)
    assert time.monotonic() - started >= 0.4  # the third ran after the first two
    assert [r.status_code for r in responses] == [200] * 3
    assert responses[0].json()["choices"][0]["message"]["content"] == "echo: a b c"
    assert gauges((await client.get("/metrics")).text) == {RUNNING: 0.0, WAITING: 0.0}


async def test_a_load_stalls_the_running_streams(
    knobs: FakeEngineKnobs, client: httpx.AsyncClient
) -> None:
    knobs.capacity = Capacity(token_s=0.02, batch_growth=0, load_s=0.3)
    body = chat(text=" ".join(["w"] * 9), stream=True)  # ten tokens: 0.2 s alone

    async def stream() -> list[str]:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            return [line async for line in response.aiter_lines() if line.startswith("data:")]

    started = time.monotonic()
    streamed = asyncio.create_task(stream())
    await asyncio.sleep(0.05)
    load = {"lora_name": ADAPTER, "lora_path": "/adapters/x"}
    assert (await client.post("/v1/load_lora_adapter", json=load)).status_code == 200
    events = await streamed
    assert time.monotonic() - started >= 0.5  # its steps, and the load's 0.3 s between two
    assert events[-1] == "data: [DONE]" and len(events) == 1 + 10 + 1  # role, tokens, done
    assert client.app.state.stats.loads == 1  # type: ignore[attr-defined]


async def test_an_adapter_beyond_the_slots_waits_for_one(
    knobs: FakeEngineKnobs, client: httpx.AsyncClient
) -> None:
    knobs.capacity = Capacity(token_s=0.05, batch_growth=0, lora_slots=1, load_s=0)
    stats = client.app.state.stats  # type: ignore[attr-defined]
    stats.adapters.update({"lg-a": "/a", "lg-b": "/b"})

    async def timed(model: str) -> float:
        await client.post("/v1/chat/completions", json=chat(model, "x y"))  # 0.15 s alone
        return time.monotonic() - started

    started = time.monotonic()
    a, b, base = await asyncio.gather(timed("lg-a"), timed("lg-b"), timed(MODEL))
    assert a < 0.25 and base < 0.25  # the base model needs no slot
    assert b >= 0.3  # after a


async def test_a_stream_that_goes_away_leaves_the_batch(knobs: FakeEngineKnobs) -> None:
    knobs.capacity = Capacity(token_s=0.05, batch_growth=0)
    fake = create_fake_engine_app(knobs)
    with serving(fake) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            # 400 tokens: 20 s, were it not dropped after its first.
            body = chat(text=" ".join(["w"] * 400), stream=True, max_tokens=400)
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    break
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if not gauges((await client.get("/metrics")).text)[RUNNING]:
                    break
                await asyncio.sleep(0.05)
            assert gauges((await client.get("/metrics")).text) == {RUNNING: 0.0, WAITING: 0.0}


async def test_an_unload_counts_against_a_request_it_hits_only_if_that_one_is_served(
    knobs: FakeEngineKnobs,
) -> None:
    """`unloaded_while_busy` counts a request served to the end after its adapter was unloaded
    under it (the gateway let go too early), not one whose caller had hung up: vLLM aborts that
    one, and its unload takes nothing from it."""
    knobs.token_interval_s = 0.05
    fake = create_fake_engine_app(knobs)
    stats = fake.state.stats
    body = chat(ADAPTER, " ".join(["w"] * 20), stream=True, max_tokens=40)  # about 1 s
    unload = {"lora_name": ADAPTER}
    load = {**unload, "lora_path": "/adapters/x"}
    with serving(fake) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for read_to_the_end in (False, True):
                assert (await client.post("/v1/load_lora_adapter", json=load)).status_code == 200
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    lines = response.aiter_lines()
                    assert (await anext(lines)).startswith("data: ")
                    answer = await client.post("/v1/unload_lora_adapter", json=unload)
                    assert answer.status_code == 200
                    if read_to_the_end:
                        assert "data: [DONE]" in [line async for line in lines]
                assert await eventually(lambda: stats.in_flight[ADAPTER] == 0, 5)
                assert stats.unloaded_while_busy == int(read_to_the_end), read_to_the_end


# --- the command line -------------------------------------------------------------------------


def test_the_capacity_flags_turn_the_model_on() -> None:
    _, knobs = parse_knobs(["--port", "1", "--token-ms", "20", "--load-ms", "150"])
    assert knobs.capacity is None and knobs.load_s == 0.15  # today's fake, with a slow load
    argv = ["--port", "1", "--token-ms", "20", "--load-ms", "150", "--max-batch", "8"]
    _, knobs = parse_knobs([*argv, "--lora-slots", "2", "--api-key", KEY, "--resolve-adapters"])
    assert knobs.capacity == Capacity(token_s=0.02, max_batch=8, lora_slots=2, load_s=0.15)
    assert knobs.api_key == KEY and knobs.resolve_adapters
