from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from pathlib import Path

import pytest

from adapters.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterRejectedError,
    AdapterStoreError,
)
from adapters.registry import AdapterRegistry, LocalAdapterRegistry, PutResult
from adapters.types import AdapterRecord, MergedCopy


def digest(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def record(
    name: str = "support-bot",
    version: str = "v1",
    tenant: str = "acme",
    created_at: str = "2025-01-01T00:00:00Z",
) -> AdapterRecord:
    return AdapterRecord(
        tenant=tenant,
        name=name,
        digest=digest(version),
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        size_bytes=1234,
        created_at=created_at,
    )


@pytest.fixture
def registry(tmp_path: Path) -> LocalAdapterRegistry:
    return LocalAdapterRegistry(tmp_path)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_new_name_is_created(registry: LocalAdapterRegistry) -> None:
    assert registry.put(record(), replace=False) == (PutResult.CREATED, record())
    assert registry.get("acme", "support-bot") == record()


def test_same_content_twice_is_unchanged(registry: LocalAdapterRegistry) -> None:
    registry.put(record(created_at="2025-01-01T00:00:00Z"), replace=False)
    again = record(created_at="2025-06-01T00:00:00Z")
    result, kept = registry.put(again, replace=False)
    assert result is PutResult.UNCHANGED and kept.created_at == "2025-01-01T00:00:00Z"
    assert registry.put(again, replace=True) == (PutResult.UNCHANGED, kept)


def test_different_content_is_conflict_without_replace(registry: LocalAdapterRegistry) -> None:
    registry.put(record(version="v1"), replace=False)
    with pytest.raises(AdapterConflictError) as info:
        registry.put(record(version="v2"), replace=False)
    assert (info.value.code, info.value.param) == ("adapter_conflict", "name")
    assert registry.get("acme", "support-bot") == record(version="v1")


def test_replace_points_the_name_at_the_new_version(registry: LocalAdapterRegistry) -> None:
    registry.put(record(version="v1"), replace=False)
    new = record(version="v2", created_at="2025-06-01T00:00:00Z")
    assert registry.put(new, replace=True) == (PutResult.REPLACED, new)
    assert registry.get("acme", "support-bot") == new


def test_list_is_sorted_by_name_and_holds_only_the_tenants_adapters(
    registry: LocalAdapterRegistry,
) -> None:
    for name in ("zeta", "alpha", "mid.v2"):
        registry.put(record(name=name), replace=False)
    registry.put(record(name="other", tenant="globex"), replace=False)
    assert [r.name for r in registry.list("acme")] == ["alpha", "mid.v2", "zeta"]
    assert [r.name for r in registry.list("globex")] == ["other"]
    assert registry.list("initech") == []
    assert registry.get("globex", "alpha") is None


def test_delete_returns_the_record_and_missing_is_not_found(
    registry: LocalAdapterRegistry,
) -> None:
    registry.put(record(), replace=False)
    assert registry.delete("acme", "support-bot") == record()
    assert registry.get("acme", "support-bot") is None
    with pytest.raises(AdapterNotFoundError) as info:
        registry.delete("acme", "support-bot")
    assert info.value.code == "adapter_not_found"
    with pytest.raises(AdapterNotFoundError):
        registry.delete("initech", "support-bot")


ESCAPES = [
    "",
    ".",
    "..",
    "../../etc/passwd",
    "a/b",
    "/abs",
    "a\0b",
    "a\\b",
    "name\n",
    ".hidden",
    "-leading-dash",
    "UPPER",
    "ａｃｍｅ",  # fullwidth letters
    "аcme",  # Cyrillic а
    "acme\u200b",  # zero-width space
    "a" * 64,
    "a" * 10_000,
]


@pytest.mark.parametrize("bad", ESCAPES)
def test_names_cannot_escape_the_registry_dir(
    registry: LocalAdapterRegistry, tmp_path: Path, bad: str
) -> None:
    before = tree(tmp_path)
    with pytest.raises(AdapterRejectedError) as info:
        registry.put(record(name=bad), replace=True)
    assert (info.value.code, info.value.param) == ("bad_name", "name")
    with pytest.raises(AdapterRejectedError):
        registry.delete("acme", bad)
    assert registry.get("acme", bad) is None
    assert tree(tmp_path) == before


@pytest.mark.parametrize("bad", [*ESCAPES, "dots.not.allowed", "under_score"])
def test_tenants_cannot_escape_the_registry_dir(
    registry: LocalAdapterRegistry, tmp_path: Path, bad: str
) -> None:
    before = tree(tmp_path)
    with pytest.raises(AdapterRejectedError) as info:
        registry.put(record(tenant=bad), replace=True)
    assert (info.value.code, info.value.param) == ("bad_name", "tenant")
    for call in (lambda: registry.list(bad), lambda: registry.delete(bad, "support-bot")):
        with pytest.raises(AdapterRejectedError):
            call()
    assert registry.get(bad, "support-bot") is None
    assert tree(tmp_path) == before


def test_malformed_digest_is_refused(registry: LocalAdapterRegistry) -> None:
    bad = AdapterRecord(**{**record().__dict__, "digest": "../" + digest("v1")[3:]})
    with pytest.raises(AdapterRejectedError):
        registry.put(bad, replace=False)


def test_per_tenant_cap_is_enforced(tmp_path: Path) -> None:
    registry = LocalAdapterRegistry(tmp_path, max_adapters_per_tenant=2)
    registry.put(record(name="a"), replace=False)
    registry.put(record(name="b"), replace=False)
    with pytest.raises(AdapterRejectedError) as info:
        registry.put(record(name="c"), replace=False)
    assert info.value.code == "too_many_adapters"
    assert registry.put(record(name="b", version="v2"), replace=True)[0] is PutResult.REPLACED
    assert registry.put(record(name="c", tenant="globex"), replace=False)[0] is PutResult.CREATED
    registry.delete("acme", "a")
    assert registry.put(record(name="c"), replace=False)[0] is PutResult.CREATED


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"tenant": "acme"}', b"\xff\xfe", b""],
)
def test_corrupt_records_are_skipped_not_fatal(
    registry: LocalAdapterRegistry, tmp_path: Path, content: bytes
) -> None:
    registry.put(record(name="good"), replace=False)
    (tmp_path / "registry" / "acme" / "broken.json").write_bytes(content)
    assert [r.name for r in registry.list("acme")] == ["good"]
    assert registry.get("acme", "broken") is None
    assert registry.referenced_digests() == {digest("v1")}
    # An upload repairs the name.
    assert registry.put(record(name="broken"), replace=False)[0] is PutResult.CREATED


