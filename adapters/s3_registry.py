"""An `AdapterRegistry` in an S3-compatible bucket, shared by every gateway replica that names it,
kept consistent without locks by S3's conditional writes.
"""

from __future__ import annotations

import builtins
import json
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from botocore.exceptions import ClientError

from adapters.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterRejectedError,
    AdapterStoreError,
)
from adapters.registry import (
    MAX_CACHED_RECORDS,
    TENANT_NAME,
    PutResult,
    _checked_name,
    _checked_tenant,
    merged_onto,
)
from adapters.s3_store import S3_ERRORS, error_code, is_missing, join_key, s3_error
from adapters.store import DIGEST, checked_digest
from adapters.types import ADAPTER_NAME, AdapterRecord, MergedCopy

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

GENERATION_KEY = ".generation"  # tenant names start with a letter or digit: no clash
DEFAULT_RECORD_TTL_S = 1.0
_RECORD_SUFFIX = ".json"
# 412: the object is not the one read. 409: another conditional write to it is in flight.
_LOST_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
# Deciding again after a lost race settles it (the winner's record is then read), unless the
# name keeps changing; the counter is contended by every change, so it gets more tries.
_RECORD_ATTEMPTS = 6
_T = TypeVar("_T")
_GENERATION_ATTEMPTS = 20
_BACKOFF_S = 0.01
_MAX_BACKOFF_S = 0.2


class _LostRace(Exception):
    """A conditional write found the object changed since it was read."""


