"""Every refusal is an OpenAI error envelope with the right status, the offending param as the
caller wrote it, and a stable code from the documented set."""

from __future__ import annotations

import gzip
import json
import re
from typing import Any

import httpx
import pytest

from server.errors import ERROR_CODES
from tests.api.conftest import MODEL, Gateway
from tests.api.test_openai_routes import chat_body
from tests.support import ADMIN_KEY

JSON = {"Content-Type": "application/json"}
GZIP = {"Content-Encoding": "gzip"}


def assert_envelope(
    response: httpx.Response, status: int, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return dict(error)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic c2stdGVzdA=="},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer " + "x" * 10_000},
    ],
)
def test_requests_without_a_valid_tenant_key_are_401(
    gateway: Gateway, headers: dict[str, str]
) -> None:
    response = gateway.client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert assert_envelope(response, 401)["type"] == "authentication_error"


def test_auth_is_checked_before_the_body(gateway: Gateway) -> None:
    response = gateway.client.post("/v1/chat/completions", content=b"{not json")
    assert_envelope(response, 401)


def test_admin_key_is_not_a_tenant_key(gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    response = gateway.client.get("/v1/models", headers=headers)
    assert assert_envelope(response, 403)["code"] == "tenant_key_required"


def test_tenant_key_is_not_an_admin_key(gateway: Gateway) -> None:
    response = gateway.client.get("/admin/v1/tenants/acme/adapters", headers=gateway.headers())
    assert assert_envelope(response, 403)["code"] == "admin_key_required"


def test_unknown_model_is_404(gateway: Gateway) -> None:
    body = {**chat_body(), "model": "someone-elses-adapter"}
    response = gateway.client.post("/v1/chat/completions", json=body, headers=gateway.headers())
    assert assert_envelope(response, 404, "model")["code"] == "model_not_found"
    assert gateway.engine_calls == 0


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"bogus": 1}, "bogus"),
        ({"temperature": 9}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"max_completion_tokens": 5000}, "max_completion_tokens"),
        ({"n": 50}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_invalid_body_is_400_naming_the_param(
    gateway: Gateway, extra: dict[str, object], param: str
) -> None:
    response = gateway.client.post(
        "/v1/chat/completions", json={**chat_body(), **extra}, headers=gateway.headers()
    )
    assert assert_envelope(response, 400)["param"] == param
    assert gateway.engine_calls == 0


def test_invalid_json_is_400(gateway: Gateway) -> None:
    response = gateway.client.post(
        "/v1/chat/completions", content=b"{nope", headers={**gateway.headers(), **JSON}
    )
    assert assert_envelope(response, 400)["code"] == "invalid_json"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/jsonl", "application/json-seq"],
)  # fmt: skip
def test_a_body_that_is_not_json_is_415(gateway: Gateway, content_type: str) -> None:
    headers = {**gateway.headers(), "Content-Type": content_type}
    content = json.dumps(chat_body()).encode()
    response = gateway.client.post("/v1/chat/completions", content=content, headers=headers)
    assert assert_envelope(response, 415)["code"] == "unsupported_media_type"
    assert gateway.engine_calls == 0


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", None]
)
def test_json_with_parameters_in_any_case_or_unlabelled_is_accepted(
    gateway: Gateway, content_type: str | None
) -> None:
    """No Content-Type at all is read as JSON, as FastAPI (and so vLLM's server) does."""
    content = json.dumps(chat_body()).encode()
    headers = gateway.headers()
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = gateway.client.post("/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("encoding", "status"), [("gzip", 415), ("br", 415), ("identity", 200)])
def test_compressed_bodies_are_415_never_inflated(
    gateway: Gateway, encoding: str, status: int
) -> None:
    content = json.dumps(chat_body()).encode()
    if encoding == "gzip":
        content = gzip.compress(content)
    headers = {**gateway.headers(), **JSON, "Content-Encoding": encoding}
    response = gateway.client.post("/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == status, response.text
    if status == 415:
        assert assert_envelope(response, 415)["code"] == "unsupported_content_encoding"


def test_auth_is_checked_before_the_media_type(gateway: Gateway) -> None:
    response = gateway.client.post(
        "/v1/chat/completions", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert_envelope(response, 401)


def test_missing_field_is_400_naming_it(gateway: Gateway) -> None:
    response = gateway.client.post(
        "/v1/completions", json={"model": MODEL}, headers=gateway.headers()
    )
    assert_envelope(response, 400, "prompt")


def test_oversized_body_is_413_without_reaching_the_engine(gateway: Gateway) -> None:
    body = chat_body("x" * (2 << 20))
    response = gateway.client.post("/v1/chat/completions", json=body, headers=gateway.headers())
    assert assert_envelope(response, 413)["code"] == "payload_too_large"
    assert gateway.engine_calls == 0


def test_oversized_chunked_body_is_413(gateway: Gateway) -> None:
    def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 65536

    response = gateway.client.post(
        "/v1/chat/completions", content=chunks(), headers={**gateway.headers(), **JSON}
    )
    assert assert_envelope(response, 413)["code"] == "payload_too_large"


def test_unknown_route_is_404_envelope(gateway: Gateway) -> None:
    for method in ("GET", "POST"):
        response = gateway.client.request(
            method, "/v1/load_lora_adapter", headers=gateway.headers()
        )
        assert assert_envelope(response, 404)["code"] == "route_not_found"


def test_wrong_method_is_405_with_allow(gateway: Gateway) -> None:
    response = gateway.client.get("/v1/chat/completions", headers=gateway.headers())
    assert assert_envelope(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


def test_engine_failure_is_502(gateway: Gateway) -> None:
    gateway.knobs.fail_status = 500
    response = gateway.client.post(
        "/v1/chat/completions", json=chat_body(), headers=gateway.headers()
    )
    assert assert_envelope(response, 502)["code"] == "engine_error"


def test_engine_rejection_keeps_its_400(gateway: Gateway) -> None:
    gateway.knobs.fail_status = 400
    response = gateway.client.post(
        "/v1/chat/completions", json=chat_body(), headers=gateway.headers()
    )
    assert_envelope(response, 400)


def test_engine_error_on_a_stream_is_an_envelope_before_any_event(gateway: Gateway) -> None:
    gateway.knobs.fail_status = 500
    response = gateway.client.post(
        "/v1/chat/completions", json=chat_body(stream=True), headers=gateway.headers()
    )
    assert_envelope(response, 502)


# pydantic's own location parts: union members, validator functions, dict-key markers, our tags.
INTERNAL_PARAM = re.compile(r"constrained-|function-|\[|\]|<|>|^body\.|\.body\.")

BAD_CHAT_FIELDS: list[dict[str, Any]] = [
    {"bogus": 1},
    {"max_tokens": "8"},
    {"max_tokens": 0},
    {"max_tokens": 5000},
    {"stream": 1},
    {"temperature": 9},
    {"top_k": -2},
    {"n": 50},
    {"stop": ["a", 3]},
    {"stop": ["a", "b", "c", "d", "e"]},
    {"stop": 5},
    {"stop": ["x" * 300]},
    {"logit_bias": {"abc": 1}},
    {"logit_bias": {"1": 500}},
    {"min_tokens": 999, "max_tokens": 10},
    {"stop_token_ids": list(range(65))},
    {"stop_token_ids": [-1]},
    {"allowed_token_ids": []},
    {"bad_words": ["w"] * 65},
    {"prompt_logprobs": -1},
    {"structured_outputs": {}},
    {"structured_outputs": {"choice": ["a"], "regex": "a"}},
    {"structured_outputs": {"json": 5}},
    {"structured_outputs": {"regex": "a" * 70_000}},
    {"structured_outputs": {"choice": "yes"}},
    {"response_format": {"type": "xml"}},
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
    {"chat_template": "{{ messages }}"},
    {"chat_template_kwargs": {"bad key": 1}},
    {"chat_template_kwargs": {"deep": json.loads("[" * 40 + "]" * 40)}},
    {"documents": [{"title": 1}]},
    {"continue_final_message": True, "add_generation_prompt": True},
    {"stream_options": {"include_usage": True}},
    {"use_beam_search": True},
    {"priority": 1},
    {"request_id": ""},
    {"tools": []},
    {"messages": []},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
    {"messages": [{"role": "user", "content": "hi"}] * 300},
]
BAD_COMPLETION_FIELDS: list[dict[str, Any]] = [
    {"prompt": 5},
    {"prompt": ["a", 3]},
    {"prompt": [1, 2, 3]},
    {"prompt": []},
    {"suffix": "x"},
    {"logprobs": 99},
    {"echo": "yes"},
]


def _requests(gateway: Gateway) -> list[httpx.Response]:
    client, headers = gateway.client, gateway.headers()
    responses = [
        client.post("/v1/chat/completions", json={**chat_body(), **extra}, headers=headers)
        for extra in BAD_CHAT_FIELDS
    ]
    completion = {"model": MODEL, "prompt": "hi"}
    responses += [
        client.post("/v1/completions", json={**completion, **extra}, headers=headers)
        for extra in BAD_COMPLETION_FIELDS
    ]
    responses += [
        client.post("/v1/completions", json={"model": MODEL}, headers=headers),
        client.post("/v1/completions", json=[1], headers=headers),
        client.post("/v1/completions", content=b"{", headers={**headers, **JSON}),
        client.post("/v1/completions", content=b"{}", headers=headers),
        client.post("/v1/completions", json=completion, headers={**headers, **GZIP}),
        client.post("/v1/completions", json={**completion, "model": "nope"}, headers=headers),
        client.post("/v1/completions", json=completion),
        client.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}),
        client.get("/admin/v1/tenants/acme/adapters", headers=headers),
        client.get("/admin/v1/tenants/nobody/adapters", headers=gateway.admin),
        client.get("/admin/v1/tenants/acme/adapters/missing", headers=gateway.admin),
        client.get("/nowhere", headers=headers),
        client.delete("/v1/models", headers=headers),
        client.post("/v1/completions", json={**completion, "prompt": "x" * (2 << 20)},
                    headers=headers),
    ]  # fmt: skip
    return responses


def test_every_error_has_a_documented_code_and_a_param_as_written(gateway: Gateway) -> None:
    responses = _requests(gateway)
    assert len(responses) == len(BAD_CHAT_FIELDS) + len(BAD_COMPLETION_FIELDS) + 14
    seen = set()
    for response in responses:
        assert response.status_code >= 400, response.request.content[:200]
        error = assert_envelope(response, response.status_code)
        assert error["code"] in ERROR_CODES, error
        seen.add(error["code"])
        if error["param"] is not None:
            assert not INTERNAL_PARAM.search(error["param"]), error
        # A message about the branch the caller sent, never pydantic's union wording.
        assert "tagged-union" not in error["message"] and "constrained-" not in error["message"]
    assert gateway.engine_calls == 0
    # The walk covers the whole vocabulary of refusals, not just one code.
    assert len(seen) >= 20, seen


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "messages.0.content.0.text", "valid string"),
        ({"messages": [{"role": "user", "content": 5}]},
         "messages.0.content", "a string or a list of content parts"),
        ({"stop": ["a", 3]}, "stop.1", "valid string"),
        ({"structured_outputs": {"json": 5}}, "structured_outputs.json", "JSON schema"),
        ({"logit_bias": {"7": "high"}}, "logit_bias.7", "valid number"),
    ],
)  # fmt: skip
def test_union_errors_name_the_branch_the_caller_sent(
    gateway: Gateway, extra: dict[str, Any], param: str, message: str
) -> None:
    response = gateway.client.post(
        "/v1/chat/completions", json={**chat_body(), **extra}, headers=gateway.headers()
    )
    error = assert_envelope(response, 400, param)
    assert message in error["message"]
