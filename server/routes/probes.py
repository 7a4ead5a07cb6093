"""Probes: /healthz (process alive), /readyz (can serve now). Metrics are not served here but
on their own listener (server/metrics_server.py): they name every tenant and adapter."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import ServicesDep

router = APIRouter()


@router.get("/healthz")
@router.head("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
@router.head("/readyz")
async def readyz(services: ServicesDep) -> dict[str, str]:
    """200 when an engine can serve; else 503 whose `code` and message say why."""
    services.pool.ensure_ready()
    return {"status": "ready"}
