"""Where the adapter store and registry live, named by one URL:

- `file:///abs/path`: a directory (`LocalAdapterStore` and `LocalAdapterRegistry` on it), shared
  by replicas only if they mount the same volume;
- `s3://bucket/prefix` (prefix optional): an S3-compatible bucket, shared by every replica that
  names it. The client is configured the way every AWS tool is, from the environment
  (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...): never from the URL, so it carries no secret.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from adapters.registry import AdapterRegistry, LocalAdapterRegistry
from adapters.store import AdapterStore, LocalAdapterStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# S3's bucket naming rules (general purpose buckets), less the reserved names checked below.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
# Keys stay under S3's 1024 bytes: the longest one under the prefix is about 150.
MAX_PREFIX_CHARS = 512


@dataclass(frozen=True)
class FileLocation:
    root: Path


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or segments joined by "/", no leading or trailing "/"


StoreLocation = FileLocation | S3Location


def parse_store_url(url: str) -> StoreLocation:
    """The location `url` names; ValueError, which never repeats the whole URL (it may hold
    credentials someone pasted into it), for anything but the two forms above."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("the adapter store URL is not a valid URL") from None
    if "@" in parts.netloc:
        raise ValueError(
            "the adapter store URL must not carry credentials: "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("the adapter store URL takes no query or fragment")
    if parts.scheme == "file":
        return _file_location(url, parts.netloc, parts.path)
    if parts.scheme == "s3":
        return S3Location(_checked_bucket(parts.netloc), _checked_prefix(parts.path))
    shown = f"{parts.scheme}:" if parts.scheme else "a bare path"  # a scheme holds no secret
    raise ValueError(
        f"the adapter store URL must be file:///absolute/path or s3://bucket/prefix, not {shown}"
    )


def open_store(
    location: StoreLocation,
    *,
    cache_dir: Path,
    max_adapters_per_tenant: int,
    max_blob_bytes: int,
    record_ttl_s: float,
    max_cache_bytes: int | None = None,
) -> tuple[AdapterStore, AdapterRegistry]:
    """The store and registry at `location`. For S3, `cache_dir` holds the blobs fetched for the
    engine (at most `max_cache_bytes`, 10 GiB by default), none over `max_blob_bytes`; records
    are served from memory for `record_ttl_s`. Checks that the bucket answers and honours
    conditional writes, so a misconfiguration stops the gateway at start-up."""
    if isinstance(location, FileLocation):
        return (
            LocalAdapterStore(location.root),
            LocalAdapterRegistry(location.root, max_adapters_per_tenant),
        )
    # Imported here: boto3 takes a while to import, and file:// deployments never need it.
    from adapters.s3_registry import S3AdapterRegistry
    from adapters.s3_store import check_bucket, s3_client

    client = s3_client()
    check_bucket(client, location.bucket)
    store = open_blob_store(
        location, cache_dir=cache_dir, max_blob_bytes=max_blob_bytes,
        max_cache_bytes=max_cache_bytes, client=client,
    )  # fmt: skip
    registry = S3AdapterRegistry(
        client, location.bucket, location.prefix,
        max_adapters_per_tenant=max_adapters_per_tenant, record_ttl_s=record_ttl_s,
    )  # fmt: skip
    registry.check_conditional_writes()
    return store, registry


def open_blob_store(
    location: StoreLocation,
    *,
    cache_dir: Path,
    max_blob_bytes: int,
    max_cache_bytes: int | None = None,
    client: S3Client | None = None,
) -> AdapterStore:
    """The store at `location` alone, without its registry: what an engine reads blobs from (it
    never reads or writes records, and its credentials need not allow it)."""
    if isinstance(location, FileLocation):
        return LocalAdapterStore(location.root)
    from adapters.s3_store import DEFAULT_CACHE_BYTES, S3AdapterStore, s3_client

    return S3AdapterStore(
        client or s3_client(), location.bucket, location.prefix,
        cache_dir=cache_dir, max_blob_bytes=max_blob_bytes,
        max_cache_bytes=DEFAULT_CACHE_BYTES if max_cache_bytes is None else max_cache_bytes,
    )  # fmt: skip


def _file_location(url: str, host: str, path: str) -> FileLocation:
    if host or not url[len("file:") :].startswith("///"):
        raise ValueError(
            "a file:// adapter store URL needs an absolute path, as in file:///srv/adapters "
            "(three slashes: file://name/... would name a host)"
        )
    decoded = unquote(path)
    if "\0" in decoded:
        raise ValueError("the adapter store path must not contain NUL")
    return FileLocation(Path(decoded))


def _checked_bucket(bucket: str) -> str:
    if ":" in bucket:
        raise ValueError("an s3:// adapter store URL names a bucket, not a host and port")
    valid = (
        _BUCKET.fullmatch(bucket) is not None
        and ".." not in bucket
        and not bucket.startswith(_RESERVED_PREFIXES)
        and not bucket.endswith(_RESERVED_SUFFIXES)
        and not _is_ipv4(bucket)
    )
    if not valid:
        raise ValueError(
            f"{bucket!r} is not a valid S3 bucket name: 3-63 characters of a-z, 0-9, '.' and '-', "
            "starting and ending with a letter or digit, not an IP address"
        )
    return bucket


def _checked_prefix(path: str) -> str:
    prefix = path.strip("/")
    if not prefix:
        return ""
    for segment in prefix.split("/"):
        if segment in ("", ".", "..") or _PREFIX_SEGMENT.fullmatch(segment) is None:
            raise ValueError(
                f"the S3 prefix segment {segment!r} is not allowed: use non-empty segments of "
                "A-Z, a-z, 0-9, '.', '_' and '-', and no '.' or '..'"
            )
    if len(prefix) > MAX_PREFIX_CHARS:
        raise ValueError(f"the S3 prefix is longer than {MAX_PREFIX_CHARS} characters")
    return prefix


def _is_ipv4(name: str) -> bool:
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True
