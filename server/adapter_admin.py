"""The operator's adapter service: an upload is received (bounded), validated, stored and
registered, counted by result and logged once; list, show, and delete (which drops the
adapter's metric series). No FastAPI in here.

Adapter files are collected once no record (of any tenant: blobs are content-addressed) and no
running request uses them: after a delete, a replace or a refused upload, when the engine reports
a version idle, and by `sweep`, which also takes what crashes and other replicas left.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from adapters.errors import (
    AdapterConflictError,
    AdapterError,
    AdapterNotFoundError,
    AdapterRejectedError,
    AdapterStoreError,
    AdapterTooLargeError,
)
from adapters.registry import AdapterRegistry, PutResult
from adapters.store import ORPHAN_GRACE_S, AdapterStore
from adapters.types import ADAPTER_NAME, AdapterRecord, BaseModelSpec
from adapters.validation import ValidationLimits, check_upload_filename, validate_adapter
from server.engines.pool import EnginePool
from server.log_format import escape_controls as esc
from server.metrics import Metrics, adapter_label
from server.tenants import TenantDirectory

logger = logging.getLogger(__name__)

COPY_BLOCK = 1 << 20
SWEEP_INTERVAL_S = 3600.0


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
        engines: EnginePool,
        metrics: Metrics,
        *,
        orphan_grace_s: float = ORPHAN_GRACE_S,
    ) -> None:
        self._tenants = tenants
        self._store = store
        self._registry = registry
        self._base = base
        self._limits = limits
        self._staging = staging_dir
        self._engines = engines
        self._metrics = metrics
        # Store-then-register and unregister-then-collect each run whole under this lock, so a
        # delete never collects files an upload of the same content has just registered. (One
        # process only: replicas sharing a store need the shared store's own guarantee.)
        self._commit_lock = threading.Lock()
        self._orphan_grace_s = orphan_grace_s
        # Digests whose files must go once the engine reports them idle (they were in use when
        # their last record went). Changed under `_commit_lock` only; `_on_idle` only reads it.
        self._doomed: set[str] = set()
        self._collections: set[asyncio.Task[None]] = set()
        engines.on_idle(self._on_idle)

    def check_names(self, tenant: str, name: str | None = None) -> None:
        """404 for a tenant that does not exist, 400 for a name no adapter can have."""
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
            self.check_names(tenant, name)
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
                merge_only=info.merge_only,
            )
            with self._commit_lock:
                result, stored = self._commit(record, config_bytes, Path(staged), replace)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        logger.info(
            "adapter %s/%s %s (digest %s)",
            esc(tenant), esc(name), result.name.lower(), info.digest[:12],
        )  # fmt: skip
        return result, stored

    def _commit(
        self, record: AdapterRecord, config_bytes: bytes, weights: Path, replace: bool
    ) -> tuple[PutResult, AdapterRecord]:
        """Store, then register; collect what that leaves unreferenced. Under `_commit_lock`."""
        previous = self._registry.get(record.tenant, record.name)
        if previous is not None and previous.digest != record.digest and not replace:
            # Refused before copying anything; the registry checks again under its own lock.
            raise AdapterConflictError(
                f"adapter {record.name!r} already holds different content; replace it explicitly",
                code="adapter_conflict",
                param="name",
            )
        created = self._store.put(record.digest, config_bytes, weights)
        try:
            result, stored = self._registry.put(record, replace=replace)
        except AdapterError:
            # Only a blob this call published: one that was there already may be another
            # replica's, between its own put and its record.
            if created:
                self._collect_locked(record.digest)
            raise
        if result is PutResult.REPLACED and previous is not None:
            self._collect_locked(previous.digest)
        return result, stored

    async def list(self, tenant: str) -> list[AdapterRecord]:
        self.check_names(tenant)
        return await asyncio.to_thread(self._registry.list, tenant)

    async def get(self, tenant: str, name: str) -> AdapterRecord:
        self.check_names(tenant, name)
        record = await asyncio.to_thread(self._registry.get, tenant, name)
        if record is None:
            raise AdapterNotFoundError(f"adapter `{name}` does not exist", param="name")
        return record

    async def delete(self, tenant: str, name: str) -> AdapterRecord:
        self.check_names(tenant, name)
        record = await asyncio.to_thread(self._delete, tenant, name)
        # Its series would otherwise stay in every scrape for the life of the process.
        self._metrics.forget_model(adapter_label(record.tenant, record.name))
        logger.info("adapter %s/%s deleted", esc(tenant), esc(name))
        return record

    def _delete(self, tenant: str, name: str) -> AdapterRecord:
        with self._commit_lock:
            record = self._registry.delete(tenant, name)
            self._collect_locked(record.digest)
        return record

    def _collect_locked(self, digest: str) -> None:
        """Delete the version's files unless a record references it or a request here uses it;
        in use, they go when it turns idle (`_on_idle`); in a shared store, the sweep does it.
        The caller holds `_commit_lock`. A failure is logged, not raised: the change it follows
        is done, and `sweep` retries."""
        if self._store.shared:
            # Other replicas may have resolved this version a moment ago (they hold records
            # for `record_ttl_s`), and an engine may still have to fetch it: the sweep collects
            # it, once nothing references it and it is older than the orphan grace.
            return
        # Marked before the in-use check, so a pin released right after it finds the mark.
        self._doomed.add(digest)
        try:
            if self._engines.in_use(digest):
                return
            if digest not in self._registry.referenced_digests():
                self._store.delete(digest)
                logger.info("adapter files %s collected", digest[:12])
            self._doomed.discard(digest)
        except AdapterStoreError as e:
            logger.warning("collecting adapter files %s failed: %s", digest[:12], e.message)

    def _on_idle(self, digest: str) -> None:
        # On the event loop, for every request that ends: only a doomed digest costs a thread.
        if digest in self._doomed:
            task = asyncio.create_task(asyncio.to_thread(self._collect_doomed, digest))
            self._collections.add(task)  # referenced until done
            task.add_done_callback(self._collections.discard)

    def _collect_doomed(self, digest: str) -> None:
        with self._commit_lock:
            if digest in self._doomed:
                self._collect_locked(digest)

    def sweep(self) -> int:
        """Delete every version no record references, no request here uses, and nobody put in
        the last `orphan_grace_s` (see store.ORPHAN_GRACE_S); returns how many went."""
        removed = 0
        with self._commit_lock:
            # References read before ages: a version registered after this read was put after
            # it too, so it is younger than the grace and kept.
            referenced = self._registry.referenced_digests()
            for digest in sorted(self._store.digests(self._orphan_grace_s) - referenced):
                if self._engines.in_use(digest):
                    self._doomed.add(digest)  # goes when the request ends
                    continue
                self._store.delete(digest)
                self._doomed.discard(digest)
                removed += 1
        if removed:
            logger.info("adapter sweep collected %d unreferenced versions", removed)
        return removed

    async def run_sweeps(
        self,
        interval_s: float = SWEEP_INTERVAL_S,
        merged: Callable[[float], Awaitable[int]] | None = None,
    ) -> None:
        """Sweep now (what a crash or another replica left behind), then every `interval_s`,
        until cancelled; `merged(grace_s)` too, the merged copies' sweep. A failed sweep is
        logged and tried again next time."""
        while True:
            try:
                await asyncio.to_thread(self.sweep)
                if merged is not None:
                    await merged(self._orphan_grace_s)
            except AdapterStoreError as e:
                logger.warning("adapter sweep failed: %s", e.message)
            await asyncio.sleep(interval_s)

    async def aclose(self) -> None:
        """Wait for collections under way (a thread cannot be cancelled)."""
        await asyncio.gather(*self._collections, return_exceptions=True)


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
