"""The tenant OpenAI routes in front of the fake engine: results, streams, and bounds."""

from __future__ import annotations

import json

from tests.api.conftest import MODEL, Gateway


def chat_body(content: str = "hello there world", **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_models_lists_the_base_model(gateway: Gateway) -> None:
    response = gateway.client.get("/v1/models", headers=gateway.headers())
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [MODEL]


def test_chat_completion_returns_the_engine_answer(gateway: Gateway) -> None:
    response = gateway.client.post(
        "/v1/chat/completions", json=chat_body(max_tokens=3), headers=gateway.headers()
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello there"


def test_text_completion_returns_the_engine_answer(gateway: Gateway) -> None:
    body = {"model": MODEL, "prompt": "one two", "max_tokens": 8}
    response = gateway.client.post("/v1/completions", json=body, headers=gateway.headers())
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == "echo: one two"


def test_stream_passes_engine_events_through_and_ends_with_done(gateway: Gateway) -> None:
    with gateway.client.stream(
        "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=gateway.headers()
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "echo: hello there world"
    assert len(chunks) > 3


def test_missing_max_tokens_gets_the_default(gateway: Gateway) -> None:
    long_prompt = " ".join(f"w{i}" for i in range(400))
    response = gateway.client.post(
        "/v1/chat/completions", json=chat_body(long_prompt), headers=gateway.headers()
    )
    # default_max_tokens (256) tokens: "echo:" plus 255 prompt words.
    assert len(response.json()["choices"][0]["message"]["content"].split()) == 256


def test_max_completion_tokens_is_honoured(gateway: Gateway) -> None:
    response = gateway.client.post(
        "/v1/chat/completions",
        json=chat_body(max_completion_tokens=2),
        headers=gateway.headers(),
    )
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello"
