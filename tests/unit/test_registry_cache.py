"""The registry's record cache: a record is read and parsed once, and never served after its file
was replaced or deleted, by this registry object, another one on the same directory (another
replica) or another process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.record_cache import RecordCache, signature
from adapters.registry import LocalAdapterRegistry
from adapters.types import AdapterRecord
from tests.unit.test_adapter_registry import record

REPO = Path(__file__).resolve().parents[2]
JUNE = "2025-06-01T00:00:00Z"


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The name of every record parsed from a file, in order."""
    seen: list[str] = []
    real = AdapterRecord.from_json

    def counting(data: dict[str, Any]) -> AdapterRecord:
        seen.append(str(data["name"]))
        return real(data)

    monkeypatch.setattr(AdapterRecord, "from_json", counting)
    yield seen


@pytest.fixture
def replicas(tmp_path: Path) -> tuple[LocalAdapterRegistry, LocalAdapterRegistry]:
    """A reader and a writer on the same directory, as two gateway replicas would be."""
    return LocalAdapterRegistry(tmp_path), LocalAdapterRegistry(tmp_path)


def record_file(root: Path, tenant: str = "acme", name: str = "support-bot") -> Path:
    return root / "registry" / tenant / f"{name}.json"


def test_a_record_is_read_once_then_served_from_memory(
    replicas: tuple[LocalAdapterRegistry, LocalAdapterRegistry], parses: list[str]
) -> None:
    reader, writer = replicas
    writer.put(record(), replace=False)
    parses.clear()
    assert reader.peek("acme", "support-bot") is None  # never read: the caller must `get`
    assert reader.get("acme", "support-bot") == record()
    for _ in range(5):
        assert reader.peek("acme", "support-bot") == record()
        assert reader.get("acme", "support-bot") == record()
    assert reader.list("acme") == [record()]
    assert parses == ["support-bot"]


def test_list_fills_the_cache_that_get_and_peek_use(
    replicas: tuple[LocalAdapterRegistry, LocalAdapterRegistry], parses: list[str]
) -> None:
    reader, writer = replicas
    for name in ("a", "b"):
        writer.put(record(name=name), replace=False)
    parses.clear()
    assert [r.name for r in reader.list("acme")] == ["a", "b"]
    assert reader.peek("acme", "a") == record(name="a")
    assert [r.name for r in reader.list("acme")] == ["a", "b"]
    assert parses == ["a", "b"]


def test_a_record_deleted_by_another_replica_is_gone_at_once(
    replicas: tuple[LocalAdapterRegistry, LocalAdapterRegistry],
) -> None:
    reader, writer = replicas
    writer.put(record(), replace=False)
    assert reader.get("acme", "support-bot") == record()
    writer.delete("acme", "support-bot")
    assert reader.peek("acme", "support-bot") is None
    assert reader.get("acme", "support-bot") is None
    assert reader.list("acme") == []


def test_a_record_replaced_by_another_replica_is_new_at_once(
    replicas: tuple[LocalAdapterRegistry, LocalAdapterRegistry],
) -> None:
    reader, writer = replicas
    writer.put(record(version="v1"), replace=False)
    assert reader.get("acme", "support-bot") == record(version="v1")
    new = record(version="v2", created_at="2025-06-01T00:00:00Z")
    writer.put(new, replace=True)
    assert reader.peek("acme", "support-bot") is None
    assert reader.get("acme", "support-bot") == new
    assert reader.peek("acme", "support-bot") == new
    assert reader.list("acme") == [new]


