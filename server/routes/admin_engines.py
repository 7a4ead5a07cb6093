"""Operator route for the engine pool: each engine's state as the gateway sees it (what
`loragate engines list` prints)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server import openapi as doc
from server.deps import AdminDep, ServicesDep

router = APIRouter(prefix="/admin/v1/engines", responses=doc.errors(401, 403))

LIST_DOC: dict[str, Any] = {
    "response_model": None,
    "responses": {200: {"model": doc.EngineList, "description": "The pool's engines."}},
    "openapi_extra": doc.ADMIN_AUTH,
}


@router.get("", **LIST_DOC)
@router.head("", **LIST_DOC)
async def list_engines(_: AdminDep, services: ServicesDep) -> dict[str, Any]:
    """Every engine of this gateway's pool: up or not (and why), requests running on it and
    waiting for it here, the adapter versions (digests) loaded there, and for a merged engine
    the one version it serves merged."""
    data = []
    for member in services.pool.members:
        reason = member.monitor.reason
        data.append(
            {
                "name": member.name,
                "url": member.url,
                "ready": reason is None,
                "reason": None if reason is None else reason.message,
                "running": member.admission.running,
                "queued": member.admission.queued,
                "adapters": sorted(member.slots.loaded),
                "merged": member.monitor.merged,
            }
        )
    return {"object": "list", "data": data}
