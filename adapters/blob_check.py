"""Checking that a blob dir holds the adapter version its digest names.

Apart from the S3 store on purpose: whoever hands a fetched dir to the engine checks it with this,
whatever the store, and need not import boto3 to do so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from adapters.errors import AdapterStoreError
from adapters.types import CONFIG_FILE, WEIGHTS_FILE, adapter_digest


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_blob_dir(path: Path, digest: str) -> None:
    """Raise AdapterStoreError unless the two files in `path` hash to `digest`: the files came
    from storage someone else can write to, and the digest is what the registry vouched for."""
    try:
        actual = adapter_digest(file_sha256(path / CONFIG_FILE), file_sha256(path / WEIGHTS_FILE))
    except OSError as exc:
        raise AdapterStoreError(
            f"cannot read adapter files of {digest[:12]}: {exc.strerror or exc}"
        ) from exc
    if actual != digest:
        raise AdapterStoreError(
            f"adapter files fetched for {digest[:12]} hash to {actual[:12]}: refusing them"
        )
