"""An `AdapterStore` in an S3-compatible bucket, shared by every gateway replica that names it,
and the S3 plumbing the registry shares with it (client, keys, error translation).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters.blob_check import verify_blob_dir
from adapters.errors import AdapterNotFoundError, AdapterStoreError
from adapters.store import DIGEST, TMP_GRACE_S, checked_digest
from adapters.types import CONFIG_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# Per socket read, not per transfer: a multi-GB download may take longer, a stalled one may not.
READ_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 4  # the first try included; botocore's "standard" mode backs off between them
DEFAULT_CACHE_BYTES = 10 << 30
MARKER = "complete"
FILES = (CONFIG_FILE, WEIGHTS_FILE)
S3_ERRORS = (BotoCoreError, ClientError, Boto3Error)
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_FETCH_PREFIX = ".fetch-"
_EVICT_PREFIX = ".evict-"
_CHUNK = 1 << 20


def s3_client(session: boto3.session.Session | None = None) -> S3Client:
    """An S3 client configured the way every AWS tool is: endpoint, credentials and region come
    from boto3's own environment and config-file handling (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ...). Only timeouts and retries are fixed here,
    so a stalled endpoint fails a request instead of hanging it. Thread safe once made.

    Made from `session` if given (its clients share one loaded service model, so each costs
    milliseconds, not tens), else from a session of its own."""
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=32,
    )
    # Never boto3's default session: it is not safe to share between threads.
    return (session or boto3.session.Session()).client("s3", config=config)


def join_key(prefix: str, *parts: str) -> str:
    return "/".join((prefix, *parts) if prefix else parts)


def error_code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_missing(exc: Exception) -> bool:
    return error_code(exc) in _MISSING_CODES


@contextlib.contextmanager
def store_errors(action: str) -> Iterator[None]:
    """S3 and local file errors met while doing `action` (e.g. "fetch adapter 1a2b"), as the
    AdapterStoreError that names it."""
    try:
        yield
    except S3_ERRORS as exc:
        raise s3_error(action, exc) from exc
    except OSError as exc:
        raise AdapterStoreError(
            f"could not {action}: {exc.strerror or type(exc).__name__}"
        ) from exc


def s3_error(action: str, exc: Exception) -> AdapterStoreError:
    """The failure named by its S3 error code or botocore class only: free text from either can
    echo request details, and this message reaches logs and API clients."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        detail = f"{error_code(exc) or 'error'} (HTTP {status})"
    else:
        detail = type(exc).__name__
    return AdapterStoreError(f"S3 could not {action}: {detail}")


def head(client: S3Client, bucket: str, key: str) -> HeadObjectOutputTypeDef | None:
    """The object's metadata, None if there is no such object."""
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise


def check_bucket(client: S3Client, bucket: str) -> None:
    """Fail at start-up, not on the first upload, if the bucket cannot be reached."""
    try:
        client.head_bucket(Bucket=bucket)
    except S3_ERRORS as exc:
        raise s3_error(f"reach bucket {bucket!r}", exc) from exc


