"""Merged models (base weights with one adapter version folded in), beside the adapter blobs.

An operator "promotes" an adapter version: `server.merging.build` writes a whole model dir with a
manifest, `loragate-merged.json`, naming every file's sha256, and this module stores that dir by
its key (`merge_key` of the adapter digest, the base revision and the storage scheme). A merged
model is either complete or absent: locally one rename publishes it, in S3 the manifest does,
uploaded last and removed first. The manifest is also what every reader checks the files against,
and its fields must hash to the key they are stored under, so a dir copied to another key (or
bytes edited in the bucket) is refused rather than served.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapters.errors import AdapterNotFoundError, AdapterStoreError
from adapters.s3_store import S3_ERRORS, head, join_key, s3_client, s3_error, store_errors
from adapters.store import DIGEST, TMP_GRACE_S, fsync_dir
from adapters.store_url import FileLocation, StoreLocation

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef

logger = logging.getLogger(__name__)

MERGED_MANIFEST = "loragate-merged.json"
MANIFEST_VERSION = 1
# A merged model is a config, a few tokenizer files and its weights (sharded past some size):
# far fewer than this. A manifest listing more came from somewhere it should not have.
MAX_FILES = 64
MAX_MANIFEST_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 64 << 30
# What a file in a merged dir may be called: one plain path segment, never hidden or a parent.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STAGE_PREFIX = ".publish-"
_FETCH_PREFIX = ".fetch-"
_DROP_PREFIX = ".drop-"
_CHUNK = 1 << 20


class MergedArtifacts(Protocol):
    """Merged model dirs by key. Every method raises ValueError for a key that is not 64
    lowercase hex, before it touches a path or an object key."""

    def exists(self, key: str) -> bool: ...

    def publish(self, key: str, src_dir: Path) -> None:
        """Store the merged dir `src_dir` (its manifest's fields must hash to `key`); a no-op
        if `key` is already stored. Leaves `src_dir`."""
        ...

    def local_dir(self, key: str) -> Path:
        """A local dir with the files (vLLM's `--model`); AdapterNotFoundError if absent."""
        ...

    def delete(self, key: str) -> None:
        """Remove a merged model; no error if it is absent."""
        ...

    def keys(self, older_than_s: float = 0.0) -> set[str]:
        """The keys stored, only those published at least `older_than_s` ago if given: a
        sweep spares a copy a promotion has just published and not recorded yet."""
        ...


def merge_key(adapter_digest: str, base_revision: str, scheme: str) -> str:
    """The key a merged model is stored under: sha256 over the three, each labelled and
    NUL-separated, so no two different triples (say "a" + "bc" and "ab" + "c") share one."""
    h = hashlib.sha256()
    for label, value in (
        ("adapter_digest", adapter_digest),
        ("base_revision", base_revision),
        ("scheme", scheme),
    ):
        h.update(f"{label}={value}".encode() + b"\0")
    return h.hexdigest()


def checked_key(key: str) -> str:
    """The key itself, once it is known to be safe to put in a path or an object key."""
    if not isinstance(key, str) or DIGEST.fullmatch(key) is None:
        raise ValueError("a merged model key is 64 lowercase hex characters")
    return key


def parse_manifest(data: bytes, key: str | None = None) -> dict[str, Any]:
    """The manifest in `data`, once its shape is known to be safe to act on: at most MAX_FILES
    plain file names with their sha256, and fields hashing to `key` when one is given (the
    manifest may come from a bucket someone else can write to). AdapterStoreError otherwise."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise AdapterStoreError(f"the merged model manifest is over {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise AdapterStoreError("the merged model manifest is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise AdapterStoreError(f"the merged model manifest is not version {MANIFEST_VERSION}")
    fields = tuple(manifest.get(name) for name in ("adapter_digest", "base_revision", "scheme"))
    if not all(isinstance(field, str) for field in fields):
        raise AdapterStoreError("the merged model manifest lacks its adapter, base or scheme")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise AdapterStoreError("the merged model manifest lists no files")
    if len(files) > MAX_FILES:
        raise AdapterStoreError(f"the merged model manifest lists over {MAX_FILES} files")
    for name, sha in files.items():
        if not _safe_name(name) or not isinstance(sha, str) or _SHA256.fullmatch(sha) is None:
            raise AdapterStoreError("the merged model manifest lists a bad file name or hash")
    if key is not None and merge_key(*(str(field) for field in fields)) != key:
        raise AdapterStoreError(f"the merged model manifest is not that of {key[:12]}: refusing it")
    return manifest


def verify_dir(path: Path, key: str | None = None) -> dict[str, Any]:
    """The manifest of the merged dir `path`, once every file it lists hashes as listed and no
    other file is there (vLLM would read a stray one); AdapterStoreError otherwise."""
    try:
        manifest = parse_manifest((path / MERGED_MANIFEST).read_bytes(), key)
        files: dict[str, str] = manifest["files"]
        present = {entry.name for entry in os.scandir(path)}
        if present != {*files, MERGED_MANIFEST}:
            raise AdapterStoreError("the merged model dir does not hold exactly its listed files")
        for name, expected in files.items():
            file = path / name
            if file.is_symlink() or not file.is_file():
                raise AdapterStoreError(f"{name} in the merged model dir is not a regular file")
            with file.open("rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != expected:
                    raise AdapterStoreError(f"{name} of the merged model is not the file listed")
    except OSError as exc:
        raise AdapterStoreError(
            f"cannot read the merged model dir: {exc.strerror or type(exc).__name__}"
        ) from exc
    return manifest


def _safe_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and _FILE_NAME.fullmatch(name) is not None
        and ".." not in name
        and name != MERGED_MANIFEST
    )


def _seal(staging: Path, names: list[str]) -> None:
    """Read-only and durable before the rename that names the dir, so a reader never finds
    torn files after a crash."""
    for name in names:
        os.chmod(staging / name, 0o444)
        with (staging / name).open("rb") as f:
            os.fsync(f.fileno())
    os.chmod(staging, 0o755)
    fsync_dir(staging)


def _rename_unless_present(staging: Path, target: Path) -> None:
    """Publish `staging` as `target`, unless a concurrent writer did first (same key, same
    files: the manifest's fields hash to the key and its hashes cover every file)."""
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    fsync_dir(target.parent)


def _drop(root: Path, name: str) -> None:
    """Unpublish `root/name` with one rename, then remove it: no reader sees half of it."""
    doomed = root / f"{_DROP_PREFIX}{name[:12]}-{uuid.uuid4().hex}"
    try:
        os.rename(root / name, doomed)
    except FileNotFoundError:
        return
    fsync_dir(root)
    # Failing here leaves only a dot-dir, which the next sweep removes.
    shutil.rmtree(doomed, ignore_errors=True)


def _sweep(root: Path) -> None:
    """Remove what crashed writers left: drops at once, staging dirs once nobody writes them."""
    cutoff = time.time() - TMP_GRACE_S
    try:
        for entry in os.scandir(root):
            staged = entry.name.startswith((_STAGE_PREFIX, _FETCH_PREFIX))
            with contextlib.suppress(FileNotFoundError):
                if entry.name.startswith(_DROP_PREFIX) or (
                    staged and entry.stat().st_mtime < cutoff
                ):
                    shutil.rmtree(entry.path, ignore_errors=True)
    except OSError as exc:  # best effort: leftovers must not stop the gateway
        logger.warning("could not sweep the merged model dir: %s", exc)


class LocalMergedArtifacts:
    """`MergedArtifacts` on a directory: `root/merged/<key>/`, staged beside it in a dot-dir of
    `root/merged` (same filesystem) and published with one `os.rename`."""

    def __init__(self, root: Path) -> None:
        self._root = root / "merged"
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AdapterStoreError(
                f"cannot create the merged model store: {exc.strerror}"
            ) from exc
        _sweep(self._root)

    def exists(self, key: str) -> bool:
        return (self._root / checked_key(key)).is_dir()

    def publish(self, key: str, src_dir: Path) -> None:
        target = self._root / checked_key(key)
        if target.is_dir():
            return
        staging: Path | None = None
        try:
            manifest = parse_manifest((src_dir / MERGED_MANIFEST).read_bytes(), key)
            staging = Path(tempfile.mkdtemp(prefix=f"{_STAGE_PREFIX}{key[:12]}-", dir=self._root))
            names = [*manifest["files"], MERGED_MANIFEST]
            for name in names:
                # copyfile uses sendfile on Linux: no Python-side buffer for GBs of weights.
                shutil.copyfile(src_dir / name, staging / name)
            # The copy is what will be served: it is what must hash as its manifest says.
            verify_dir(staging, key)
            _seal(staging, names)
            _rename_unless_present(staging, target)
        except OSError as exc:
            raise AdapterStoreError(
                f"could not store merged model {key[:12]}: {exc.strerror or type(exc).__name__}"
            ) from exc
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def local_dir(self, key: str) -> Path:
        path = self._root / checked_key(key)
        if not path.is_dir():
            raise AdapterNotFoundError(f"merged model {key[:12]} is not in the store")
        return path

    def delete(self, key: str) -> None:
        try:
            _drop(self._root, checked_key(key))
        except OSError as exc:
            raise AdapterStoreError(
                f"could not delete merged model {key[:12]}: {exc.strerror or exc}"
            ) from exc

    def keys(self, older_than_s: float = 0.0) -> set[str]:
        cutoff = time.time() - older_than_s
        found: set[str] = set()
        try:
            for entry in os.scandir(self._root):
                if DIGEST.fullmatch(entry.name) is None:
                    continue
                # The manifest was copied into the staging dir just before the rename that
                # published it: its mtime is the publication's.
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    if os.stat(Path(entry.path) / MERGED_MANIFEST).st_mtime <= cutoff:
                        found.add(entry.name)
        except OSError as exc:
            raise AdapterStoreError(f"cannot list the merged model store: {exc.strerror}") from exc
        return found


class S3MergedArtifacts:
    """`MergedArtifacts` in a bucket: `<prefix>/merged/<key>/<file>`, the manifest written last
    and removed first, so a key exists exactly when its manifest does. A publish that dies
    leaves files without a manifest: invisible, overwritten by the next publish of the key and
    removed by a delete of it.

    `local_dir` downloads into `cache_dir/merged/<key>/`, every file checked against a manifest
    whose fields hash to the key, and at most `max_bytes` in all. The cache keeps what it
    fetched until `delete`: merged models are few and each engine serves one.
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str,
        cache_dir: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix
        self._cache = cache_dir / "merged"
        self._max_bytes = max_bytes
        try:
            self._cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AdapterStoreError(
                f"cannot create the merged model cache: {exc.strerror}"
            ) from exc
        _sweep(self._cache)

    def exists(self, key: str) -> bool:
        checked_key(key)
        try:
            return head(self._client, self._bucket, self._key(key, MERGED_MANIFEST)) is not None
        except S3_ERRORS as exc:
            raise s3_error(f"look up merged model {key[:12]}", exc) from exc

    def publish(self, key: str, src_dir: Path) -> None:
        if self.exists(key):
            return
        with store_errors(f"store merged model {key[:12]}"):
            manifest = verify_dir(src_dir, key)
            for name in manifest["files"]:
                self._client.upload_file(str(src_dir / name), self._bucket, self._key(key, name))
            # Last: the merged model exists from here on.
            self._client.upload_file(
                str(src_dir / MERGED_MANIFEST), self._bucket, self._key(key, MERGED_MANIFEST)
            )

    def local_dir(self, key: str) -> Path:
        target = self._cache / checked_key(key)
        # A hit skips S3: the dir was checked against its manifest before it was published.
        if target.is_dir():
            return target
        with store_errors(f"fetch merged model {key[:12]}"):
            self._fetch(key, target)
        return target

    def delete(self, key: str) -> None:
        checked_key(key)
        try:
            # The manifest first: from then on the model is absent, however far the rest gets.
            self._client.delete_object(Bucket=self._bucket, Key=self._key(key, MERGED_MANIFEST))
            for name in self._listed(join_key(self._prefix, "merged", key) + "/"):
                self._client.delete_object(Bucket=self._bucket, Key=name)
        except S3_ERRORS as exc:
            raise s3_error(f"delete merged model {key[:12]}", exc) from exc
        try:
            _drop(self._cache, key)
        except OSError as exc:
            logger.warning("could not drop %s from the merged model cache: %s", key[:12], exc)

    def keys(self, older_than_s: float = 0.0) -> set[str]:
        base = join_key(self._prefix, "merged") + "/"
        cutoff = time.time() - older_than_s
        found: set[str] = set()
        try:
            for name, modified in self._listed_with_times(base):
                key, _, leaf = name.removeprefix(base).partition("/")
                # The manifest is uploaded last: its time is the publication's.
                manifest = leaf == MERGED_MANIFEST and DIGEST.fullmatch(key) is not None
                if manifest and modified <= cutoff:
                    found.add(key)
        except S3_ERRORS as exc:
            raise s3_error("list the merged model store", exc) from exc
        return found

    def _key(self, key: str, name: str) -> str:
        return join_key(self._prefix, "merged", key, name)

    def _listed(self, prefix: str) -> list[str]:
        return [name for name, _ in self._listed_with_times(prefix)]

    def _listed_with_times(self, prefix: str) -> list[tuple[str, float]]:
        """Every object under `prefix`: its key, and when it was written (Unix time)."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=prefix
        )
        return [
            (obj["Key"], obj["LastModified"].timestamp())
            for page in pages
            for obj in page.get("Contents", [])
        ]

    def _fetch(self, key: str, target: Path) -> None:
        """Download the model into `target`, published by one rename once every file is checked."""
        manifest_key = self._key(key, MERGED_MANIFEST)
        meta = head(self._client, self._bucket, manifest_key)
        if meta is None:
            raise AdapterNotFoundError(f"merged model {key[:12]} is not in the store")
        if meta["ContentLength"] > MAX_MANIFEST_BYTES:
            raise AdapterStoreError(f"the manifest of merged model {key[:12]} is too large")
        response = self._client.get_object(
            Bucket=self._bucket, Key=manifest_key, IfMatch=meta["ETag"]
        )
        raw = response["Body"].read(MAX_MANIFEST_BYTES + 1)
        response["Body"].close()
        files: dict[str, str] = parse_manifest(raw, key)["files"]
        heads = {name: head(self._client, self._bucket, self._key(key, name)) for name in files}
        present = {name: h for name, h in heads.items() if h is not None}
        if len(present) != len(files):
            raise AdapterNotFoundError(f"merged model {key[:12]} is incomplete in the store")
        size = sum(h["ContentLength"] for h in present.values())
        if size > self._max_bytes:
            raise AdapterStoreError(
                f"merged model {key[:12]} is {size} bytes in the store, "
                f"over the {self._max_bytes}-byte limit"
            )
        staging = Path(tempfile.mkdtemp(prefix=f"{_FETCH_PREFIX}{key[:12]}-", dir=self._cache))
        try:
            for name, h in present.items():
                sha = self._download(self._key(key, name), staging / name, h)
                if sha != files[name]:
                    raise AdapterStoreError(
                        f"{name} fetched for merged model {key[:12]} is not the file its "
                        "manifest lists: refusing it"
                    )
            (staging / MERGED_MANIFEST).write_bytes(raw)
            _seal(staging, [*files, MERGED_MANIFEST])
            _rename_unless_present(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self, key: str, path: Path, meta: HeadObjectOutputTypeDef) -> str:
        """Write the object to `path`, the sha256 of what was written: hashed on the way, so
        multi-GB weights are read once. IfMatch: the object read is the one sized above."""
        response = self._client.get_object(Bucket=self._bucket, Key=key, IfMatch=meta["ETag"])
        limit, written = meta["ContentLength"], 0
        body = response["Body"]
        h = hashlib.sha256()
        try:
            with path.open("xb") as f:
                for chunk in body.iter_chunks(_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        raise AdapterStoreError(f"{key} grew past its {limit} bytes while read")
                    h.update(chunk)
                    f.write(chunk)
        finally:
            body.close()
        return h.hexdigest()


def open_merged_artifacts(location: StoreLocation, *, cache_dir: Path) -> MergedArtifacts:
    """The merged models beside the adapter store at `location`: in its directory, or under its
    bucket and prefix (the client configured from the environment, as the store's is)."""
    if isinstance(location, FileLocation):
        return LocalMergedArtifacts(location.root)
    return S3MergedArtifacts(s3_client(), location.bucket, location.prefix, cache_dir)