def test_record_that_does_not_match_its_path_is_skipped(
    registry: LocalAdapterRegistry, tmp_path: Path
) -> None:
    registry.put(record(name="good", tenant="globex"), replace=False)
    tenant_dir = tmp_path / "registry" / "acme"
    tenant_dir.mkdir()
    (tmp_path / "registry" / "globex" / "good.json").rename(tenant_dir / "stolen.json")
    assert registry.get("acme", "stolen") is None and registry.list("acme") == []


def test_generation_changes_on_every_change_only(registry: LocalAdapterRegistry) -> None:
    seen = [registry.generation()]
    registry.put(record(), replace=False)
    seen.append(registry.generation())
    registry.put(record(), replace=False)  # unchanged: nothing to notice
    assert registry.generation() == seen[-1]
    registry.put(record(version="v2"), replace=True)
    seen.append(registry.generation())
    registry.delete("acme", "support-bot")
    seen.append(registry.generation())
    assert seen == sorted(set(seen)) and len(seen) == 4


def test_another_instance_sees_changes_through_generation(tmp_path: Path) -> None:
    writer, reader = LocalAdapterRegistry(tmp_path), LocalAdapterRegistry(tmp_path)
    before = reader.generation()
    writer.put(record(), replace=False)
    assert reader.generation() != before
    assert reader.get("acme", "support-bot") == record()


def test_referenced_digests_span_all_tenants(registry: LocalAdapterRegistry) -> None:
    registry.put(record(name="a", version="v1"), replace=False)
    registry.put(record(name="b", version="v1"), replace=False)
    registry.put(record(name="a", version="v2", tenant="globex"), replace=False)
    assert registry.referenced_digests() == {digest("v1"), digest("v2")}
    registry.delete("globex", "a")
    assert registry.referenced_digests() == {digest("v1")}


