"""Promotion: the merged copy is built from the adapter's current version, stored, and recorded
on that version only; promoting twice builds once; demoting leaves the adapter hot-swapped."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from adapters.errors import AdapterConflictError, AdapterNotFoundError
from adapters.merged_store import MERGED_MANIFEST, LocalMergedArtifacts, merge_key
from adapters.registry import LocalAdapterRegistry
from adapters.store import LocalAdapterStore
from adapters.types import FULL_PRECISION, AdapterRecord
from server.merging import promotion as promotion_module
from server.merging.promotion import MergeFailedError, MergeUnavailableError, PromotionService

REVISION = "tiny@1"


def stored(store: LocalAdapterStore, registry: LocalAdapterRegistry, adapter: Path) -> str:
    """Put the adapter's files in the store under a made-up digest and register them."""
    digest = str(len(list(registry.list("acme")))) * 64
    store.put(
        digest,
        (adapter / "adapter_config.json").read_bytes(),
        adapter / "adapter_model.safetensors",
    )
    record = AdapterRecord(
        "acme", "hot", digest, 4, 8.0, ("q_proj", "v_proj"), 1, "2026-01-01T00:00:00Z"
    )
    registry.put(record, replace=True)
    return digest


@pytest.fixture
def service(
    tmp_path: Path, models: tuple[Path, Path]
) -> tuple[PromotionService, LocalAdapterStore, LocalAdapterRegistry, LocalMergedArtifacts]:
    base, _ = models
    store, registry = LocalAdapterStore(tmp_path), LocalAdapterRegistry(tmp_path)
    artifacts = LocalMergedArtifacts(tmp_path)
    promotion = PromotionService(
        registry, store, artifacts, base, REVISION, tmp_path / "merges", timeout_s=300
    )
    return promotion, store, registry, artifacts


async def test_a_merge_is_stored_and_recorded_on_the_version_it_was_built_from(
    service: tuple[PromotionService, LocalAdapterStore, LocalAdapterRegistry, LocalMergedArtifacts],
    models: tuple[Path, Path],
) -> None:
    promotion, store, registry, artifacts = service
    digest = stored(store, registry, models[1])
    record = await promotion.merge("acme", "hot")
    key = merge_key(digest, REVISION, FULL_PRECISION)
    copy = record.merged_copy(REVISION)
    assert copy is not None and copy.key == key
    assert artifacts.exists(key) and registry.get("acme", "hot") == record
    assert not any((promotion._staging).iterdir())  # nothing left of the build

    # Promoting again builds nothing: the copy is there.
    built = artifacts.local_dir(key)
    mtime = (built / "model.safetensors").stat().st_mtime_ns
    assert await promotion.merge("acme", "hot") == record
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime

    demoted = await promotion.demote("acme", "hot")
    assert demoted.merged == () and registry.get("acme", "hot") == demoted
    assert artifacts.exists(key)  # kept for the sweep: an identical adapter may share it


async def test_a_version_replaced_during_the_merge_keeps_no_merged_copy(
    service: tuple[PromotionService, LocalAdapterStore, LocalAdapterRegistry, LocalMergedArtifacts],
    models: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    promotion, store, registry, _ = service
    stored(store, registry, models[1])
    real_build = promotion_module.build_merged

    def build_then_replace(*args: object, **kwargs: object) -> None:
        real_build(*args, **kwargs)  # type: ignore[arg-type]
        stored(store, registry, models[1])  # an upload of a new version meanwhile

    monkeypatch.setattr(promotion_module, "build_merged", build_then_replace)
    with pytest.raises(AdapterConflictError) as caught:
        await promotion.merge("acme", "hot")
    assert caught.value.code == "adapter_changed"
    current = registry.get("acme", "hot")
    assert current is not None and current.merged == ()


async def test_a_failed_merge_is_a_clear_error_and_records_nothing(
    service: tuple[PromotionService, LocalAdapterStore, LocalAdapterRegistry, LocalMergedArtifacts],
    models: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    promotion, store, registry, artifacts = service
    broken = tmp_path / "broken"
    shutil.copytree(models[1], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    digest = stored(store, registry, broken)
    with pytest.raises(MergeFailedError) as caught:
        await promotion.merge("acme", "hot")
    assert "the merge failed" in caught.value.message and str(tmp_path) not in caught.value.message
    assert registry.get("acme", "hot").merged == ()  # type: ignore[union-attr]
    assert not artifacts.exists(merge_key(digest, REVISION, FULL_PRECISION))
    with pytest.raises(AdapterNotFoundError):
        await promotion.merge("acme", "nope")


async def test_without_pytorch_a_merge_is_refused_with_501(
    service: tuple[PromotionService, LocalAdapterStore, LocalAdapterRegistry, LocalMergedArtifacts],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(promotion_module, "can_merge_here", lambda: False)
    with pytest.raises(MergeUnavailableError) as caught:
        await service[0].merge("acme", "hot")
    assert caught.value.status_code == 501 and caught.value.code == "merge_unavailable"


async def test_on_a_quantized_base_a_merge_is_refused_with_501(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    store, registry = LocalAdapterStore(tmp_path), LocalAdapterRegistry(tmp_path)
    promotion = PromotionService(
        registry, store, LocalMergedArtifacts(tmp_path), models[0], REVISION,
        tmp_path / "merges", quantized=True,
    )  # fmt: skip
    with pytest.raises(MergeUnavailableError) as caught:
        await promotion.merge("acme", "hot")
    assert caught.value.status_code == 501 and "quantized base" in caught.value.message


def backdate(path: Path, seconds: float) -> None:
    when = path.stat().st_mtime - seconds
    os.utime(path, (when, when))


async def test_the_sweep_collects_only_old_merged_copies_no_record_points_at(
    service: tuple[PromotionService, LocalAdapterStore, LocalAdapterRegistry, LocalMergedArtifacts],
    models: tuple[Path, Path],
) -> None:
    promotion, store, registry, artifacts = service
    digest = stored(store, registry, models[1])
    key = merge_key(digest, REVISION, FULL_PRECISION)
    await promotion.merge("acme", "hot")
    backdate(artifacts.local_dir(key) / MERGED_MANIFEST, 7200)
    assert await promotion.sweep(600) == 0 and artifacts.exists(key)  # recorded: kept

    await promotion.demote("acme", "hot")
    assert await promotion.sweep(600) == 1 and not artifacts.exists(key)

    # Built again: younger than the grace (as a promotion not recorded yet is), so kept.
    await promotion.merge("acme", "hot")
    await promotion.demote("acme", "hot")
    assert await promotion.sweep(600) == 0 and artifacts.exists(key)
    assert registry.referenced_merged_keys() == set()
