"""FastAPI dependencies: the app's services, and who the caller is.

Authentication runs before the body is parsed, so an unauthenticated caller always gets 401,
never a hint about what a valid body looks like. The dependencies are `async def` although
they never await: FastAPI runs plain `def` dependencies in a worker thread, a hop per dependency
per request that showed up as a millisecond of the gateway's added latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from server.adapter_admin import AdapterAdminService
from server.engine_monitor import EngineMonitor
from server.errors import AuthenticationError, PermissionDeniedError, validation_error
from server.metrics import Metrics
from server.serving import GenerationService
from server.tenants import Principal, Tenant, TenantDirectory

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Services:
    """Everything the routes use, built and owned by the app's lifespan."""

    tenants: TenantDirectory
    generation: GenerationService
    admin: AdapterAdminService
    monitor: EngineMonitor
    metrics: Metrics


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
        raise PermissionDeniedError("this route needs the admin API key")
    return principal


async def get_tenant(principal: Annotated[Principal, Depends(get_principal)]) -> Tenant:
    if principal.tenant is None:
        raise PermissionDeniedError("this route needs a tenant API key, not an admin key")
    return principal.tenant


async def parse_body(request: Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e.errors()) from e


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
AdminDep = Annotated[Principal, Depends(get_admin)]
