"""The request contract of the OpenAI routes: vLLM's extensions reach the engine exactly as sent
(and only those the caller set), refused ones are clear 400s before the engine, types are
strict, and the bounds that need the effective max_tokens or the prompt's length hold."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer, models, pre_tokenizers

from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.settings import Settings
from tests.api.conftest import MODEL, Gateway, running_gateway, serving
from tests.api.test_errors import assert_envelope
from tests.api.test_openai_routes import chat_body


class RecordBodies:
    """ASGI wrapper around the fake engine: records every JSON body it receives."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording_receive() -> Message:
            message = await receive()
            chunks.append(message.get("body", b""))
            if message["type"] == "http.request" and not message.get("more_body"):
                self.bodies.append(json.loads(b"".join(chunks) or b"{}"))
            return message

        await self.app(scope, recording_receive, send)


@dataclass
class Recorded:
    gateway: Gateway
    engine: RecordBodies

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.gateway.client.post(path, json=body, headers=self.gateway.headers())


@pytest.fixture
def recorded(settings: Settings, knobs: FakeEngineKnobs) -> Iterator[Recorded]:
    fake = create_fake_engine_app(knobs)
    recorder = RecordBodies(fake)
    with serving(recorder) as url:
        fake.state.url = url
        with running_gateway(settings, knobs, fake) as gw:
            yield Recorded(gw, recorder)


SAMPLING_EXTENSIONS: dict[str, Any] = {
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "length_penalty": 1.0,
    "ignore_eos": True,
    "min_tokens": 2,
    "stop_token_ids": [2, 7],
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
    "include_stop_str_in_output": True,
    "truncate_prompt_tokens": 100,
    "truncation_side": "left",
    "allowed_token_ids": [1, 2, 3],
    "bad_words": ["darn"],
    "prompt_logprobs": 2,
    "seed": -3,
    "logit_bias": {"5": -100, "9": 2.5},
    "structured_outputs": {"choice": ["yes", "no"]},
}
CHAT_EXTENSIONS: dict[str, Any] = {
    "add_generation_prompt": False,
    "continue_final_message": True,
    "add_special_tokens": True,
    "echo": True,
    "documents": [{"title": "t", "text": "body"}],
    "chat_template_kwargs": {"enable_thinking": False, "depth": [1, {"a": None}]},
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    },
}


def test_vllm_chat_extensions_reach_the_engine_as_sent(recorded: Recorded) -> None:
    body = chat_body(max_tokens=4, **SAMPLING_EXTENSIONS, **CHAT_EXTENSIONS)
    response = recorded.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    (sent,) = recorded.engine.bodies
    assert sent == body


def test_vllm_completion_extensions_reach_the_engine_as_sent(recorded: Recorded) -> None:
    extensions = {"add_special_tokens": False, "echo": True, "response_format": {"type": "text"}}
    body = {"model": MODEL, "prompt": "one two", "max_tokens": 4, **SAMPLING_EXTENSIONS}
    body.update(extensions)
    response = recorded.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    assert recorded.engine.bodies == [body]


def test_only_what_the_caller_set_is_forwarded(recorded: Recorded) -> None:
    recorded.post("/v1/chat/completions", chat_body(max_tokens=3, logprobs=None))
    (sent,) = recorded.engine.bodies
    assert set(sent) == {"model", "messages", "max_tokens"}


def test_request_id_priority_and_beam_search_off_are_accepted_but_not_forwarded(
    recorded: Recorded,
) -> None:
    body = chat_body(max_tokens=3, request_id="mine-1", priority=0, use_beam_search=False)
    response = recorded.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    (sent,) = recorded.engine.bodies
    assert not {"request_id", "priority", "use_beam_search"} & set(sent)


