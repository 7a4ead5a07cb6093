"""Typed errors and the one place they become OpenAI error envelopes.

    LoragateError                 (500 api_error)
    ├── InvalidRequestError       (400 invalid_request_error)
    │   └── ContextLengthError    (400, code context_length_exceeded)
    ├── AuthenticationError       (401 authentication_error)
    ├── PermissionDeniedError     (403 permission_error)
    ├── NotFoundError             (404 not_found_error)
    ├── PayloadTooLargeError      (413 invalid_request_error)
    ├── ConflictError             (409 conflict_error)
    ├── RateLimitError            (429 rate_limit_exceeded, with Retry-After: the tenant's quota)
    ├── EngineError               (502 api_error: the engine answered, but not sensibly)
    ├── EngineUnavailableError    (503 service_unavailable, with Retry-After)
    └── ServerOverloadedError     (503 service_unavailable, code server_overloaded: queue full)

Services raise these (and `adapters.errors` types, mapped in `_ADAPTER_ERRORS`);
`register_error_handlers` renders them, framework errors included, so no route ever builds an
error body itself.
"""

from __future__ import annotations

import json
import logging
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


class LoragateError(Exception):
    status_code = 500
    error_type = "api_error"
    default_code: str | None = None

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
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else {}


class InvalidRequestError(LoragateError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(LoragateError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(LoragateError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(LoragateError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class PayloadTooLargeError(LoragateError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


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

    def __init__(self, message: str = "the engine is not ready", retry_after_s: int = 5) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


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


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def validation_error(errors: Sequence[Any]) -> InvalidRequestError:
    """The first pydantic error as a 400 naming the offending field."""
    first = errors[0] if errors else {}
    param = _param_from_loc(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif kind == "missing":
        message = f"missing required field {param!r}"
    elif kind == "json_invalid":
        message = "the request body is not valid JSON"
        param = None
    else:
        message = f"invalid value for {param!r}: {first.get('msg', 'invalid')}"
    return InvalidRequestError(message, param=param, code=kind or None)


_STATUS_TO_ERROR: dict[int, type[LoragateError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
}


def _adapter_error(exc: AdapterError) -> LoragateError:
    for cls, error_cls in _ADAPTER_ERRORS:
        if isinstance(exc, cls):
            return error_cls(exc.message, param=exc.param, code=exc.code)
    return LoragateError(exc.message, code=exc.code)


# Most specific first: the adapters package's errors, rendered by the same envelope.
_ADAPTER_ERRORS: tuple[tuple[type[AdapterError], type[LoragateError]], ...] = (
    (AdapterTooLargeError, PayloadTooLargeError),
    (AdapterRejectedError, InvalidRequestError),
    (AdapterNotFoundError, NotFoundError),
    (AdapterConflictError, ConflictError),
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
        cls = _STATUS_TO_ERROR.get(exc.status_code, LoragateError)
        error = cls(str(exc.detail))
        response = error_response(error)
        response.status_code = exc.status_code  # e.g. 405 keeps its own status
        return response

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(LoragateError("internal server error"))

    app.add_exception_handler(LoragateError, on_loragate_error)
    app.add_exception_handler(AdapterError, on_adapter_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
