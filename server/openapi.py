"""The gateway's OpenAPI document (served at /openapi.json): the schemas it documents that no
route returns as a model, the helpers routes declare their bodies, errors and keys with, and
`install_openapi`, which finishes what FastAPI generates (components, probes, key schemes).

Request bodies come from the wire models in `protocol.py` themselves, so the document says what
the gateway validates, exactly. Response schemas are loose on purpose (extra fields allowed):
they are the engine's answers, and must stay true for whatever fields vLLM adds.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict

from server.cache.policy import CACHE_HEADER

COMPONENT_REF = "#/components/schemas/{model}"
TENANT_KEY = "tenantKey"
ADMIN_KEY = "adminKey"
SECURITY_SCHEMES: dict[str, Any] = {
    TENANT_KEY: {
        "type": "http",
        "scheme": "bearer",
        "description": "A tenant's API key, from the tenants file: `Authorization: Bearer <key>`.",
    },
    ADMIN_KEY: {
        "type": "http",
        "scheme": "bearer",
        "description": "The operator's admin key (the tenants file's `admin` block): "
        "`Authorization: Bearer <key>`. It is refused (403) on tenant routes.",
    },
}
TENANT_AUTH: dict[str, Any] = {"security": [{TENANT_KEY: []}]}
ADMIN_AUTH: dict[str, Any] = {"security": [{ADMIN_KEY: []}]}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str  # stable and never null: clients branch on it


class ErrorResponse(BaseModel):
    """The OpenAI error envelope: every error the gateway answers has this body."""

    error: ErrorDetail


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Loose):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(_Loose):
    index: int
    message: dict[str, Any]
    finish_reason: str | None


class ChatCompletion(_Loose):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class CompletionChoice(_Loose):
    index: int
    text: str
    finish_reason: str | None


class Completion(_Loose):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(_Loose):
    """One streamed event: a chat delta or a text piece (the last one may carry only usage)."""

    id: str
    object: Literal["chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class MergedCopy(BaseModel):
    key: str  # sha256 hex over (adapter digest, base revision, scheme): its name in the store
    base_revision: str
    scheme: str  # "none": full precision


class AdapterRecord(BaseModel):
    tenant: str
    name: str
    digest: str  # sha256 hex over both files: the adapter's identity
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    created_at: str  # ISO 8601, UTC
    merged: list[MergedCopy]  # the merged copies it was promoted to (`adapters merge`)
    # DoRA or modules_to_save: served only by a merged engine (`adapters merge`, then
    # `loragate engine --merged`)
    merge_only: bool


class EngineState(BaseModel):
    name: str  # host:port, or `local`: the `engine` label of its metrics
    url: str
    ready: bool
    reason: str | None  # why it is not ready
    running: int
    queued: int
    adapters: list[str]  # digests of the adapter versions loaded there
    merged: str | None  # a merged engine's one adapter version (digest); None: the base model


class EngineList(BaseModel):
    object: Literal["list"]
    data: list[EngineState]


class AdapterList(BaseModel):
    object: Literal["list"]
    data: list[AdapterRecord]


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str


ERROR_DESCRIPTIONS = {
    400: "Invalid request: `param` names the field, `code` the problem.",
    401: "Missing or wrong API key (checked before the body is read).",
    403: "The wrong kind of key: the admin key on a tenant route, a tenant key on an admin route.",
    404: "Unknown model (`model_not_found`), tenant or adapter.",
    409: "The name holds different content and `replace=true` was not asked.",
    413: "The body is over the size limit.",
    415: "The body is not `application/json`, or is compressed.",
    429: "The tenant is over one of its limits; `code` names which.",
    500: "The server failed: `merge_failed` when the merge of a valid adapter did not complete "
    "(the message says why; nothing was stored or recorded).",
    501: "This gateway cannot do it: merging needs PyTorch and PEFT (`merge_unavailable`).",
    502: "The engine failed.",
    503: "The engine is not ready (`engine_unavailable`) or the server is full "
    "(`server_overloaded`).",
}
RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for error statuses: the envelope, and Retry-After where it is sent."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = {"Retry-After": RETRY_AFTER}
        responses[status] = entry
    return responses


CACHE_HEADERS = {
    CACHE_HEADER: {
        "description": "Whether the result cache answered: hit, miss (stored), or bypass.",
        "required": True,
        "schema": {"type": "string", "enum": ["hit", "miss", "bypass"]},
    }
}
# One event of a stream: `data` is a chunk, an in-band error (after the status line was sent),
# or the final `[DONE]`.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "anyOf": [
        {"properties": {"data": {"const": "[DONE]"}}},
        {
            "properties": {
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [
                            {"$ref": COMPONENT_REF.format(model="CompletionChunk")},
                            {"$ref": COMPONENT_REF.format(model="ErrorResponse")},
                        ]
                    },
                }
            }
        },
    ],
}


def generation_ok(result: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a generation route: `result` as JSON, or an SSE stream when `stream` is true."""
    return {
        200: {
            "model": result,
            "description": "The result (`stream: false`), or server-sent events ending with "
            "`data: [DONE]` (`stream: true`).",
            "headers": CACHE_HEADERS,
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    }


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra=` for a route that parses `model` itself (`parse_body`): its schema as the
    required JSON body. `install_openapi` moves it and its parts into the components."""
    schema = model.model_json_schema(ref_template=COMPONENT_REF)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def multipart_body(files: dict[str, str]) -> dict[str, Any]:
    """`openapi_extra=` for a multipart form of exactly these file fields (name: description)."""
    properties = {
        field: {"type": "string", "format": "binary", "description": description}
        for field, description in files.items()
    }
    schema = {
        "type": "object",
        "properties": properties,
        "required": list(files),
        "additionalProperties": False,
    }
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


def install_openapi(app: FastAPI) -> None:
    """Serve the finished document at /openapi.json (built on the first request, then kept)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title=app.title,
        version=app.version,
        summary="OpenAI-compatible gateway serving many tenants' adapters on one base model.",
        routes=app.routes,
    )
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorResponse, CompletionChunk):
        schemas.update(_hoisted(model.model_json_schema(ref_template=COMPONENT_REF), schemas))
    operations = [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]
    _restore_request_bodies(app, document)
    for path, method, operation in operations:
        _hoist_request_body(operation, schemas)
        # FastAPI's default 422 never happens: validation errors are 400 envelopes, which the
        # routes that can give them declare.
        operation.get("responses", {}).pop("422", None)
        if path in PROBES:
            operation["responses"] = PROBES[path]()
        if method == "head":
            operation["description"] = "As GET, without a body."
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f'"#/components/schemas/{unused}"' not in repr(document):
            del schemas[unused]
    document["components"]["securitySchemes"] = SECURITY_SCHEMES
    return document


def _error_entry(status: int) -> dict[str, Any]:
    entry = errors(status)[status]
    del entry["model"]
    entry["content"] = {
        "application/json": {"schema": {"$ref": COMPONENT_REF.format(model="ErrorResponse")}}
    }
    return entry


def _hoisted(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """A model's schema and its `$defs`, as components to add; a name that exists already must
    name the same schema (two models of one name would be one silently)."""
    parts = dict(schema.pop("$defs", {}))
    parts[schema["title"]] = schema
    for name, part in parts.items():
        if name in schemas and schemas[name] != part:
            raise ValueError(f"two different schemas are named {name!r} in the document")
    return parts


def _restore_request_bodies(app: FastAPI, document: dict[str, Any]) -> None:
    """The request bodies as the routes declared them: FastAPI's encoding of the document
    writes integers as floats (`seed`'s bound 2**63-1 became 2**63) and drops nulls."""
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        extra = route.openapi_extra
        if extra and "requestBody" in extra:
            for method in route.methods:
                operation = document["paths"][route.path_format][method.lower()]
                operation["requestBody"] = copy.deepcopy(extra["requestBody"])


def _hoist_request_body(operation: dict[str, Any], schemas: dict[str, Any]) -> None:
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content is None or "$ref" in content["schema"]:
        return
    schema = content["schema"]
    name = schema["title"]
    schemas.update(_hoisted(schema, schemas))
    content["schema"] = {"$ref": COMPONENT_REF.format(model=name)}


def _health() -> dict[str, Any]:
    return {"200": _status_entry("The process is alive.")}


def _ready() -> dict[str, Any]:
    return {
        "200": _status_entry("The engine can serve now."),
        "503": _error_entry(503) | {"description": "The engine cannot serve; `code` says why."},
    }


def _metrics() -> dict[str, Any]:
    return {
        "200": {
            "description": "Prometheus text exposition.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }


def _status_entry(description: str) -> dict[str, Any]:
    schema = Status.model_json_schema()
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# Probe routes (server/routes/probes.py) are described here, whichever of them the app has.
PROBES = {"/healthz": _health, "/readyz": _ready, "/metrics": _metrics}
