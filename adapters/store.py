"""Content-addressed adapter files: the `AdapterStore` seam and its local-directory implementation.

A blob is the two files of one adapter version, addressed by its digest; it is either complete or
absent, never partial, so anything that finds it can hand its directory to the engine.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Protocol

from adapters.errors import AdapterNotFoundError, AdapterRejectedError, AdapterStoreError
from adapters.types import CONFIG_FILE, WEIGHTS_FILE

logger = logging.getLogger(__name__)

DIGEST = re.compile(r"[0-9a-f]{64}")
# A staging dir untouched for this long belongs to a writer that died: live puts keep writing
# into theirs, and replicas sharing the volume must not sweep each other's work in progress.
TMP_GRACE_S = 3600.0
# An unreferenced blob younger than this is left alone by `AdapterAdminService.sweep`: another
# replica sharing the store may be between its `put` and its registry record. A put of a digest
# already present restarts the clock (see `put`), so this bounds that step, not the blob's life.
ORPHAN_GRACE_S = 600.0
_PUT_PREFIX = "put-"
_DEL_PREFIX = "del-"
_PUBLISH_ATTEMPTS = 5


class AdapterStore(Protocol):
    """Adapter files by digest. Implementations must be safe to call from several threads.

    Kept narrow on purpose: an S3-compatible store shared by several gateway replicas implements
    the same five methods, with `local_dir` becoming a local cache directory filled on demand.
    Every method raises AdapterRejectedError (code `bad_digest`) for a malformed digest.
    """

    # True when other processes (replicas, engines) share this store: what is deleted here is
    # gone for them too.
    shared: bool

    def put(self, digest: str, config_bytes: bytes, weights_path: Path) -> bool:
        """Store one adapter version, True if this call published it; the same digest again
        only marks the blob as just put (see `digests`), False. Leaves weights_path."""
        ...

    def local_dir(self, digest: str) -> Path:
        """A local dir with both files (vLLM's `lora_path`); AdapterNotFoundError if absent."""
        ...

    def exists(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None:
        """Remove a version; no error if it is absent."""
        ...

    def digests(self, older_than_s: float = 0.0) -> set[str]:
        """The stored digests, only those last put more than `older_than_s` seconds ago."""
        ...


def checked_digest(digest: str) -> str:
    """The digest itself, once it is known to be safe to put in a path (64 lowercase hex)."""
    if not isinstance(digest, str) or DIGEST.fullmatch(digest) is None:
        raise AdapterRejectedError(
            "an adapter digest is 64 lowercase hex characters", code="bad_digest", param="digest"
        )
    return digest


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _newest_mtime(path: Path) -> float:
    """When a staging dir was last written: the dir itself or any file in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            newest = max(newest, child.lstat().st_mtime)
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class LocalAdapterStore:
    """An `AdapterStore` on a directory: `root/blobs/<digest>/`, staged in `root/tmp/`.

    Writers stage a whole blob in a fresh dir under `root/tmp` (same filesystem) and publish it
    with one `os.rename`, so `blobs/` only ever holds complete blobs and no lock is needed: two
    puts of one digest race to the rename, the loser drops its copy (same digest, same bytes).
    """

    shared = False  # replicas share it only by mounting one volume

    def __init__(self, root: Path) -> None:
        self._blobs = root / "blobs"
        self._tmp = root / "tmp"
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AdapterStoreError(f"cannot create the adapter store: {exc.strerror}") from exc
        self.sweep_tmp()

    def sweep_tmp(self, older_than_s: float = TMP_GRACE_S) -> int:
        """Remove what crashed writers left in `tmp/`; returns how many entries went."""
        removed = 0
        cutoff = time.time() - older_than_s
        try:
            entries = list(self._tmp.iterdir())
        except OSError as exc:
            raise AdapterStoreError(f"cannot list the store's staging dir: {exc.strerror}") from exc
        for entry in entries:
            try:
                # A "del-" dir is already unpublished: whoever removes it, the result is the same.
                if entry.name.startswith(_DEL_PREFIX) or _newest_mtime(entry) < cutoff:
                    _remove(entry)
                    removed += 1
            except FileNotFoundError:
                continue  # its own writer finished or removed it meanwhile
            except OSError as exc:  # best effort: garbage in tmp/ must not stop the gateway
                logger.warning("could not sweep %s from the adapter store: %s", entry.name, exc)
        if removed:
            logger.info("swept %d leftover staging entries from the adapter store", removed)
        return removed

    def put(self, digest: str, config_bytes: bytes, weights_path: Path) -> bool:
        target = self._blobs / checked_digest(digest)
        staging: Path | None = None
        try:
            # The blob's mtime is its "last put" time: another replica's sweep spares it for
            # ORPHAN_GRACE_S, long enough for our caller to write its record.
            with contextlib.suppress(FileNotFoundError):  # absent (or just collected): store it
                os.utime(target)
                return False
            staging = Path(tempfile.mkdtemp(prefix=f"{_PUT_PREFIX}{digest[:12]}-", dir=self._tmp))
            self._stage(staging, config_bytes, weights_path)
            return self._publish(staging, target)
        except OSError as exc:
            raise AdapterStoreError(
                f"could not store adapter {digest[:12]}: {exc.strerror or exc}"
            ) from exc
        finally:
            if staging is not None and staging.exists():
                _remove(staging)

    def _stage(self, staging: Path, config_bytes: bytes, weights_path: Path) -> None:
        config = staging / CONFIG_FILE
        config.write_bytes(config_bytes)
        # copyfile uses sendfile on Linux: no Python-side buffer for hundreds of MB.
        weights = shutil.copyfile(weights_path, staging / WEIGHTS_FILE)
        for path in (config, weights):
            os.chmod(path, 0o444)
            _fsync_file(path)
        os.chmod(staging, 0o755)
        fsync_dir(staging)

    def _publish(self, staging: Path, target: Path) -> bool:
        """True if `staging` became the blob, False if a concurrent put's copy already is."""
        # Copying hundreds of MB takes a while: the blob's age counts from its publication.
        os.utime(staging)
        for attempt in range(_PUBLISH_ATTEMPTS):
            try:
                os.rename(staging, target)
            except OSError as exc:
                # Renaming a dir onto a non-empty one fails: a concurrent put of this digest won,
                # and its bytes are ours. Unless a delete took it in between: then publish ours.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                with contextlib.suppress(FileNotFoundError):  # else a delete took it: retry
                    os.utime(target)
                    return False
                if attempt == _PUBLISH_ATTEMPTS - 1:
                    raise
                continue
            fsync_dir(self._blobs)
            return True
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def local_dir(self, digest: str) -> Path:
        path = self._blobs / checked_digest(digest)
        if not path.is_dir():
            raise AdapterNotFoundError(f"adapter version {digest[:12]} is not in the store")
        return path

    def exists(self, digest: str) -> bool:
        return (self._blobs / checked_digest(digest)).is_dir()

    def delete(self, digest: str) -> None:
        source = self._blobs / checked_digest(digest)
        # Unpublish with one rename first, so no reader ever sees a half-removed blob.
        doomed = self._tmp / f"{_DEL_PREFIX}{digest[:12]}-{uuid.uuid4().hex}"
        try:
            os.rename(source, doomed)
            fsync_dir(self._blobs)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AdapterStoreError(
                f"could not delete adapter {digest[:12]}: {exc.strerror or exc}"
            ) from exc
        # Failing here leaves only garbage in tmp/, which sweep_tmp removes.
        shutil.rmtree(doomed, ignore_errors=True)

    def digests(self, older_than_s: float = 0.0) -> set[str]:
        cutoff = time.time() - older_than_s
        found: set[str] = set()
        try:
            for entry in os.scandir(self._blobs):
                if DIGEST.fullmatch(entry.name) is None:
                    continue
                try:
                    if older_than_s <= 0 or entry.stat().st_mtime < cutoff:
                        found.add(entry.name)
                except FileNotFoundError:
                    continue  # deleted meanwhile
        except OSError as exc:
            raise AdapterStoreError(f"cannot list the adapter store: {exc.strerror}") from exc
        return found
