"""The engine side's fetch of an adapter version: by digest, verified before vLLM sees it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from adapters.errors import AdapterStoreError
from adapters.store import LocalAdapterStore
from adapters.types import WEIGHTS_FILE, adapter_digest
from server.engine_servers.store_resolver import ENGINE_ADAPTER, StoreAdapterFetcher

CONFIG = b'{"r": 8}'
WEIGHTS = b"weights" * 100


def stored(tmp_path: Path) -> tuple[LocalAdapterStore, str]:
    store = LocalAdapterStore(tmp_path / "store")
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(WEIGHTS)
    digest = adapter_digest(hashlib.sha256(CONFIG).hexdigest(), hashlib.sha256(WEIGHTS).hexdigest())
    store.put(digest, CONFIG, weights)
    return store, digest


def test_a_stored_version_is_fetched_and_a_missing_one_is_none(tmp_path: Path) -> None:
    store, digest = stored(tmp_path)
    fetcher = StoreAdapterFetcher(lambda: store)
    assert fetcher.fetch(digest) == store.local_dir(digest)
    assert fetcher.fetch("0" * 64) is None


def test_files_that_do_not_hash_to_the_digest_are_refused(tmp_path: Path) -> None:
    store, digest = stored(tmp_path)
    fetcher = StoreAdapterFetcher(lambda: store)
    weights = store.local_dir(digest) / WEIGHTS_FILE
    os.chmod(weights, 0o644)
    weights.write_bytes(b"tampered" * 100)  # someone with write access to the store
    with pytest.raises(AdapterStoreError, match="refusing"):
        fetcher.fetch(digest)


def test_only_loragate_names_are_resolved() -> None:
    assert ENGINE_ADAPTER.fullmatch("lg-" + "a" * 64)
    for name in ("lg-" + "A" * 64, "lg-abc", "my-adapter", "lg-" + "a" * 64 + "/x"):
        assert ENGINE_ADAPTER.fullmatch(name) is None