@pytest.mark.parametrize(
    ("path", "extra", "param", "code"),
    [
        ("/v1/chat/completions", {"chat_template": "{{ x }}"}, "chat_template",
         "chat_template_not_allowed"),
        ("/v1/chat/completions", {"use_beam_search": True}, "use_beam_search",
         "unsupported_parameter"),
        ("/v1/chat/completions", {"priority": -5}, "priority", "unsupported_parameter"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools",
         "tools_not_supported"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice", "tools_not_supported"),
        ("/v1/chat/completions", {"parallel_tool_calls": True}, "parallel_tool_calls",
         "tools_not_supported"),
        ("/v1/chat/completions", {"chat_template_kwargs": {"chat_template": "x"}},
         "chat_template_kwargs", "invalid_value"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "4"}]},
         "messages.0.role", "tools_not_supported"),
        ("/v1/chat/completions",
         {"messages": [{"role": "user", "content": [
             {"type": "text", "text": "look"},
             {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages.0.content.1", "unsupported_content_type"),
        ("/v1/completions", {"suffix": "end"}, "suffix", "unsupported_parameter"),
        ("/v1/completions", {"prompt_embeds": "AAAA"}, "prompt_embeds", "unsupported_parameter"),
        ("/v1/completions", {"kv_transfer_params": {}}, "kv_transfer_params", "unknown_field"),
    ],
)  # fmt: skip
def test_refused_extensions_are_400_before_the_engine(
    gateway: Gateway, path: str, extra: dict[str, Any], param: str, code: str
) -> None:
    base = chat_body() if "chat" in path else {"model": MODEL, "prompt": "hi"}
    response = gateway.client.post(path, json={**base, **extra}, headers=gateway.headers())
    error = assert_envelope(response, 400, param)
    assert error["code"] == code
    assert gateway.engine_calls == 0


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        ('"max_tokens": "8"', "max_tokens", "invalid_type"),
        ('"stream": 1', "stream", "invalid_type"),
        ('"n": 1.0', "n", "invalid_type"),
        ('"temperature": NaN', "temperature", "invalid_value"),
        ('"top_p": Infinity', "top_p", "invalid_value"),
        ('"logit_bias": {"5": -Infinity}', "logit_bias.5", "invalid_value"),
        ('"chat_template_kwargs": {"x": [1, NaN]}', "chat_template_kwargs.x", "invalid_value"),
    ],
)
def test_strict_types_and_no_non_finite_numbers(
    gateway: Gateway, raw: str, param: str, code: str
) -> None:
    content = json.dumps(chat_body())[:-1] + ", " + raw + "}"  # raw: not what json.dumps writes
    response = gateway.client.post(
        "/v1/chat/completions",
        content=content.encode(),
        headers={**gateway.headers(), "Content-Type": "application/json"},
    )
    error = assert_envelope(response, 400, param)
    assert error["code"] == code
    assert gateway.engine_calls == 0


def test_integer_temperature_is_a_float(recorded: Recorded) -> None:
    response = recorded.post("/v1/chat/completions", chat_body(temperature=1, max_tokens=2))
    assert response.status_code == 200
    assert recorded.engine.bodies[0]["temperature"] == 1.0


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        ({"min_tokens": 256}, True),  # the default max_tokens (256)
        ({"min_tokens": 257}, False),
        ({"min_tokens": 5, "max_tokens": 5}, True),
        ({"min_tokens": 6, "max_tokens": 5}, False),
        ({"min_tokens": 6, "max_completion_tokens": 5}, False),
    ],
)
def test_min_tokens_is_bounded_by_the_effective_max_tokens(
    gateway: Gateway, extra: dict[str, Any], ok: bool
) -> None:
    response = gateway.client.post(
        "/v1/chat/completions", json=chat_body(**extra), headers=gateway.headers()
    )
    if ok:
        assert response.status_code == 200, response.text
    else:
        assert assert_envelope(response, 400, "min_tokens")["code"] == "min_tokens_too_large"


@pytest.fixture
def word_tokenizer(tmp_path: Path) -> None:
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "model").mkdir(exist_ok=True)
    tokenizer.save(str(tmp_path / "model" / "tokenizer.json"))


@pytest.mark.usefixtures("word_tokenizer")
def test_a_truncated_prompt_is_bounded_by_what_the_engine_keeps(gateway: Gateway) -> None:
    long_prompt = " ".join(["w"] * 2000)
    over = gateway.client.post(
        "/v1/chat/completions",
        json=chat_body(long_prompt, max_tokens=100),
        headers=gateway.headers(),
    )
    assert assert_envelope(over, 400, "messages")["code"] == "context_length_exceeded"
    kept = chat_body(long_prompt, max_tokens=100, truncate_prompt_tokens=1000)
    response = gateway.client.post("/v1/chat/completions", json=kept, headers=gateway.headers())
    assert response.status_code == 200, response.text
