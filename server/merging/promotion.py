"""Promoting an adapter to a merged copy, and demoting it: what `POST/DELETE
/admin/v1/tenants/{tenant}/adapters/{name}/merge` (and `loragate adapters merge` / `demote`) do.

A merge reads the adapter's current version, merges it into this gateway's base model in a
subprocess (`server.merging.build`: full precision, bounded in time, nothing half-written),
publishes the result to the store under its key (adapter digest, base revision, scheme), and
only then records it on the version it was built from: if the adapter was replaced meanwhile the
record is left alone (409), so a merged copy is never attached to another version. Merges run
one at a time per gateway (each holds a full-precision copy of the base in memory).

Demoting removes the copies from the record: gateways stop routing to merged engines at once
(they route by the record), and the engines serving them stop within their poll
(`server.engine_servers.merged_model`). The stored copy stays
until the sweep (`sweep`, with the adapter sweep): another tenant's identical adapter may share
it, so only a copy no record points at goes, and only once older than the orphan grace (a
promotion publishes its copy before it records it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from adapters.errors import AdapterNotFoundError
from adapters.merged_store import MergedArtifacts, merge_key
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from adapters.types import FULL_PRECISION, AdapterRecord, MergedCopy
from server.errors import LoragateError
from server.merging.build import MergeError, build_merged

logger = logging.getLogger(__name__)


class MergeUnavailableError(LoragateError):
    status_code = 501
    error_type = "not_implemented"
    default_code = "merge_unavailable"


class MergeFailedError(LoragateError):
    """The merge worker failed or timed out on an adapter that passed validation: ours to fix,
    not the caller's."""

    default_code = "merge_failed"


def can_merge_here() -> bool:
    """Whether this environment has what merging needs (PyTorch and PEFT): the gateway image
    has neither; an engine image, or `make install`, has both."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "peft"))


class PromotionService:
    def __init__(
        self,
        registry: AdapterRegistry,
        store: AdapterStore,
        artifacts: MergedArtifacts,
        base_dir: Path,
        base_revision: str,
        staging_dir: Path,
        *,
        timeout_s: float = 900,
        quantized: bool = False,
    ) -> None:
        self._registry = registry
        self._store = store
        self._artifacts = artifacts
        self._base_dir = base_dir
        self._revision = base_revision
        self._staging = staging_dir
        self._timeout_s = timeout_s
        self._quantized = quantized
        self._one_at_a_time = asyncio.Lock()

    async def merge(self, tenant: str, name: str) -> AdapterRecord:
        if not can_merge_here():
            raise MergeUnavailableError(
                "this gateway cannot build merged models (no PyTorch and PEFT here): run "
                "`loragate adapters merge` against a gateway that has them"
            )
        if self._quantized:
            # Its copies would be keyed by the quantized base's revision but built from full
            # precision weights: not built for that yet.
            raise MergeUnavailableError(
                "this gateway serves a quantized base (LORAGATE_MODEL__QUANTIZATION): merging "
                "onto it is not supported yet; merge on a gateway serving the full-precision base"
            )
        async with self._one_at_a_time:
            return await asyncio.to_thread(self._merge, tenant, name)

    def _merge(self, tenant: str, name: str) -> AdapterRecord:
        record = self._current(tenant, name)
        key = merge_key(record.digest, self._revision, FULL_PRECISION)
        existing = record.merged_copy(self._revision)
        if existing is not None and self._artifacts.exists(existing.key):
            return record  # promoted already
        if not self._artifacts.exists(key):
            self._build_and_publish(record, key)
        copy = MergedCopy(key, self._revision, FULL_PRECISION)
        others = tuple(c for c in record.merged if c.key != key)
        updated = self._registry.set_merged(tenant, name, record.digest, (*others, copy))
        logger.info(
            "adapter %s/%s (version %s) merged as %s", tenant, name, record.digest[:12], key[:12]
        )
        return updated

    def _build_and_publish(self, record: AdapterRecord, key: str) -> None:
        self._staging.mkdir(parents=True, exist_ok=True)
        adapter_dir = self._store.local_dir(record.digest)
        with tempfile.TemporaryDirectory(dir=self._staging, prefix="merge-") as scratch:
            out = Path(scratch) / key
            try:
                build_merged(
                    self._base_dir, adapter_dir, out, adapter_digest=record.digest,
                    base_revision=self._revision, timeout_s=self._timeout_s,
                )  # fmt: skip
            except MergeError as e:
                logger.error("merge of %s/%s failed: %s", record.tenant, record.name, e)
                raise MergeFailedError(f"the merge failed: {e}") from e
            try:
                self._artifacts.publish(key, out)
            finally:
                shutil.rmtree(out, ignore_errors=True)

    async def sweep(self, grace_s: float) -> int:
        """Delete the stored merged copies that no record points at and that were published
        over `grace_s` ago; returns how many went. Never while a merge here runs: it may be
        about to record a copy it found stored."""
        async with self._one_at_a_time:
            return await asyncio.to_thread(self._sweep, grace_s)

    def _sweep(self, grace_s: float) -> int:
        # References read before the listing: a copy published after this read is younger
        # than the grace, so kept. A promotion on another replica that records an old copy it
        # found stored, between this read and the delete, loses it; promoting again rebuilds
        # it (replicas sharing a store need the store's own guarantee, as for adapter files).
        referenced = self._registry.referenced_merged_keys()
        doomed = sorted(self._artifacts.keys(grace_s) - referenced)
        for key in doomed:
            self._artifacts.delete(key)
        if doomed:
            logger.info("merged sweep collected %d unreferenced merged copies", len(doomed))
        return len(doomed)

    async def demote(self, tenant: str, name: str) -> AdapterRecord:
        return await asyncio.to_thread(self._demote, tenant, name)

    def _demote(self, tenant: str, name: str) -> AdapterRecord:
        record = self._current(tenant, name)
        if not record.merged:
            return record
        updated = self._registry.set_merged(tenant, name, record.digest, ())
        logger.info("adapter %s/%s demoted: hot-swapped only", tenant, name)
        return updated

    def _current(self, tenant: str, name: str) -> AdapterRecord:
        record = self._registry.get(tenant, name)
        if record is None:
            raise AdapterNotFoundError(f"adapter `{name}` does not exist", param="name")
        return record
