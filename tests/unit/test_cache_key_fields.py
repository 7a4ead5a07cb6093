"""Every vLLM extension that can change the output changes the result-cache key; the ones that
cannot (`request_id`, `priority`, streaming) do not. Keys are computed from what the request
forwards, as the generation service does."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.cache.policy import OUTPUT_NEUTRAL_FIELDS, cache_key
from server.generation.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
COMPLETION = {"model": "m", "prompt": "hi", "temperature": 0}


def key_of(request: GenerationRequest, endpoint: str) -> str:
    return cache_key(
        tenant="acme",
        base_revision="base@1",
        adapter_version=None,
        public_model="m",
        endpoint=endpoint,
        body=request.engine_body(),
    )


def chat_key(**fields: Any) -> str:
    request = ChatCompletionRequest.model_validate_json(json.dumps({**CHAT, **fields}))
    return key_of(request, "chat")


def completion_key(**fields: Any) -> str:
    request = CompletionRequest.model_validate_json(json.dumps({**COMPLETION, **fields}))
    return key_of(request, "completions")


SHARED_OUTPUT_FIELDS: dict[str, Any] = {
    "top_k": 5,
    "min_p": 0.1,
    "repetition_penalty": 1.3,
    "length_penalty": 0.5,
    "ignore_eos": True,
    "min_tokens": 3,
    "stop_token_ids": [7],
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
    "include_stop_str_in_output": True,
    "truncate_prompt_tokens": 10,
    "truncation_side": "left",
    "allowed_token_ids": [1, 2],
    "bad_words": ["no"],
    "prompt_logprobs": 1,
    "logit_bias": {"4": 3},
    "seed": 11,
    "structured_outputs": {"choice": ["a", "b"]},
    "response_format": {"type": "json_object"},
    "echo": True,
    "add_special_tokens": True,
}
CHAT_OUTPUT_FIELDS: dict[str, Any] = {
    "add_generation_prompt": False,
    "continue_final_message": True,
    "documents": [{"text": "d"}],
    "chat_template_kwargs": {"enable_thinking": True},
    "top_logprobs": 2,
}


@pytest.mark.parametrize(
    ("field", "value"), [*SHARED_OUTPUT_FIELDS.items(), *CHAT_OUTPUT_FIELDS.items()]
)
def test_each_output_changing_chat_field_changes_the_key(field: str, value: Any) -> None:
    assert chat_key(**{field: value}) != chat_key()


@pytest.mark.parametrize(("field", "value"), list(SHARED_OUTPUT_FIELDS.items()))
def test_each_output_changing_completion_field_changes_the_key(field: str, value: Any) -> None:
    assert completion_key(**{field: value}) != completion_key()


def test_structured_output_variants_are_different_keys() -> None:
    keys = {
        chat_key(structured_outputs={"choice": ["a", "b"]}),
        chat_key(structured_outputs={"choice": ["b", "a"]}),
        chat_key(structured_outputs={"regex": "a+"}),
        chat_key(structured_outputs={"json": {"type": "object"}}),
        chat_key(structured_outputs={"json": '{"type": "object"}'}),
        chat_key(structured_outputs={"grammar": "root ::= 'a'"}),
        chat_key(structured_outputs={"regex": "a+", "disable_any_whitespace": True}),
    }
    assert len(keys) == 7


@pytest.mark.parametrize(
    "fields",
    [{"request_id": "req-1"}, {"priority": 0}, {"use_beam_search": False}, {"user": "u"},
     {"stream": True, "stream_options": {"include_usage": True}}],
)  # fmt: skip
def test_neutral_fields_do_not_change_the_key(fields: dict[str, Any]) -> None:
    assert chat_key(**fields) == chat_key()
    assert completion_key(**fields) == completion_key()


def test_request_id_and_priority_are_neutral_even_if_forwarded() -> None:
    # Not forwarded today; should that change, they still must not split the cache.
    assert {"request_id", "priority"} <= OUTPUT_NEUTRAL_FIELDS
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    args: dict[str, Any] = {
        "tenant": "acme",
        "base_revision": "b",
        "adapter_version": None,
        "public_model": "m",
        "endpoint": "chat",
    }
    plain = cache_key(**args, body=body)
    assert cache_key(**args, body={**body, "request_id": "x", "priority": 3}) == plain