@pytest.mark.parametrize("fail", ["rename", "fsync"])
def test_crash_mid_put_leaves_the_registry_unchanged(
    registry: LocalAdapterRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    registry.put(record(version="v1"), replace=False)
    generation, files = registry.generation(), tree(tmp_path)

    def crash(*_: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, fail, crash)
    with pytest.raises(AdapterStoreError, match="Input/output error"):
        registry.put(record(version="v2"), replace=True)
    monkeypatch.undo()
    assert registry.get("acme", "support-bot") == record(version="v1")
    assert registry.generation() == generation and tree(tmp_path) == files


def test_partial_record_of_a_dead_writer_is_swept_by_the_next_write(
    registry: LocalAdapterRegistry, tmp_path: Path
) -> None:
    registry.put(record(), replace=False)
    partial = tmp_path / "registry" / "acme" / ".support-bot.json.abc123.tmp"
    partial.write_bytes(b'{"tenant": "ac')
    assert [r.name for r in registry.list("acme")] == ["support-bot"]
    registry.put(record(name="other"), replace=False)
    assert not partial.exists()


def test_concurrent_puts_of_one_name_from_threads_serialize(
    registry: LocalAdapterRegistry,
) -> None:
    def put(i: int) -> str:
        try:
            return registry.put(record(version=f"v{i}"), replace=False)[0].value
        except AdapterConflictError:
            return "conflict"

    with ThreadPoolExecutor(16) as pool:
        results = sorted(pool.map(put, range(16)))
    assert results == ["conflict"] * 15 + ["created"]
    assert registry.generation() == 1


def _put_in_child(root: str, version: str, out: Queue[str]) -> None:
    registry = LocalAdapterRegistry(Path(root))
    out.put("ready")
    try:
        out.put(registry.put(record(version=version), replace=False)[0].value)
    except AdapterConflictError:
        out.put("conflict")


def test_concurrent_puts_of_one_name_from_two_processes_serialize(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out: Queue[str] = ctx.Queue()
    tenant_dir = tmp_path / "registry" / "acme"
    tenant_dir.mkdir(parents=True)
    # Hold the tenant lock as a third "replica" would, so both children must queue behind it.
    fd = os.open(tenant_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    children = [
        ctx.Process(target=_put_in_child, args=(str(tmp_path), v, out)) for v in ("v1", "v2")
    ]
    try:
        for child in children:
            child.start()
        assert [out.get(timeout=30), out.get(timeout=30)] == ["ready", "ready"]
        time.sleep(0.2)
        with pytest.raises(queue.Empty):
            out.get_nowait()  # both still blocked on the lock
    finally:
        os.close(fd)
    results = sorted(out.get(timeout=30) for _ in children)
    for child in children:
        child.join(timeout=30)
    assert results == ["conflict", "created"]
    assert LocalAdapterRegistry(tmp_path).generation() == 1


# --- merged copies (promotion) ------------------------------------------------------------------


def check_merged_copies(registry: AdapterRegistry) -> None:
    """What every registry does with merged copies (the S3 registry's tests call it too)."""
    first = record("a", "v1")
    registry.put(first, replace=False)
    copy = MergedCopy("c" * 64, "base@1", "none")
    updated = registry.set_merged("acme", "a", first.digest, (copy,))
    assert updated.merged == (copy,)
    assert registry.get("acme", "a") == updated
    assert registry.referenced_merged_keys() == {copy.key}  # what the merged sweep keeps
    # Re-uploading the same content keeps them; a new version starts without.
    assert registry.put(record("a", "v1"), replace=False)[1].merged == (copy,)
    registry.put(record("a", "v2"), replace=True)
    current = registry.get("acme", "a")
    assert current is not None and current.merged == ()
    # Copies built from the old version are never attached to the new one.
    with pytest.raises(AdapterConflictError) as caught:
        registry.set_merged("acme", "a", first.digest, (copy,))
    assert caught.value.code == "adapter_changed"
    with pytest.raises(AdapterNotFoundError):
        registry.set_merged("acme", "nope", first.digest, (copy,))
    registry.set_merged("acme", "a", current.digest, (copy,))
    assert registry.set_merged("acme", "a", current.digest, ()).merged == ()  # demoted
    assert registry.referenced_merged_keys() == set()


def test_merged_copies_are_recorded_on_the_version_they_were_built_from(
    registry: LocalAdapterRegistry,
) -> None:
    check_merged_copies(registry)
