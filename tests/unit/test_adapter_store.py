from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import adapters.store
from adapters.errors import AdapterNotFoundError, AdapterRejectedError, AdapterStoreError
from adapters.store import TMP_GRACE_S, LocalAdapterStore
from adapters.types import CONFIG_FILE, WEIGHTS_FILE

DIGEST = hashlib.sha256(b"adapter one").hexdigest()
OTHER = hashlib.sha256(b"adapter two").hexdigest()
CONFIG = b'{"r": 8, "lora_alpha": 16}'
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + os.urandom(4096)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "upload" / WEIGHTS_FILE
    path.parent.mkdir()
    path.write_bytes(WEIGHTS)
    return path


@pytest.fixture
def store(tmp_path: Path) -> LocalAdapterStore:
    return LocalAdapterStore(tmp_path / "store")


def blobs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "store" / "blobs").iterdir())


def staging(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "store" / "tmp").iterdir())


def age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    for p in [path, *path.iterdir()] if path.is_dir() else [path]:
        os.utime(p, (old, old))


def test_put_makes_a_dir_vllm_can_load(store: LocalAdapterStore, weights: Path) -> None:
    store.put(DIGEST, CONFIG, weights)
    local = store.local_dir(DIGEST)
    assert sorted(p.name for p in local.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert (local / CONFIG_FILE).read_bytes() == CONFIG
    assert (local / WEIGHTS_FILE).read_bytes() == WEIGHTS
    assert store.exists(DIGEST) and store.digests() == {DIGEST}


def test_caller_keeps_its_weights_file(store: LocalAdapterStore, weights: Path) -> None:
    store.put(DIGEST, CONFIG, weights)
    assert weights.read_bytes() == WEIGHTS


def test_same_digest_twice_is_a_noop(
    store: LocalAdapterStore, weights: Path, tmp_path: Path
) -> None:
    store.put(DIGEST, CONFIG, weights)
    before = (store.local_dir(DIGEST) / CONFIG_FILE).stat().st_mtime_ns
    store.put(DIGEST, CONFIG, weights)
    assert (store.local_dir(DIGEST) / CONFIG_FILE).stat().st_mtime_ns == before
    assert blobs(tmp_path) == [DIGEST] and staging(tmp_path) == []


def test_store_files_are_read_only(store: LocalAdapterStore, weights: Path) -> None:
    store.put(DIGEST, CONFIG, weights)
    local = store.local_dir(DIGEST)
    assert stat.S_IMODE(local.stat().st_mode) == 0o755
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert stat.S_IMODE((local / name).stat().st_mode) == 0o444


def test_missing_digest_is_not_found(store: LocalAdapterStore) -> None:
    assert not store.exists(DIGEST)
    with pytest.raises(AdapterNotFoundError):
        store.local_dir(DIGEST)


def test_delete_removes_the_blob_and_missing_is_fine(
    store: LocalAdapterStore, weights: Path, tmp_path: Path
) -> None:
    store.put(DIGEST, CONFIG, weights)
    store.put(OTHER, CONFIG, weights)
    store.delete(DIGEST)
    store.delete(DIGEST)
    assert store.digests() == {OTHER} and not store.exists(DIGEST)
    assert staging(tmp_path) == []


@pytest.mark.parametrize(
    "digest",
    ["", "../" + DIGEST[3:], DIGEST.upper(), DIGEST[:63], DIGEST + "0", DIGEST + "\n", "/" * 64],
)
def test_malformed_digests_never_reach_a_path(
    store: LocalAdapterStore, weights: Path, tmp_path: Path, digest: str
) -> None:
    calls: list[Any] = [
        lambda: store.put(digest, CONFIG, weights),
        lambda: store.local_dir(digest),
        lambda: store.exists(digest),
        lambda: store.delete(digest),
    ]
    for call in calls:
        with pytest.raises(AdapterRejectedError) as info:
            call()
        assert info.value.code == "bad_digest"
    assert blobs(tmp_path) == [] and staging(tmp_path) == []


def test_crash_before_rename_leaves_no_blob(
    store: LocalAdapterStore, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*_: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(AdapterStoreError, match="Input/output error"):
        store.put(DIGEST, CONFIG, weights)
    assert blobs(tmp_path) == [] and staging(tmp_path) == []
    assert not store.exists(DIGEST)


def test_failed_fsync_leaves_no_blob(
    store: LocalAdapterStore, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(_: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(AdapterStoreError, match="No space left"):
        store.put(DIGEST, CONFIG, weights)
    assert blobs(tmp_path) == [] and staging(tmp_path) == []


def test_unreadable_weights_become_a_store_error(store: LocalAdapterStore, tmp_path: Path) -> None:
    with pytest.raises(AdapterStoreError):
        store.put(DIGEST, CONFIG, tmp_path / "nowhere.safetensors")
    assert blobs(tmp_path) == [] and staging(tmp_path) == []


def test_a_hard_crash_leaves_only_staging_which_a_restart_sweeps(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalAdapterStore(tmp_path / "store")

    def die(*_: object) -> None:
        raise SystemExit("killed")  # and, like a real crash, no clean-up runs

    monkeypatch.setattr(os, "rename", die)
    monkeypatch.setattr(adapters.store, "_remove", lambda _: None)
    with pytest.raises(SystemExit):
        store.put(DIGEST, CONFIG, weights)
    monkeypatch.undo()
    assert blobs(tmp_path) == [] and len(staging(tmp_path)) == 1

    age(tmp_path / "store" / "tmp" / staging(tmp_path)[0], TMP_GRACE_S + 60)
    restarted = LocalAdapterStore(tmp_path / "store")
    assert staging(tmp_path) == [] and not restarted.exists(DIGEST)


def test_leftover_tmp_is_swept(tmp_path: Path) -> None:
    tmp = tmp_path / "store" / "tmp"
    (tmp / "put-abc-old").mkdir(parents=True)
    (tmp / "put-abc-old" / WEIGHTS_FILE).write_bytes(b"partial")
    age(tmp / "put-abc-old", TMP_GRACE_S + 60)
    (tmp / "del-abc-123").mkdir()  # an unpublished blob whose removal was interrupted
    (tmp / "del-abc-123" / CONFIG_FILE).write_bytes(CONFIG)
    os.chmod(tmp / "del-abc-123" / CONFIG_FILE, 0o444)
    LocalAdapterStore(tmp_path / "store")
    assert staging(tmp_path) == []


def test_fresh_tmp_of_a_concurrent_put_is_not_swept(tmp_path: Path) -> None:
    # Another replica on the same volume may be staging a blob right now.
    in_progress = tmp_path / "store" / "tmp" / "put-abc-now"
    in_progress.mkdir(parents=True)
    (in_progress / WEIGHTS_FILE).write_bytes(b"being written")
    LocalAdapterStore(tmp_path / "store")
    assert staging(tmp_path) == ["put-abc-now"]


def test_put_that_loses_the_rename_race_drops_its_copy(
    store: LocalAdapterStore, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_rename = os.rename
    rival = LocalAdapterStore(tmp_path / "store")

    def rival_wins_first(src: str | Path, dst: str | Path) -> None:
        monkeypatch.setattr(os, "rename", real_rename)
        rival.put(DIGEST, CONFIG, weights)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rival_wins_first)
    store.put(DIGEST, CONFIG, weights)
    assert blobs(tmp_path) == [DIGEST] and staging(tmp_path) == []
    assert (store.local_dir(DIGEST) / WEIGHTS_FILE).read_bytes() == WEIGHTS


def test_put_whose_rival_blob_is_deleted_meanwhile_publishes_its_own(
    store: LocalAdapterStore, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_rename = os.rename

    def rival_came_and_went(*_: object) -> None:
        monkeypatch.setattr(os, "rename", real_rename)
        raise OSError(errno.ENOTEMPTY, "Directory not empty")

    monkeypatch.setattr(os, "rename", rival_came_and_went)
    store.put(DIGEST, CONFIG, weights)
    assert blobs(tmp_path) == [DIGEST] and staging(tmp_path) == []


def test_concurrent_puts_and_deletes_from_threads_keep_blobs_whole(
    store: LocalAdapterStore, weights: Path, tmp_path: Path
) -> None:
    def churn(i: int) -> None:
        for _ in range(10):
            store.put(DIGEST, CONFIG, weights)
            if i % 2:
                store.delete(DIGEST)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(churn, range(8)))
    store.put(DIGEST, CONFIG, weights)
    local = store.local_dir(DIGEST)
    assert (local / WEIGHTS_FILE).read_bytes() == WEIGHTS
    assert (local / CONFIG_FILE).read_bytes() == CONFIG
    assert blobs(tmp_path) == [DIGEST] and staging(tmp_path) == []