class _TtlCache:
    """Records by key, each with the ETag it was read at. `fresh` serves one for `ttl_s` after
    it was read or written; `same` at any age while the caller's listing shows that ETag. Least
    recently used dropped beyond `max_entries`. The lock guards the dict only, never I/O."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self._max = max_entries
        self._ttl = ttl_s
        self._entries: OrderedDict[str, tuple[float, str, AdapterRecord]] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, key: str) -> AdapterRecord | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] < time.monotonic():
                return None
            self._entries.move_to_end(key)
            return entry[2]

    def same(self, key: str, etag: str) -> AdapterRecord | None:
        with self._lock:
            entry = self._entries.get(key)
            return entry[2] if entry is not None and entry[1] == etag else None

    def store(self, key: str, etag: str, record: AdapterRecord) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + self._ttl, etag, record)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


class S3AdapterRegistry:
    """An `AdapterRegistry` in a bucket: `<prefix>/registry/<tenant>/<name>.json`, holding
    `AdapterRecord.to_json`.

    No lock: every write is conditional on what the writer read (If-None-Match: * to create,
    If-Match: <its ETag> to replace or delete), so of replicas racing on one name only one wins;
    the others read again and decide again (same digest: UNCHANGED, else a conflict unless
    replace). The per-tenant cap counts the records listed before a create, so creates racing
    under different names can exceed it by the number of racers.

    `peek` serves a record for `record_ttl_s` after this object read or wrote it: a replace or
    delete through another replica is seen within that (through this one, at once). Absence is
    never cached, so an upload through another replica is servable at once.

    `generation` is a counter object, `<prefix>/registry/.generation`, bumped by a conditional
    write loop after each change: one GET to read, where a value derived from the records would
    cost a listing of them all. Changes by other writers (an operator's own tools) do not bump it.
    """

    shared = True

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str = "",
        *,
        max_adapters_per_tenant: int = 1000,
        record_ttl_s: float = DEFAULT_RECORD_TTL_S,
        max_cached_records: int = MAX_CACHED_RECORDS,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._root = join_key(prefix, "registry")
        self._max_per_tenant = max_adapters_per_tenant
        self._cache = _TtlCache(max_cached_records, record_ttl_s)
        self._conditional_delete = True

    def check_conditional_writes(self) -> None:
        """Refuse an endpoint that ignores conditional writes, on which two replicas racing on
        one name could both win without either noticing. One where a delete cannot be made
        conditional gets plain deletes (logged): a delete racing a replace then removes the new
        version, as if it had come after it. Writes and removes one probe object."""
        key = join_key(self._root, f".probe-{uuid.uuid4().hex}")
        try:
            self._write(key, b"probe", None)
            try:
                writes_honoured = self._refused(lambda: self._write(key, b"again", None))
                writes_honoured &= self._refused(lambda: self._write(key, b"again", '"0"'))
                self._conditional_delete = self._refused(lambda: self._delete(key, '"0"'))
                self._conditional_delete &= self._exists(key)
            finally:
                self._client.delete_object(Bucket=self._bucket, Key=key)
        except S3_ERRORS as exc:
            raise s3_error("check its conditional writes", exc) from exc
        if not writes_honoured:
            raise AdapterStoreError(
                "the S3 endpoint ignores conditional writes (If-None-Match, If-Match): "
                "gateway replicas sharing it could overwrite each other's adapter records"
            )
        if not self._conditional_delete:
            logger.warning("the S3 endpoint has no conditional delete; deleting records plainly")

    def get(self, tenant: str, name: str) -> AdapterRecord | None:
        if TENANT_NAME.fullmatch(tenant) is None or ADAPTER_NAME.fullmatch(name) is None:
            return None
        try:
            return self._read(tenant, name)[0]
        except S3_ERRORS as exc:
            raise s3_error(f"read adapter {name!r}", exc) from exc

    def peek(self, tenant: str, name: str) -> AdapterRecord | None:
        if TENANT_NAME.fullmatch(tenant) is None or ADAPTER_NAME.fullmatch(name) is None:
            return None
        return self._cache.fresh(self._key(tenant, name))

    def list(self, tenant: str) -> builtins.list[AdapterRecord]:
        prefix = join_key(self._root, _checked_tenant(tenant)) + "/"
        try:
            found = [self._listed(t, n, etag) for t, n, etag in self._records(prefix)]
        except S3_ERRORS as exc:
            raise s3_error(f"list {tenant!r}", exc) from exc
        return sorted((r for r in found if r is not None), key=lambda r: r.name)

    def put(self, record: AdapterRecord, *, replace: bool) -> tuple[PutResult, AdapterRecord]:
        _checked_tenant(record.tenant)
        _checked_name(record.name)
        checked_digest(record.digest)

        def attempt() -> tuple[PutResult, AdapterRecord]:
            existing, etag = self._read(record.tenant, record.name)
            if existing is not None and existing.digest == record.digest:
                return PutResult.UNCHANGED, existing
            if existing is not None and not replace:
                raise AdapterConflictError(
                    f"adapter {record.name!r} already holds different content; "
                    "replace it explicitly",
                    code="adapter_conflict",
                    param="name",
                )
            if existing is None:
                self._check_cap(record)
            # Over a corrupt record too (etag set, existing None), as over any other.
            self._write_record(record, etag)
            return (PutResult.CREATED if existing is None else PutResult.REPLACED), record

        return self._retrying(f"save adapter {record.name!r}", attempt)

    def set_merged(
        self, tenant: str, name: str, digest: str, merged: tuple[MergedCopy, ...]
    ) -> AdapterRecord:
        _checked_tenant(tenant)
        _checked_name(name)

        def attempt() -> AdapterRecord:
            existing, etag = self._read(tenant, name)
            updated = merged_onto(existing, name, digest, merged)
            self._write_record(updated, etag)
            return updated

        return self._retrying(f"save adapter {name!r}", attempt)

    def delete(self, tenant: str, name: str) -> AdapterRecord:
        _checked_tenant(tenant)
        _checked_name(name)
        key = self._key(tenant, name)

        def attempt() -> AdapterRecord:
            existing, etag = self._read(tenant, name)
            if existing is None:
                raise AdapterNotFoundError(f"no adapter named {name!r}", code="adapter_not_found")
            # Only the version read goes, so the record returned is the one removed.
            self._delete(key, etag if self._conditional_delete else None)
            self._cache.drop(key)
            self._bump_generation()
            return existing

        return self._retrying(f"delete adapter {name!r}", attempt)

    def _retrying(self, action: str, attempt: Callable[[], _T]) -> _T:
        """`attempt` (read a record, decide, write it conditionally) again while another
        writer changes the record between its read and its write."""
        try:
            for n in range(_RECORD_ATTEMPTS):
                try:
                    return attempt()
                except _LostRace:
                    _backoff(n)
        except S3_ERRORS as exc:
            raise s3_error(action, exc) from exc
        raise AdapterStoreError(f"cannot {action}: it kept changing meanwhile; retry")

    def _write_record(self, record: AdapterRecord, etag: str | None) -> None:
        """Write `record` if its object is still at `etag` (None: if there is none), else
        _LostRace."""
        key = self._key(record.tenant, record.name)
        data = json.dumps(record.to_json(), indent=2, sort_keys=True).encode()
        new_etag = self._write(key, data, etag)
        self._cache.store(key, new_etag, record)
        self._bump_generation()

    def referenced_digests(self) -> set[str]:
        return {record.digest for record in self._every_record()}

    def referenced_merged_keys(self) -> set[str]:
        return {copy.key for record in self._every_record() for copy in record.merged}

    def _every_record(self) -> tuple[AdapterRecord, ...]:
        try:
            found = [self._listed(t, n, etag) for t, n, etag in self._records(self._root + "/")]
        except S3_ERRORS as exc:
            raise s3_error("list its records", exc) from exc
        return tuple(record for record in found if record is not None)

    def generation(self) -> int:
        try:
            return self._read_generation()[0]
        except S3_ERRORS as exc:
            raise s3_error("read its generation", exc) from exc

    def _bump_generation(self) -> None:
        # After the change is written, so a reader who sees the new number also sees the change;
        # conditional like the records, so two changes never share a number.
        key = join_key(self._root, GENERATION_KEY)
        try:
            for attempt in range(_GENERATION_ATTEMPTS):
                value, etag = self._read_generation()
                try:
                    self._write(key, b"%d" % (value + 1), etag)
                    return
                except _LostRace:
                    _backoff(attempt)
        except S3_ERRORS as exc:
            raise s3_error("bump its generation (the change itself is saved)", exc) from exc
        raise AdapterStoreError(
            "the adapter registry's generation kept changing; the change itself is saved"
        )

    def _read_generation(self) -> tuple[int, str | None]:
        try:
            response = self._client.get_object(
                Bucket=self._bucket, Key=join_key(self._root, GENERATION_KEY)
            )
        except ClientError as exc:
            if is_missing(exc):
                return 0, None
            raise
        with response["Body"] as body:
            data = body.read()
        try:
            return int(data), response["ETag"]
        except ValueError:
            logger.warning("adapter registry generation object is corrupt; reading it as 0")
            return 0, response["ETag"]

    def _check_cap(self, record: AdapterRecord) -> None:
        prefix = join_key(self._root, record.tenant) + "/"
        others = sum(1 for _, name, _ in self._records(prefix) if name != record.name)
        if others >= self._max_per_tenant:
            raise AdapterRejectedError(
                f"tenant {record.tenant!r} already has {others} adapters, the limit; "
                "delete one first",
                code="too_many_adapters",
            )

    def _write(self, key: str, data: bytes, etag: str | None) -> str:
        """Write `key` if it still is the object read (`etag`; None: if there is none yet);
        its new ETag, or _LostRace."""
        try:
            if etag is None:
                response = self._client.put_object(
                    Bucket=self._bucket, Key=key, Body=data, IfNoneMatch="*",
                    ContentType="application/json",
                )  # fmt: skip
            else:
                response = self._client.put_object(
                    Bucket=self._bucket, Key=key, Body=data, IfMatch=etag,
                    ContentType="application/json",
                )  # fmt: skip
        except ClientError as exc:
            if _lost(exc):
                raise _LostRace from exc
            raise
        return response["ETag"]

    def _delete(self, key: str, etag: str | None) -> None:
        """Remove `key` if it still is the object read (`etag`; None: whatever it is)."""
        try:
            if etag is None:
                self._client.delete_object(Bucket=self._bucket, Key=key)
            else:
                self._client.delete_object(Bucket=self._bucket, Key=key, IfMatch=etag)
        except ClientError as exc:
            if _lost(exc):
                raise _LostRace from exc
            raise

    def _refused(self, write: Callable[[], object]) -> bool:
        """Whether `write`, conditional on something untrue, was refused for that."""
        try:
            write()
        except _LostRace:
            return True
        except ClientError as exc:  # NotImplemented, InvalidArgument: the condition is unknown
            logger.info("conditional S3 request refused: %s", error_code(exc) or "error")
        return False

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if is_missing(exc):
                return False
            raise
        return True

    def _key(self, tenant: str, name: str) -> str:
        return join_key(self._root, tenant, name + _RECORD_SUFFIX)

    def _records(self, prefix: str) -> Iterator[tuple[str, str, str]]:
        """(tenant, name, ETag) of each record object listed under `prefix`, all pages."""
        base = self._root + "/"
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                tenant, _, leaf = obj["Key"].removeprefix(base).partition("/")
                name = leaf.removesuffix(_RECORD_SUFFIX)
                if (
                    leaf.endswith(_RECORD_SUFFIX)
                    and TENANT_NAME.fullmatch(tenant)
                    and ADAPTER_NAME.fullmatch(name)
                ):
                    yield tenant, name, obj["ETag"]

    def _listed(self, tenant: str, name: str, etag: str) -> AdapterRecord | None:
        """The record a listing showed with `etag`: from memory if that is the one held there
        (an ETag names the bytes), else read."""
        held = self._cache.same(self._key(tenant, name), etag)
        return held if held is not None else self._read(tenant, name)[0]

    def _read(self, tenant: str, name: str) -> tuple[AdapterRecord | None, str | None]:
        """The record, or None if absent or corrupt (logged: one bad object must not stop
        serving), and the ETag of the object read (None if there was none). Refreshes the
        cache; boto errors are the caller's to translate."""
        key = self._key(tenant, name)
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if is_missing(exc):
                self._cache.drop(key)
                return None, None
            raise
        with response["Body"] as body:
            data = body.read()
        etag = response["ETag"]
        try:
            record = AdapterRecord.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("skipping corrupt adapter record %s: %r", key, exc)
            self._cache.drop(key)
            return None, etag
        if (record.tenant, record.name) != (tenant, name) or not DIGEST.fullmatch(record.digest):
            logger.warning("skipping adapter record %s: it does not match its key", key)
            self._cache.drop(key)
            return None, etag
        self._cache.store(key, etag, record)
        return record, etag


def _lost(exc: ClientError) -> bool:
    """Whether a conditional request failed because the object changed (or went) since read."""
    return error_code(exc) in _LOST_CODES or is_missing(exc)


def _backoff(attempt: int) -> None:
    # Jittered, so racers that lost together do not collide again on their next try.
    time.sleep(random.uniform(0, min(_MAX_BACKOFF_S, _BACKOFF_S * 2**attempt)))
