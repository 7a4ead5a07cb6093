"""The operator's adapter service: an upload is received (bounded), validated, stored and
registered, counted by result and logged once; list, show, and delete (which collects the files
once no record and no running request uses them, and drops the adapter's metric series). No
FastAPI in here.

Files are validated before anything is stored, stored before the registry record is written
(the record is the commit point), so a crash at any stage leaves no record pointing at nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from adapters.errors import (
    AdapterConflictError,
    AdapterError,
    AdapterNotFoundError,
    AdapterRejectedError,
    AdapterTooLargeError,
)
from adapters.registry import AdapterRegistry, PutResult
from adapters.store import AdapterStore
from adapters.types import ADAPTER_NAME, AdapterRecord, BaseModelSpec
from adapters.validation import ValidationLimits, check_upload_filename, validate_adapter
from server.engine_adapters import EngineAdapters
from server.log_format import escape_controls as esc
from server.metrics import Metrics, adapter_label
from server.tenants import TenantDirectory

logger = logging.getLogger(__name__)

COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class UploadedFile:
    field: str
    filename: str | None
    file: BinaryIO


class AdapterAdminService:
    def __init__(
        self,
        tenants: TenantDirectory,
        store: AdapterStore,
        registry: AdapterRegistry,
        base: BaseModelSpec | None,
        limits: ValidationLimits,
        staging_dir: Path,
        engine_adapters: EngineAdapters,
        metrics: Metrics,
    ) -> None:
        self._tenants = tenants
        self._store = store
        self._registry = registry
        self._base = base
        self._limits = limits
        self._staging = staging_dir
        self._engine_adapters = engine_adapters
        self._metrics = metrics
        # Store-then-register and unregister-then-collect each run whole under this lock, so a
        # delete never collects files an upload of the same content has just registered. (One
        # process only: replicas sharing a store need the shared store's own guarantee.)
        self._commit_lock = threading.Lock()

    def _check_names(self, tenant: str, name: str | None = None) -> None:
        if self._tenants.tenant(tenant) is None:
            raise AdapterNotFoundError(
                f"tenant `{tenant}` does not exist", param="tenant", code="tenant_not_found"
            )
        if name is not None and not ADAPTER_NAME.fullmatch(name):
            raise AdapterRejectedError(
                "adapter names are 1-63 chars: lowercase letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
                code="bad_name",
                param="name",
            )

    async def upload(
        self,
        tenant: str,
        name: str,
        config: UploadedFile,
        weights: UploadedFile,
        *,
        replace: bool,
    ) -> tuple[PutResult, AdapterRecord]:
        try:
            self._check_names(tenant, name)
            result = await asyncio.to_thread(self._upload, tenant, name, config, weights, replace)
        except AdapterError as e:
            self._metrics.adapter_uploads.labels(_failure_label(e)).inc()
            # The names come from the URL and the message may quote the upload: escaped, so
            # neither can forge a log line (the formatter escapes too; this holds without it).
            logger.warning(
                "adapter upload %s/%s refused: %s", esc(tenant), esc(name), esc(e.message)
            )
            raise
        self._metrics.adapter_uploads.labels(result[0].name.lower()).inc()
        return result

    def _upload(
        self, tenant: str, name: str, config: UploadedFile, weights: UploadedFile, replace: bool
    ) -> tuple[PutResult, AdapterRecord]:
        if self._base is None:
            raise AdapterRejectedError(
                "the base model's config.json is not available to this gateway",
                code="base_model_unavailable",
            )
        check_upload_filename(config.field, config.filename)
        check_upload_filename(weights.field, weights.filename)
        config_bytes = _read_bounded(config, self._limits.max_config_bytes)
        self._staging.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(prefix="upload-", dir=self._staging)
        try:
            with os.fdopen(fd, "wb") as out:
                _copy_bounded(weights, out, self._limits.max_weights_bytes)
            info = validate_adapter(config_bytes, Path(staged), self._base, self._limits)
            record = AdapterRecord(
                tenant=tenant,
                name=name,
                digest=info.digest,
                rank=info.rank,
                alpha=info.alpha,
                target_modules=info.target_modules,
                size_bytes=info.size_bytes,
                created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
            )
            with self._commit_lock:
                self._store.put(info.digest, config_bytes, Path(staged))
                result, stored = self._registry.put(record, replace=replace)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        logger.info(
            "adapter %s/%s %s (digest %s)",
            esc(tenant), esc(name), result.name.lower(), info.digest[:12],
        )  # fmt: skip
        return result, stored

    async def list(self, tenant: str) -> list[AdapterRecord]:
        self._check_names(tenant)
        return await asyncio.to_thread(self._registry.list, tenant)

    async def get(self, tenant: str, name: str) -> AdapterRecord:
        self._check_names(tenant, name)
        record = await asyncio.to_thread(self._registry.get, tenant, name)
        if record is None:
            raise AdapterNotFoundError(f"adapter `{name}` does not exist", param="name")
        return record

    async def delete(self, tenant: str, name: str) -> AdapterRecord:
        self._check_names(tenant, name)
        record = await asyncio.to_thread(self._delete, tenant, name)
        # Its series would otherwise stay in every scrape for the life of the process.
        self._metrics.forget_model(adapter_label(record.tenant, record.name))
        logger.info("adapter %s/%s deleted", esc(tenant), esc(name))
        return record

    def _delete(self, tenant: str, name: str) -> AdapterRecord:
        with self._commit_lock:
            record = self._registry.delete(tenant, name)
            # Keep the files while a request still runs on them or another record shares them.
            in_use = self._engine_adapters.in_use(record.digest)
            if not in_use and record.digest not in self._registry.referenced_digests():
                self._store.delete(record.digest)
        return record


def _failure_label(error: AdapterError) -> str:
    if isinstance(error, AdapterConflictError):
        return "conflict"
    if isinstance(error, AdapterRejectedError | AdapterNotFoundError):
        return "rejected"
    return "error"


def _read_bounded(upload: UploadedFile, limit: int) -> bytes:
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise AdapterTooLargeError(
            f"{upload.field} is larger than {limit} bytes",
            code="file_too_large",
            param=upload.field,
        )
    return data


def _copy_bounded(upload: UploadedFile, out: BinaryIO, limit: int) -> None:
    copied = 0
    while block := upload.file.read(COPY_BLOCK):
        copied += len(block)
        if copied > limit:
            raise AdapterTooLargeError(
                f"{upload.field} is larger than {limit} bytes",
                code="file_too_large",
                param=upload.field,
            )
        out.write(block)
    out.flush()
