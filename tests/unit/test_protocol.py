"""The wire models alone: each vLLM extension is accepted within its bounds and refused past
them, types are strict, and what is forwarded is what the caller set."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from server.generation.protocol import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORDS,
    MAX_CHOICES,
    MAX_PATTERN_CHARS,
    MAX_STOP_TOKEN_IDS,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(
        json.dumps({"model": "m", "messages": MESSAGES, **fields})
    )


def error_of(**fields: Any) -> dict[str, Any]:
    with pytest.raises(ValidationError) as caught:
        chat(**fields)
    return dict(caught.value.errors()[0])


# (field, the largest accepted value, a refused one)
BOUNDS: list[tuple[str, Any, Any]] = [
    ("top_k", 1000, 1001),
    ("top_k", -1, -2),
    ("min_p", 1, 1.01),
    ("repetition_penalty", 2, 0),
    ("length_penalty", 10, 10.5),
    ("min_tokens", 0, -1),
    ("stop_token_ids", list(range(MAX_STOP_TOKEN_IDS)), list(range(MAX_STOP_TOKEN_IDS + 1))),
    ("stop_token_ids", [2**31 - 1], [2**31]),
    ("allowed_token_ids", [0] * MAX_ALLOWED_TOKEN_IDS, [0] * (MAX_ALLOWED_TOKEN_IDS + 1)),
    ("bad_words", ["w"] * MAX_BAD_WORDS, ["w"] * (MAX_BAD_WORDS + 1)),
    ("bad_words", ["w" * 256], ["w" * 257]),
    ("truncate_prompt_tokens", -1, -2),
    ("prompt_logprobs", 20, 21),
    ("top_logprobs", 20, 21),
    ("seed", -(2**63), -(2**63) - 1),
    ("seed", 2**63 - 1, 2**63),
    ("logit_bias", {"1": 100}, {"1": 100.5}),
    ("logit_bias", {"1": 1}, {"one": 1}),
    ("request_id", "r" * 256, "r" * 257),
    (
        "structured_outputs",
        {"regex": "a" * MAX_PATTERN_CHARS},
        {"regex": "a" * (MAX_PATTERN_CHARS + 1)},
    ),
    ("structured_outputs", {"grammar": "root ::= 'a'"}, {"grammar": ""}),
    ("structured_outputs", {"choice": ["c"] * MAX_CHOICES}, {"choice": ["c"] * (MAX_CHOICES + 1)}),
    ("structured_outputs", {"choice": ["c" * 1024]}, {"choice": ["c" * 1025]}),
    (
        "structured_outputs",
        {"json": {"type": "object"}},
        {"json": {"enum": ["x" * MAX_PATTERN_CHARS]}},
    ),
    ("structured_outputs", {"json": '{"type": "object"}'}, {"json": 1}),
    ("structured_outputs", {"json_object": True}, {"json_object": True, "regex": "a"}),
    ("structured_outputs", {"structural_tag": "{}"}, {}),
    ("structured_outputs", {"regex": "a", "disable_any_whitespace": True}, {"regex": "a", "x": 1}),
    ("response_format", {"type": "json_object"}, {"type": "yaml"}),
    ("documents", [{"title": "t", "text": "x"}] * 64, [{"title": "t"}] * 65),
    ("chat_template_kwargs", {f"k{i}": i for i in range(32)}, {f"k{i}": i for i in range(33)}),
    ("chat_template_kwargs", {"enable_thinking": True}, {"tokenize": True}),
]


@pytest.mark.parametrize(("field", "accepted", "refused"), BOUNDS)
def test_each_extension_is_bounded(field: str, accepted: Any, refused: Any) -> None:
    request = chat(**{field: accepted})
    assert request.model_dump(by_alias=True, exclude_unset=True)[field] == accepted
    assert error_of(**{field: refused})["loc"][0] == field


@pytest.mark.parametrize(
    "fields",
    [{"max_tokens": "8"}, {"max_tokens": 8.0}, {"stream": 1}, {"logprobs": "true"},
     {"top_k": True}, {"temperature": "0"}, {"stop_token_ids": ["2"]}],
)  # fmt: skip
def test_types_are_strict(fields: dict[str, Any]) -> None:
    assert error_of(**fields)["type"].endswith("_type")


def test_floats_accept_json_integers() -> None:
    assert chat(temperature=0, top_p=1, logit_bias={"3": 5}).engine_body()["logit_bias"] == {
        "3": 5.0
    }


@pytest.mark.parametrize(
    "raw",
    ['"temperature": NaN', '"min_p": Infinity', '"logit_bias": {"1": -Infinity}',
     '"chat_template_kwargs": {"x": {"y": NaN}}',
     '"structured_outputs": {"json": {"maximum": Infinity}}'],
)  # fmt: skip
def test_non_finite_numbers_are_refused_anywhere(raw: str) -> None:
    body = json.dumps({"model": "m", "messages": MESSAGES})[:-1] + ", " + raw + "}"
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate_json(body)
    assert caught.value.errors()[0]["type"] == "finite_number"


def test_the_json_schema_is_forwarded_under_its_openai_name() -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"x": 1}}}
    assert chat(response_format=response_format).engine_body()["response_format"] == (
        response_format
    )
    structured = {"json": {"type": "string"}}
    assert chat(structured_outputs=structured).engine_body()["structured_outputs"] == structured


def test_completion_fields() -> None:
    body = {"model": "m", "prompt": ["a", "b"], "echo": True, "add_special_tokens": False}
    request = CompletionRequest.model_validate_json(json.dumps(body))
    assert request.engine_body() == body
    assert request.prompt_texts() == ["a", "b"]


def test_model_card_root_defaults_to_its_id() -> None:
    assert ModelCard(id="a", created=0, owned_by="t").root == "a"
    assert ModelCard(id="a", created=0, owned_by="t", root="b").root == "b"
