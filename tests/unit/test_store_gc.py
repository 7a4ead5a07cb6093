"""What the store tells its collector: whether a put published the blob, and how long ago each
blob was last put (a put of a stored digest restarts that clock)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from adapters.store import LocalAdapterStore
from adapters.types import WEIGHTS_FILE

DIGEST = hashlib.sha256(b"adapter one").hexdigest()
OTHER = hashlib.sha256(b"adapter two").hexdigest()
CONFIG = b'{"r": 8}'


def weights(tmp_path: Path) -> Path:
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(b"weights")
    return path


def age(store: LocalAdapterStore, digest: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(store.local_dir(digest), (then, then))


def test_put_says_whether_it_published_the_blob(tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path / "store")
    assert store.put(DIGEST, CONFIG, weights(tmp_path)) is True
    assert store.put(DIGEST, CONFIG, weights(tmp_path)) is False
    store.delete(DIGEST)
    assert store.put(DIGEST, CONFIG, weights(tmp_path)) is True


def test_digests_older_than_leaves_out_recent_puts(tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path / "store")
    store.put(DIGEST, CONFIG, weights(tmp_path))
    store.put(OTHER, CONFIG, weights(tmp_path))
    age(store, DIGEST, 120)
    assert store.digests() == {DIGEST, OTHER}
    assert store.digests(older_than_s=60) == {DIGEST}


def test_putting_a_stored_digest_again_makes_it_recent(tmp_path: Path) -> None:
    store = LocalAdapterStore(tmp_path / "store")
    store.put(DIGEST, CONFIG, weights(tmp_path))
    age(store, DIGEST, 120)
    store.put(DIGEST, CONFIG, weights(tmp_path))
    assert store.digests(older_than_s=60) == set()
