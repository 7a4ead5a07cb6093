"""Typed errors and the one place they become OpenAI error envelopes.

    LoragateError                 (500 api_error, code internal_error)
    ├── InvalidRequestError       (400 invalid_request_error, code invalid_request)
    │   └── ContextLengthError    (400, code context_length_exceeded)
    ├── AuthenticationError       (401 authentication_error, code invalid_api_key)
    ├── PermissionDeniedError     (403 permission_error, code permission_denied)
    ├── NotFoundError             (404 not_found_error, code not_found)
    │   └── ModelNotFoundError    (404, code model_not_found)
    ├── PayloadTooLargeError      (413 invalid_request_error, code payload_too_large)
    ├── UnsupportedMediaTypeError (415 invalid_request_error, code unsupported_media_type)
    ├── ConflictError             (409 conflict_error, code adapter_conflict)
    ├── RateLimitError            (429 rate_limit_exceeded, with Retry-After: the tenant's quota)
    ├── EngineError               (502 api_error: the engine answered, but not sensibly)
    ├── EngineUnavailableError    (503 service_unavailable, with Retry-After)
    └── ServerOverloadedError     (503 service_unavailable, code server_overloaded: queue full)

Services raise these (and `adapters.errors` types, mapped in `_ADAPTER_ERRORS`);
`register_error_handlers` renders them, framework errors included, so no route ever builds an
error body itself. Every envelope has a `code` (never null): the class's default, or what the
raise site names; `ERROR_CODES` lists the gateway's own (adapter refusals add theirs, and 429s
name the limit). Validation errors map pydantic's error types onto that set (`_PYDANTIC_CODES`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import (
    AdapterConflictError,
    AdapterError,
    AdapterNotFoundError,
    AdapterRejectedError,
    AdapterStoreError,
    AdapterTooLargeError,
)

logger = logging.getLogger(__name__)


# The gateway's error codes (README: Errors). Bound errors from request_bounds, adapter refusals
# (adapters/) and the limits' names (429) come on top.
ERROR_CODES = frozenset(
    {
        # malformed or refused bodies (400)
        "invalid_json", "unknown_field", "missing_field", "invalid_type", "invalid_value",
        "value_out_of_range", "too_long", "too_short", "too_many_items", "too_few_items",
        "unsupported_parameter", "unsupported_content_type", "tools_not_supported",
        "chat_template_not_allowed", "invalid_request",
        # request bounds (400)
        "too_many_choices", "too_many_stop_sequences", "too_many_messages",
        "max_tokens_too_large", "min_tokens_too_large", "context_length_exceeded",
        # who, where, how
        "invalid_api_key", "admin_key_required", "tenant_key_required", "permission_denied",
        "model_not_found", "route_not_found", "not_found", "method_not_allowed",
        "adapter_not_found", "tenant_not_found", "adapter_conflict", "adapter_rejected",
        "payload_too_large", "unsupported_media_type", "unsupported_content_encoding",
        # the server's side
        "engine_error", "engine_unavailable", "engine_model_mismatch", "engine_context_too_short",
        "server_overloaded", "adapter_store_error",
        "internal_error",
    }
)  # fmt: skip


class LoragateError(Exception):
    status_code = 500
    error_type = "api_error"
    default_code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code: str = code or self.default_code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else {}


class InvalidRequestError(LoragateError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class ContextLengthError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(LoragateError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(LoragateError):
    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFoundError(LoragateError):
    status_code = 404
    error_type = "not_found_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class PayloadTooLargeError(LoragateError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class UnsupportedMediaTypeError(LoragateError):
    """A body that is not `application/json`, or is compressed (`code` says which)."""

    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class ConflictError(LoragateError):
    status_code = 409
    error_type = "conflict_error"
    default_code = "adapter_conflict"


class RateLimitError(LoragateError):
    """The tenant is over one of its limits; `code` names which."""

    status_code = 429
    error_type = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after_s: int) -> None:
        super().__init__(message, code=limit, retry_after_s=max(1, retry_after_s))


class EngineError(LoragateError):
    status_code = 502
    error_type = "api_error"
    default_code = "engine_error"


class EngineUnavailableError(LoragateError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "engine_unavailable"

    def __init__(
        self,
        message: str = "the engine is not ready",
        retry_after_s: int = 5,
        *,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class ServerOverloadedError(LoragateError):
    """The server is full (every tenant is turned away), as opposed to 429 (one tenant is over
    its quota). Not an EngineUnavailableError: the engine is fine, and handlers that mark the
    engine unreachable on that error must not see this one."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "server_overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: LoragateError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers())


def sse_error_event(error: LoragateError) -> bytes:
    """An error in the middle of a stream: the status line is already sent, so it goes in-band."""
    return f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()


