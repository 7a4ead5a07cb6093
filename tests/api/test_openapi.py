"""The OpenAPI document at /openapi.json: valid, built from the wire models, and true of what
the gateway answers (HEAD, 405, streams); the fuzz tier checks the rest case by case."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import schemathesis
from fastapi import Response

from server.app import create_app
from server.generation.protocol import ChatCompletionRequest, CompletionRequest
from server.settings import Settings
from tests.api.conftest import MODEL, Gateway
from tests.api.test_openai_routes import chat_body

GENERATION = ("/v1/chat/completions", "/v1/completions")
ENVELOPE = {"$ref": "#/components/schemas/ErrorResponse"}


def document(gateway: Gateway) -> dict[str, Any]:
    response = gateway.client.get("/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items()]


def validate(doc: dict[str, Any], component: str, instance: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{component}", "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_document_is_valid_openapi_31(gateway: Gateway) -> None:
    doc = document(gateway)
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema
    assert gateway.client.get("/docs").status_code == 404  # no docs UIs


def test_request_bodies_are_the_wire_models(gateway: Gateway) -> None:
    doc = document(gateway)
    schemas = doc["components"]["schemas"]
    for path, model in zip(GENERATION, (ChatCompletionRequest, CompletionRequest), strict=True):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        ref = body["content"]["application/json"]["schema"]["$ref"]
        wire = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, part in wire.pop("$defs", {}).items():
            assert schemas[name] == part
        assert schemas[ref.rsplit("/", 1)[1]] == wire
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 is never answered


def test_upload_is_a_multipart_form_of_two_files(gateway: Gateway) -> None:
    put = document(gateway)["paths"]["/admin/v1/tenants/{tenant}/adapters/{name}"]["put"]
    form = put["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["required"]) == set(form["properties"]) == {"adapter_config", "adapter_model"}
    assert all(p["format"] == "binary" for p in form["properties"].values())
    assert {"name": "replace", "in": "query"}.items() <= put["parameters"][2].items()
    assert {"200", "201", "409", "413"} <= set(put["responses"])


def test_every_error_is_the_envelope_with_retry_after_on_429_and_503(gateway: Gateway) -> None:
    doc = document(gateway)
    for path, method, op in operations(doc):
        for status, response in op["responses"].items():
            if int(status) >= 400:
                assert response["content"]["application/json"]["schema"] == ENVELOPE
                has_retry = "Retry-After" in response.get("headers", {})
                assert has_retry == (status in ("429", "503")), (method, path, status)
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    assert detail["properties"]["code"] == {"type": "string", "title": "Code"}
    for path in GENERATION:
        statuses = set(doc["paths"][path]["post"]["responses"])
        assert statuses == {"200", "400", "401", "403", "404", "413", "415", "429", "502", "503"}


def test_generation_answers_json_or_a_stream_with_the_cache_header(gateway: Gateway) -> None:
    doc = document(gateway)
    for path in GENERATION:
        ok = doc["paths"][path]["post"]["responses"]["200"]
        assert set(ok["content"]) == {"application/json", "text/event-stream"}
        assert ok["headers"]["x-loragate-cache"]["required"] is True


def test_tenant_and_admin_routes_name_their_key_and_probes_none(gateway: Gateway) -> None:
    doc = document(gateway)
    schemes = doc["components"]["securitySchemes"]
    assert {s["scheme"] for s in schemes.values()} == {"bearer"}
    for path, method, op in operations(doc):
        if path.startswith("/v1/"):
            assert op["security"] == [{"tenantKey": []}], (method, path)
        elif path.startswith("/admin/"):
            assert op["security"] == [{"adminKey": []}], (method, path)
        else:
            assert "security" not in op, (method, path)
            assert "application/json" in op["responses"]["200"]["content"]
    assert set(doc["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}


def test_metrics_is_described_as_text_only_when_the_app_serves_it() -> None:
    settings = Settings.model_construct()
    app = create_app(settings)
    served = "/metrics" in {getattr(r, "path", None) for r in app.routes}
    assert ("/metrics" in app.openapi()["paths"]) == served

    with_metrics = create_app(settings)

    @with_metrics.get("/metrics")
    async def metrics() -> Response:
        return Response(b"", media_type="text/plain")

    described = with_metrics.openapi()["paths"]["/metrics"]["get"]["responses"]
    assert set(described["200"]["content"]) == {"text/plain"}


def test_head_answers_like_get(gateway: Gateway) -> None:
    for path, headers in (
        ("/v1/models", gateway.headers()),
        ("/admin/v1/tenants/acme/adapters", gateway.admin),
        ("/healthz", {}),
        ("/readyz", {}),
    ):
        get = gateway.client.get(path, headers=headers)
        head = gateway.client.head(path, headers=headers)
        assert (head.status_code, get.status_code) == (200, 200)
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["content-length"] == get.headers["content-length"]
    assert gateway.client.head("/v1/models").status_code == 401


def test_wrong_method_is_405_with_allow_and_the_envelope(gateway: Gateway) -> None:
    response = gateway.client.get("/v1/chat/completions", headers=gateway.headers())
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert isinstance(response.json()["error"]["code"], str)


def test_answers_match_their_documented_schemas(gateway: Gateway) -> None:
    doc = document(gateway)
    body = {**chat_body(), "model": MODEL}
    plain = gateway.client.post("/v1/chat/completions", json=body, headers=gateway.headers())
    assert plain.status_code == 200, plain.text
    validate(doc, "ChatCompletion", plain.json())
    prompt = {"model": MODEL, "prompt": "one two three"}
    text = gateway.client.post("/v1/completions", json=prompt, headers=gateway.headers())
    validate(doc, "Completion", text.json())
    validate(doc, "ModelList", gateway.client.get("/v1/models", headers=gateway.headers()).json())

    streamed = gateway.client.post(
        "/v1/chat/completions", json={**body, "stream": True}, headers=gateway.headers()
    )
    events = [line[len("data: ") :] for line in streamed.text.splitlines() if line]
    assert events[-1] == "[DONE]" and len(events) > 2
    for event in events[:-1]:
        validate(doc, "CompletionChunk", json.loads(event))
