"""Every refusal is an OpenAI error envelope with the right status and the offending param."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import MODEL, Gateway
from tests.api.test_openai_routes import chat_body
from tests.support import ADMIN_KEY


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
    assert_envelope(response, 403)


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
        "/v1/chat/completions", content=b"{nope", headers=gateway.headers()
    )
    assert_envelope(response, 400)


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
        "/v1/chat/completions", content=chunks(), headers=gateway.headers()
    )
    assert_envelope(response, 413)


def test_unknown_route_is_404_envelope(gateway: Gateway) -> None:
    assert_envelope(gateway.client.get("/v1/load_lora_adapter", headers=gateway.headers()), 404)
    assert_envelope(gateway.client.post("/v1/load_lora_adapter", headers=gateway.headers()), 404)


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