# What pydantic puts in an error location besides field names, list indexes and dict keys:
# union members (`constrained-str`, `list[str]`, our own `<list>` tags), validator functions
# (`function-after[...]`), and dict-key markers (`[key]`).
_INTERNAL_LOC = re.compile(r"^(<[a-z]+>|[a-z-]+\[.*\]|constrained-[a-z]+|\[key\])$")

_PYDANTIC_CODES = {
    "extra_forbidden": "unknown_field",
    "missing": "missing_field",
    "json_invalid": "invalid_json",
    "json_type": "invalid_json",
    "greater_than": "value_out_of_range",
    "greater_than_equal": "value_out_of_range",
    "less_than": "value_out_of_range",
    "less_than_equal": "value_out_of_range",
    "string_too_long": "too_long",
    "string_too_short": "too_short",
    "too_long": "too_many_items",
    "too_short": "too_few_items",
    "finite_number": "invalid_value",
}
_OWN_CODES = frozenset(
    {
        "invalid_type", "invalid_value", "missing_field", "unsupported_parameter",
        "unsupported_content_type", "tools_not_supported", "chat_template_not_allowed",
    }
)  # fmt: skip


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    """The field path as the caller wrote it: names and indexes, no pydantic internals."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and _INTERNAL_LOC.match(p))]
    if parts[:1] == ["body"]:
        parts = parts[1:]
    return ".".join(parts) or None


def _code_for(kind: str) -> str:
    if kind in _PYDANTIC_CODES:
        return _PYDANTIC_CODES[kind]
    if kind in _OWN_CODES:
        return kind
    if kind.endswith("_type") or kind in ("int_from_float", "union_tag_invalid", "none_required"):
        return "invalid_type"
    return "invalid_value"


def validation_error(errors: Sequence[Any]) -> InvalidRequestError:
    """The first pydantic error as a 400 naming the offending field, with a stable code."""
    first = errors[0] if errors else {}
    param = _param_from_loc(tuple(first.get("loc", ())))
    kind = str(first.get("type", ""))
    code = _code_for(kind)
    if code == "unknown_field":
        message = f"unknown field {param!r}"
    elif code == "missing_field" and kind == "missing":
        message = f"missing required field {param!r}"
    elif code == "invalid_json":
        message = "the request body is not valid JSON"
        param = None
    elif param is None:
        message = f"invalid request body: {first.get('msg', 'invalid')}"
    else:
        message = f"invalid value for {param!r}: {first.get('msg', 'invalid')}"
    return InvalidRequestError(message, param=param, code=code)


# Framework errors (routing, mostly): the class, and the code when the class's default is wrong.
_STATUS_TO_ERROR: dict[int, tuple[type[LoragateError], str | None]] = {
    400: (InvalidRequestError, None),
    401: (AuthenticationError, None),
    403: (PermissionDeniedError, None),
    404: (NotFoundError, "route_not_found"),
    405: (InvalidRequestError, "method_not_allowed"),
    413: (PayloadTooLargeError, None),
    415: (UnsupportedMediaTypeError, None),
}


def _adapter_error(exc: AdapterError) -> LoragateError:
    for cls, error_cls, default_code in _ADAPTER_ERRORS:
        if isinstance(exc, cls):
            return error_cls(exc.message, param=exc.param, code=exc.code or default_code)
    return LoragateError(exc.message, code=exc.code or "adapter_store_error")


# Most specific first: the adapters package's errors, rendered by the same envelope, with the
# code used when the raise site names none.
_ADAPTER_ERRORS: tuple[tuple[type[AdapterError], type[LoragateError], str], ...] = (
    (AdapterTooLargeError, PayloadTooLargeError, "payload_too_large"),
    (AdapterRejectedError, InvalidRequestError, "adapter_rejected"),
    (AdapterNotFoundError, NotFoundError, "adapter_not_found"),
    (AdapterConflictError, ConflictError, "adapter_conflict"),
)


def register_error_handlers(app: FastAPI) -> None:
    async def on_adapter_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AdapterError)
        if isinstance(exc, AdapterStoreError):
            logger.error("adapter store failure: %s", exc.message)
        return error_response(_adapter_error(exc))

    async def on_loragate_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LoragateError)
        return error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc.errors()))

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        cls, code = _STATUS_TO_ERROR.get(exc.status_code, (LoragateError, None))
        error = cls(str(exc.detail), code=code)
        response = error_response(error)
        response.status_code = exc.status_code  # e.g. 405 keeps its own status
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(LoragateError("internal server error"))

    app.add_exception_handler(LoragateError, on_loragate_error)
    app.add_exception_handler(AdapterError, on_adapter_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
