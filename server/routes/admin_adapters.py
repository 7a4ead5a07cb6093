"""Operator routes for tenant adapters: parse, authorize (admin key), call the admin service,
render."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from adapters.errors import AdapterRejectedError
from adapters.registry import PutResult
from server import openapi as doc
from server.adapter_admin import UploadedFile
from server.deps import AdminDep, ServicesDep

router = APIRouter(
    prefix="/admin/v1/tenants/{tenant}/adapters",
    responses=doc.errors(401, 403, 404),
)

FILE_FIELDS = ("adapter_config", "adapter_model")
MAX_FORM_FIELDS = 4
RESULT_HEADER = {
    "x-loragate-result": {
        "description": "What the upload did.",
        "required": True,
        "schema": {"type": "string", "enum": [r.name.lower() for r in PutResult]},
    }
}
UPLOAD_FORM = doc.multipart_body(
    {
        "adapter_config": "adapter_config.json, as PEFT's save_pretrained wrote it",
        "adapter_model": "adapter_model.safetensors (pickled weights are refused)",
    }
)


@router.put(
    "/{name}",
    response_model=None,
    responses={
        200: {"model": doc.AdapterRecord, "headers": RESULT_HEADER,
              "description": "The same content was there already (`unchanged`)."},
        201: {"model": doc.AdapterRecord, "headers": RESULT_HEADER,
              "description": "Stored (`created`, or `replaced` with `replace=true`)."},
        **doc.errors(400, 409, 413),
    },
    openapi_extra=doc.ADMIN_AUTH | UPLOAD_FORM,
)  # fmt: skip
async def put_adapter(
    tenant: str, name: str, request: Request, _: AdminDep, services: ServicesDep,
    replace: bool = False,
) -> JSONResponse:  # fmt: skip
    async with request.form(max_files=len(FILE_FIELDS), max_fields=MAX_FORM_FIELDS) as form:
        unexpected = sorted(set(form.keys()) - set(FILE_FIELDS))
        if unexpected:
            raise AdapterRejectedError(
                f"unexpected form field {unexpected[0]!r}: send exactly adapter_config and "
                "adapter_model (safetensors only; pickled weights are refused)",
                code="unexpected_field",
                param=unexpected[0],
            )
        files = [_file(form.get(field), field) for field in FILE_FIELDS]
        result, record = await services.admin.upload(
            tenant, name, files[0], files[1], replace=replace
        )
    status = 200 if result is PutResult.UNCHANGED else 201
    headers = {"x-loragate-result": result.name.lower()}
    return JSONResponse(record.to_json(), status_code=status, headers=headers)


def _file(value: Any, field: str) -> UploadedFile:
    if not isinstance(value, UploadFile):
        raise AdapterRejectedError(
            f"missing file field {field!r}", code="missing_file", param=field
        )
    return UploadedFile(field, value.filename, value.file)


# What each read route documents; GET and HEAD share it (HEAD answers like GET, no body).
LIST_DOC: dict[str, Any] = {
    "response_model": None,
    "responses": {200: {"model": doc.AdapterList, "description": "The tenant's adapters."}},
    "openapi_extra": doc.ADMIN_AUTH,
}
ONE_DOC: dict[str, Any] = {
    "response_model": None,
    "responses": {200: {"model": doc.AdapterRecord, "description": "The adapter's record."}}
    | doc.errors(400),
    "openapi_extra": doc.ADMIN_AUTH,
}


@router.get("", **LIST_DOC)
@router.head("", **LIST_DOC)
async def list_adapters(tenant: str, _: AdminDep, services: ServicesDep) -> dict[str, Any]:
    records = await services.admin.list(tenant)
    return {"object": "list", "data": [r.to_json() for r in records]}


@router.get("/{name}", **ONE_DOC)
@router.head("/{name}", **ONE_DOC)
async def get_adapter(tenant: str, name: str, _: AdminDep, services: ServicesDep) -> dict[str, Any]:
    return (await services.admin.get(tenant, name)).to_json()


@router.delete("/{name}", **ONE_DOC)
async def delete_adapter(
    tenant: str, name: str, _: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    return (await services.admin.delete(tenant, name)).to_json()


MERGE_DOC: dict[str, Any] = {
    "response_model": None,
    "responses": {200: {"model": doc.AdapterRecord, "description": "The adapter's record."}}
    | doc.errors(400, 404, 409, 500, 501),
    "openapi_extra": doc.ADMIN_AUTH,
}


@router.post("/{name}/merge", **MERGE_DOC)
async def merge_adapter(
    tenant: str, name: str, _: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    """Promote the adapter's current version: merge it into the base model (full precision),
    store the merged model and record it on the adapter, for `loragate engine --merged` to
    serve. Takes as long as the merge (about 20 s for the default model); merging an adapter
    already merged answers at once."""
    services.admin.check_names(tenant, name)
    return (await services.promotion.merge(tenant, name)).to_json()


@router.delete("/{name}/merge", **MERGE_DOC)
async def demote_adapter(
    tenant: str, name: str, _: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    """Undo a promotion: the adapter is served hot-swapped only, from the next request on."""
    services.admin.check_names(tenant, name)
    return (await services.promotion.demote(tenant, name)).to_json()