class S3AdapterStore:
    """An `AdapterStore` in a bucket: `<prefix>/blobs/<digest>/` holds the two files and a marker
    object, `complete`.

    S3 has no rename, so the marker does the local store's: it is written last and removed first,
    and a digest exists exactly when its marker does. A put that dies leaves unmarked files,
    invisible and overwritten by the next put of that digest (a bucket lifecycle rule should
    abort incomplete multipart uploads). `local_dir` downloads a blob into `cache_dir/<digest>/`,
    checked against its digest, and keeps it while the cache has room (least recently used out).

    One race the local store does not have: a delete on one replica racing a put of the same
    digest on another can leave a marker without its files, since both write the same keys.
    Readers take that for absent (`local_dir` raises AdapterNotFoundError) and the next put of
    the digest stores the files again. The gateway only deletes digests no record references.
    """

    shared = True

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str = "",
        *,
        cache_dir: Path,
        max_blob_bytes: int,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        transfer: TransferConfig | None = None,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix
        self._cache = cache_dir
        self._max_blob_bytes = max_blob_bytes
        self._max_cache_bytes = max_cache_bytes
        # boto3's managed transfer: multipart (in parallel parts) above its threshold.
        self._transfer = transfer or TransferConfig()
        self._evict_lock = threading.Lock()
        try:
            self._cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AdapterStoreError(f"cannot create the adapter cache: {exc.strerror}") from exc
        self._sweep_cache()
        self._evict(keep="")

    def put(self, digest: str, config_bytes: bytes, weights_path: Path) -> bool:
        checked_digest(digest)
        with store_errors(f"store adapter {digest[:12]}"):
            if head(self._client, self._bucket, self._key(digest, MARKER)) is not None:
                # Re-marked first, so its age restarts before anything else: another replica's
                # sweep spares it for ORPHAN_GRACE_S, long enough for our caller's record.
                self._mark(digest)
                if all(head(self._client, self._bucket, self._key(digest, f)) for f in FILES):
                    return False
                # A delete racing an earlier put left the marker alone: store the files again.
            self._client.put_object(
                Bucket=self._bucket, Key=self._key(digest, CONFIG_FILE), Body=config_bytes
            )
            self._client.upload_file(
                str(weights_path), self._bucket, self._key(digest, WEIGHTS_FILE),
                Config=self._transfer,
            )  # fmt: skip
            self._mark(digest)  # last: the blob exists from here on
            return True

    def local_dir(self, digest: str) -> Path:
        target = self._cache / checked_digest(digest)
        try:
            # A hit skips S3: the dir was checked against its digest before it was published,
            # and whether a name may still use this version is the registry's business.
            os.utime(target)  # its mtime is its last use, for the LRU
            return target
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise AdapterStoreError(f"cannot use the adapter cache: {exc.strerror}") from exc
        with store_errors(f"fetch adapter {digest[:12]}"):
            self._fetch(digest, target)
        self._evict(keep=digest)
        return target

    def exists(self, digest: str) -> bool:
        checked_digest(digest)
        try:
            return head(self._client, self._bucket, self._key(digest, MARKER)) is not None
        except S3_ERRORS as exc:
            raise s3_error(f"look up adapter {digest[:12]}", exc) from exc

    def delete(self, digest: str) -> None:
        checked_digest(digest)
        try:
            # The marker first: from then on the blob is absent, however far the rest gets.
            for name in (MARKER, *FILES):
                self._client.delete_object(Bucket=self._bucket, Key=self._key(digest, name))
        except S3_ERRORS as exc:
            raise s3_error(f"delete adapter {digest[:12]}", exc) from exc
        self._drop_cached(digest)

    def digests(self, older_than_s: float = 0.0) -> set[str]:
        cutoff = time.time() - older_than_s
        base = join_key(self._prefix, "blobs") + "/"
        found: set[str] = set()
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=base
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    digest, _, leaf = obj["Key"].removeprefix(base).partition("/")
                    if leaf != MARKER or DIGEST.fullmatch(digest) is None:
                        continue
                    # S3's clock against ours: a skew between them shifts the grace as much.
                    if older_than_s <= 0 or obj["LastModified"].timestamp() < cutoff:
                        found.add(digest)
        except S3_ERRORS as exc:
            raise s3_error("list the adapter store", exc) from exc
        return found

    def _key(self, digest: str, name: str) -> str:
        return join_key(self._prefix, "blobs", digest, name)

    def _mark(self, digest: str) -> None:
        self._client.put_object(Bucket=self._bucket, Key=self._key(digest, MARKER), Body=b"")

    def _fetch(self, digest: str, target: Path) -> None:
        """Download the blob into `target`, published by one rename once checked."""
        if head(self._client, self._bucket, self._key(digest, MARKER)) is None:
            raise AdapterNotFoundError(f"adapter version {digest[:12]} is not in the store")
        heads = [head(self._client, self._bucket, self._key(digest, name)) for name in FILES]
        present = [h for h in heads if h is not None]
        if len(present) != len(FILES):
            raise AdapterNotFoundError(f"adapter version {digest[:12]} is incomplete in the store")
        size = sum(h["ContentLength"] for h in present)
        if size > self._max_blob_bytes:
            raise AdapterStoreError(
                f"adapter version {digest[:12]} is {size} bytes in the store, "
                f"over the {self._max_blob_bytes}-byte limit"
            )
        staging = Path(tempfile.mkdtemp(prefix=f"{_FETCH_PREFIX}{digest[:12]}-", dir=self._cache))
        try:
            for name, meta in zip(FILES, present, strict=True):
                self._download(self._key(digest, name), staging / name, meta)
            verify_blob_dir(staging, digest)
            for name in FILES:
                os.chmod(staging / name, 0o444)
                # Durable before the rename names the dir, so a hit never finds torn files.
                with (staging / name).open("rb") as f:
                    os.fsync(f.fileno())
            os.chmod(staging, 0o755)
            try:
                os.rename(staging, target)
            except OSError as exc:
                # A concurrent fetch published it first: same digest, same bytes.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self, key: str, path: Path, meta: HeadObjectOutputTypeDef) -> None:
        # IfMatch: the object read is the one whose size was checked, not one put since.
        response = self._client.get_object(Bucket=self._bucket, Key=key, IfMatch=meta["ETag"])
        limit, written = meta["ContentLength"], 0
        body = response["Body"]
        try:
            with path.open("xb") as f:
                for chunk in body.iter_chunks(_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        raise AdapterStoreError(f"{key} grew past its {limit} bytes while read")
                    f.write(chunk)
        finally:
            body.close()

    def _drop_cached(self, name: str) -> None:
        """Unpublish a cached dir with one rename, then remove it: no reader sees half of it."""
        doomed = self._cache / f"{_EVICT_PREFIX}{name[:12]}-{uuid.uuid4().hex}"
        try:
            os.rename(self._cache / name, doomed)
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.warning("could not drop %s from the adapter cache: %s", name[:12], exc)
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def _evict(self, keep: str) -> None:
        """Drop least recently used dirs until the cache fits its bytes, never `keep` (the one
        just asked for, even if it alone is over). Best effort: a failure is only logged."""
        with self._evict_lock:
            total, candidates = 0, []
            try:
                for entry in os.scandir(self._cache):
                    if DIGEST.fullmatch(entry.name) is None:
                        continue
                    with contextlib.suppress(FileNotFoundError):  # dropped meanwhile
                        size = sum(f.stat().st_size for f in os.scandir(entry.path))
                        total += size
                        if entry.name != keep:
                            candidates.append((entry.stat().st_mtime, entry.name, size))
            except OSError as exc:
                logger.warning("could not size the adapter cache: %s", exc)
                return
            for _, name, size in sorted(candidates):
                if total <= self._max_cache_bytes:
                    break
                self._drop_cached(name)
                total -= size

    def _sweep_cache(self) -> None:
        """Remove what crashed fetches and drops left (a fetch under way keeps writing)."""
        cutoff = time.time() - TMP_GRACE_S
        try:
            for entry in os.scandir(self._cache):
                stale = entry.name.startswith(_FETCH_PREFIX) and entry.stat().st_mtime < cutoff
                if stale or entry.name.startswith(_EVICT_PREFIX):
                    shutil.rmtree(entry.path, ignore_errors=True)
        except OSError as exc:
            logger.warning("could not sweep the adapter cache: %s", exc)