def test_versions_written_within_one_clock_tick_never_look_alike(
    replicas: tuple[LocalAdapterRegistry, LocalAdapterRegistry],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The clock stands still, as it seems to when writes come within one tick of the kernel's
    # coarse clock; versions of equal size; a freed inode number may come back (ext4 does that).
    # So the writer stamps each version with the time, or 1 ns past the version it replaces.
    reader, writer = replicas
    now = 1_750_000_000_000_000_000
    monkeypatch.setattr(time, "time_ns", lambda: now)
    mtimes = []
    for version in ("v1", "v2", "v3", "v1", "v2"):
        writer.put(record(version=version), replace=True)
        mtimes.append(os.stat(record_file(tmp_path)).st_mtime_ns)
        assert reader.get("acme", "support-bot") == record(version=version)
    assert mtimes == [now + i for i in range(5)]


def test_a_version_written_while_the_reader_looked_away_is_not_mistaken_for_the_first(
    replicas: tuple[LocalAdapterRegistry, LocalAdapterRegistry],
) -> None:
    reader, writer = replicas
    writer.put(record(version="v1"), replace=False)
    assert reader.get("acme", "support-bot") == record(version="v1")
    writer.put(record(version="v2"), replace=True)  # the reader never sees this one
    writer.put(record(version="v3"), replace=True)  # same size as v1, maybe its inode
    assert reader.peek("acme", "support-bot") is None
    assert reader.get("acme", "support-bot") == record(version="v3")


def test_own_writes_are_seen_at_once(tmp_path: Path) -> None:
    registry = LocalAdapterRegistry(tmp_path)
    registry.put(record(version="v1"), replace=False)
    assert registry.get("acme", "support-bot") == record(version="v1")
    registry.put(record(version="v2"), replace=True)
    assert registry.peek("acme", "support-bot") in (None, record(version="v2"))
    assert registry.get("acme", "support-bot") == record(version="v2")
    registry.delete("acme", "support-bot")
    assert registry.peek("acme", "support-bot") is None
    assert registry.get("acme", "support-bot") is None


def test_a_file_edited_in_place_is_read_again(tmp_path: Path) -> None:
    registry = LocalAdapterRegistry(tmp_path)
    registry.put(record(), replace=False)
    assert registry.get("acme", "support-bot") == record()
    with record_file(tmp_path).open("r+b") as f:  # an operator's editor, not a registry writer
        f.write(b"{ broken")
    assert registry.peek("acme", "support-bot") is None
    assert registry.get("acme", "support-bot") is None  # corrupt: skipped, as without a cache


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from adapters.registry import LocalAdapterRegistry
    from tests.unit.test_adapter_registry import record

    registry = LocalAdapterRegistry(Path(sys.argv[1]))
    if sys.argv[2] == "delete":
        registry.delete("acme", "support-bot")
    else:
        registry.put(record(version=sys.argv[2], created_at=sys.argv[3]), replace=True)
    """
)


def write_from_another_process(root: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-c", WRITER, str(root), *args], cwd=REPO, check=True)


def test_another_process_replacing_then_deleting_is_seen_at_once(tmp_path: Path) -> None:
    reader = LocalAdapterRegistry(tmp_path)
    write_from_another_process(tmp_path, "v1", "2025-01-01T00:00:00Z")
    assert reader.get("acme", "support-bot") == record(version="v1")
    write_from_another_process(tmp_path, "v2", JUNE)
    assert reader.peek("acme", "support-bot") is None
    assert reader.get("acme", "support-bot") == record(version="v2", created_at=JUNE)
    write_from_another_process(tmp_path, "delete")
    assert reader.peek("acme", "support-bot") is None
    assert reader.get("acme", "support-bot") is None


def test_the_cache_keeps_the_most_recently_used_records_only(tmp_path: Path) -> None:
    registry = LocalAdapterRegistry(tmp_path, max_cached_records=2)
    for name in ("a", "b", "c"):
        registry.put(record(name=name), replace=False)
    registry.get("acme", "a")
    registry.get("acme", "b")
    registry.peek("acme", "a")  # a is now the most recently used
    registry.get("acme", "c")
    assert registry.peek("acme", "b") is None
    assert registry.peek("acme", "a") == record(name="a")
    assert registry.peek("acme", "c") == record(name="c")


@pytest.mark.parametrize(("tenant", "name"), [("Acme", "a"), ("acme", "../x"), ("", ""), ("a", "")])
def test_peek_of_an_invalid_name_is_none(tmp_path: Path, tenant: str, name: str) -> None:
    assert LocalAdapterRegistry(tmp_path).peek(tenant, name) is None


def test_a_stored_entry_is_dropped_when_its_file_becomes_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(b"{}")
    cache = RecordCache(4)
    cache.store(str(path), signature(os.stat(path)), record())
    assert cache.fresh(str(path)) == record()
    path.unlink()
    assert cache.fresh(str(path)) is None and len(cache) == 0
