"""The real thing: loragate serve + vLLM CPU + the default model, through the official client."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import BASE_MODEL, ServeProcess

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_greedy_chat_answer_names_paris(vllm_gateway: ServeProcess) -> None:
    result = vllm_gateway.client(cached=False).chat.completions.create(
        model=BASE_MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,  # type: ignore[arg-type]
    )
    assert "Paris" in (result.choices[0].message.content or "")


def test_stream_joins_to_exactly_the_greedy_text(vllm_gateway: ServeProcess) -> None:
    client = vllm_gateway.client(cached=False)  # both answers from the engine
    messages = [{"role": "user", "content": "Write two sentences about the sea."}]
    whole = client.chat.completions.create(
        model=BASE_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=48,  # type: ignore[arg-type]
    )
    stream = client.chat.completions.create(
        model=BASE_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=48,
        stream=True,  # type: ignore[arg-type]
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 5
    assert "".join(pieces) == whole.choices[0].message.content


def test_text_completion(vllm_gateway: ServeProcess) -> None:
    result = vllm_gateway.client(cached=False).completions.create(
        model=BASE_MODEL, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert result.choices[0].text.strip()
    assert result.usage is not None and 0 < result.usage.completion_tokens <= 8


def test_streamed_text_completion(vllm_gateway: ServeProcess) -> None:
    stream = vllm_gateway.client(cached=False).completions.create(
        model=BASE_MODEL, prompt="Once upon a time", temperature=0, max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices).strip()


def test_models_lists_the_base_model_first(vllm_gateway: ServeProcess) -> None:
    ids = [m.id for m in vllm_gateway.client().models.list()]
    # The tenant's own adapters (if other tests uploaded some) follow the base model.
    assert ids[0] == BASE_MODEL and BASE_MODEL not in ids[1:]


def test_no_key_is_401(vllm_gateway: ServeProcess) -> None:
    client = openai.OpenAI(base_url=f"{vllm_gateway.url}/v1", api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.status_code == 401
    response = httpx.get(f"{vllm_gateway.url}/v1/models")  # no header at all
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_unknown_model_is_404(vllm_gateway: ServeProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        vllm_gateway.client().chat.completions.create(model="gpt-4", messages=QUESTION)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


def test_oversized_body_is_413(vllm_gateway: ServeProcess) -> None:
    huge = [{"role": "user", "content": "x" * (2 << 20)}]
    with pytest.raises(openai.APIStatusError) as caught:
        vllm_gateway.client(max_retries=0).chat.completions.create(model=BASE_MODEL, messages=huge)  # type: ignore[arg-type]
    assert caught.value.status_code == 413
    assert caught.value.code == "payload_too_large"


def test_engine_admin_paths_are_not_reachable(vllm_gateway: ServeProcess) -> None:
    headers = {"Authorization": "Bearer sk-test-acme"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize", "/health"):
        response = httpx.post(f"{vllm_gateway.url}{path}", json={}, headers=headers)
        assert response.status_code in (404, 405), path


def test_metrics_show_requests_and_engine_up(vllm_gateway: ServeProcess) -> None:
    vllm_gateway.client().models.list()
    text = httpx.get(vllm_gateway.metrics_url).text
    assert 'loragate_requests_total{route="/v1/models",status="200"}' in text
    assert 'loragate_engine_up{engine="local"} 1.0' in text
    assert httpx.get(f"{vllm_gateway.url}/metrics").status_code == 404  # not on the public port


def test_metrics_carry_the_vllm_engines_own_running_and_waiting_counts(
    vllm_gateway: ServeProcess,
) -> None:
    # The engine's own queue, part of the autoscalers' signal: read from vLLM's /metrics (behind
    # the engine key) every LORAGATE_ENGINE__LOAD_POLL_S (5 s).
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(vllm_gateway.metrics_url).text
        states = {
            state: float(value)
            for state, value in re.findall(
                r'loragate_engine_reported_requests\{engine="local",state="(\w+)"\} (\S+)', text
            )
        }
        if states or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(states) == {"running", "waiting"}, text
    assert all(value >= 0 for value in states.values())
