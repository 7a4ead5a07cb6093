"""FastAPI dependencies: the app's services, and who the caller is.

Authentication runs before the body is parsed, so an unauthenticated caller always gets 401,
never a hint about what a valid body looks like (not even a 415 for the wrong Content-Type).
The dependencies are `async def` although they never await: FastAPI runs plain `def`
dependencies in a worker thread, a hop per dependency per request that showed up as a
millisecond of the gateway's added latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from server.adapter_admin import AdapterAdminService
from server.engines.pool import EnginePool
from server.errors import (
    AuthenticationError,
    PermissionDeniedError,
    UnsupportedMediaTypeError,
    validation_error,
)
from server.generation.serving import GenerationService
from server.merging.promotion import PromotionService
from server.metrics import Metrics
from server.tenants import Principal, Tenant, TenantDirectory

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Services:
    """Everything the routes use, built and owned by the app's lifespan."""

    tenants: TenantDirectory
    generation: GenerationService
    admin: AdapterAdminService
    pool: EnginePool
    metrics: Metrics
    promotion: PromotionService


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _bearer_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationError("Missing API key: send it as `Authorization: Bearer <key>`.")
    return key.strip()


async def get_principal(
    request: Request, services: Annotated[Services, Depends(get_services)]
) -> Principal:
    principal = services.tenants.authenticate(_bearer_key(request))
    if principal is None:
        raise AuthenticationError("Incorrect API key provided.")
    return principal


async def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise PermissionDeniedError("this route needs the admin API key", code="admin_key_required")
    return principal


async def get_tenant(principal: Annotated[Principal, Depends(get_principal)]) -> Tenant:
    if principal.tenant is None:
        raise PermissionDeniedError(
            "this route needs a tenant API key, not an admin key", code="tenant_key_required"
        )
    return principal.tenant


def _check_json_body(request: Request) -> None:
    """JSON bodies only (parameters such as `charset` allowed), and never compressed: inflating
    a body would get around the body-size bound, which counts the bytes received. A body sent
    with no Content-Type at all is read as JSON, as FastAPI (and so vLLM's server) does."""
    content_type = request.headers.get("content-type")
    media_type = content_type.partition(";")[0].strip().lower() if content_type else None
    if media_type not in (None, "application/json"):
        raise UnsupportedMediaTypeError(
            "the request body must be JSON, sent with `Content-Type: application/json`"
        )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaTypeError(
            "compressed request bodies are not accepted; send it uncompressed",
            code="unsupported_content_encoding",
        )


async def parse_body(request: Request, model: type[M]) -> M:
    """The body as `model`: JSON (415 otherwise), valid (400 naming the field otherwise)."""
    _check_json_body(request)
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e.errors()) from e


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
AdminDep = Annotated[Principal, Depends(get_admin)]
