"""Which adapter version each tenant's name points at: the `AdapterRegistry` seam and its
directory implementation, safe for several gateway replicas sharing one volume, with records
cached in memory while their files are unchanged (`adapters.record_cache`).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import enum
import fcntl
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from adapters.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterRejectedError,
    AdapterStoreError,
)
from adapters.record_cache import RecordCache, Signature, next_mtime_ns, signature
from adapters.store import DIGEST, checked_digest, fsync_dir
from adapters.types import ADAPTER_NAME, AdapterRecord, MergedCopy

logger = logging.getLogger(__name__)

# Same rule as server.tenants.TENANT_NAME; repeated because `adapters` does not import `server`.
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
LOCK_FILE = ".lock"
GENERATION_FILE = ".generation"
_RECORD_SUFFIX = ".json"
_PARTIAL_SUFFIX = ".tmp"
# Records kept in memory per registry object: about 1 KB each, so some 4 MB at most.
MAX_CACHED_RECORDS = 4096


class PutResult(enum.Enum):
    CREATED = "created"
    UNCHANGED = "unchanged"
    REPLACED = "replaced"


class AdapterRegistry(Protocol):
    """tenant → adapter name → `AdapterRecord`. Implementations must be safe across threads.

    Invalid tenant or adapter names raise AdapterRejectedError (code `bad_name`), except in `get`:
    nothing can be stored under an invalid name, so it is simply absent (a 404 for the caller).
    """

    shared: bool  # True when other replicas write it too (its records are cached for a TTL)

    def get(self, tenant: str, name: str) -> AdapterRecord | None: ...

    def peek(self, tenant: str, name: str) -> AdapterRecord | None:
        """`get` answered from memory, without blocking I/O beyond a stat, so it may run on the
        event loop: the record if it is held and still current, else None, which means "call
        `get`" (the record may still exist). Never a version that was replaced or deleted."""
        ...

    def list(self, tenant: str) -> builtins.list[AdapterRecord]:
        """The tenant's records, sorted by name."""
        ...

    def put(self, record: AdapterRecord, *, replace: bool) -> tuple[PutResult, AdapterRecord]:
        """Same digest: (UNCHANGED, the existing record). Different digest: AdapterConflictError
        unless `replace`, then (REPLACED, record). New name: (CREATED, record)."""
        ...

    def delete(self, tenant: str, name: str) -> AdapterRecord:
        """The removed record; AdapterNotFoundError if there was none."""
        ...

    def set_merged(
        self, tenant: str, name: str, digest: str, merged: tuple[MergedCopy, ...]
    ) -> AdapterRecord:
        """Record the merged copies of the version `digest` of `name`, the updated record.
        AdapterNotFoundError when the name is absent, AdapterConflictError (code
        `adapter_changed`) when it now holds another version: the copies were built from the
        one that was read, and must never be attached to another."""
        ...

    def referenced_digests(self) -> set[str]:
        """Digests some record points at: the store may garbage-collect all others."""
        ...

    def referenced_merged_keys(self) -> set[str]:
        """Merged copy keys some record points at: the merged store may collect all others."""
        ...

    def generation(self) -> int:
        """Changes on every put or delete, also by other processes: compare it for inequality."""
        ...


def merged_onto(
    existing: AdapterRecord | None, name: str, digest: str, merged: tuple[MergedCopy, ...]
) -> AdapterRecord:
    """`existing` with `merged` as its merged copies, if it still is version `digest`."""
    if existing is None:
        raise AdapterNotFoundError(f"no adapter named {name!r}", code="adapter_not_found")
    if existing.digest != digest:
        raise AdapterConflictError(
            f"adapter {name!r} was replaced meanwhile; promote the new version",
            code="adapter_changed",
            param="name",
        )
    return dataclasses.replace(existing, merged=merged)


def _checked_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or TENANT_NAME.fullmatch(tenant) is None:
        raise AdapterRejectedError(
            "a tenant name is 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit",
            code="bad_name",
            param="tenant",
        )
    return tenant


def _checked_name(name: str) -> str:
    if not isinstance(name, str) or ADAPTER_NAME.fullmatch(name) is None:
        raise AdapterRejectedError(
            "an adapter name is 1-63 characters of a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit",
            code="bad_name",
            param="name",
        )
    return name


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    # Each acquisition opens its own descriptor: flock excludes other open file descriptions,
    # so this serializes threads of one process as well as other processes.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomic(directory: Path, filename: str, data: bytes, mtime_ns: int | None = None) -> None:
    """Replace directory/filename with `data`, so readers see the old or new bytes, never a mix;
    with `mtime_ns`, the new file carries that modification time."""
    fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=_PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if mtime_ns is not None:
                os.utime(f.fileno(), ns=(mtime_ns, mtime_ns))
            os.fsync(f.fileno())
        os.chmod(partial, 0o644)
        os.rename(partial, directory / filename)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def _io_error(action: str, exc: OSError) -> AdapterStoreError:
    return AdapterStoreError(f"the adapter registry could not {action}: {exc.strerror or exc}")


class LocalAdapterRegistry:
    """An `AdapterRegistry` on a directory: `root/registry/<tenant>/<name>.json`.

    Readers take no lock (records are replaced by rename); writers hold the tenant's flock.
    `get`, `peek` and `list` serve a record from memory while a stat of its file shows the file
    it was read from; writers read the file itself.
    """

    shared = False  # replicas share it only by mounting one volume

    def __init__(
        self,
        root: Path,
        max_adapters_per_tenant: int = 1000,
        max_cached_records: int = MAX_CACHED_RECORDS,
    ) -> None:
        self._root = root / "registry"
        self._max_per_tenant = max_adapters_per_tenant
        self._cache = RecordCache(max_cached_records)
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _io_error("create its directory", exc) from exc

    def get(self, tenant: str, name: str) -> AdapterRecord | None:
        if TENANT_NAME.fullmatch(tenant) is None or ADAPTER_NAME.fullmatch(name) is None:
            return None
        return self._cached_read(self._root / tenant, name)

    def peek(self, tenant: str, name: str) -> AdapterRecord | None:
        if TENANT_NAME.fullmatch(tenant) is None or ADAPTER_NAME.fullmatch(name) is None:
            return None
        return self._cache.fresh(self._path(tenant, name))

    def list(self, tenant: str) -> builtins.list[AdapterRecord]:
        tenant_dir = self._root / _checked_tenant(tenant)
        records = (self._cached_read(tenant_dir, name) for name in self._names(tenant_dir))
        return [record for record in records if record is not None]

    def put(self, record: AdapterRecord, *, replace: bool) -> tuple[PutResult, AdapterRecord]:
        tenant_dir = self._root / _checked_tenant(record.tenant)
        _checked_name(record.name)
        checked_digest(record.digest)
        try:
            self._ensure_dir(tenant_dir)
            # The tenant lock's invariant: a record file is only written or removed by a holder
            # who read that name's current state under the same hold, and the tenant's record
            # count is checked and changed in that hold too. So no replica overwrites a version
            # it did not see (a lost 409), and the per-tenant cap holds across replicas.
            with _flocked(tenant_dir / LOCK_FILE):
                return self._put_locked(tenant_dir, record, replace)
        except OSError as exc:
            raise _io_error(f"save adapter {record.name!r}", exc) from exc

    def _put_locked(
        self, tenant_dir: Path, record: AdapterRecord, replace: bool
    ) -> tuple[PutResult, AdapterRecord]:
        self._sweep_partial(tenant_dir)
        existing, existing_sig = self._read(tenant_dir, record.name)
        if existing is not None and existing.digest == record.digest:
            return PutResult.UNCHANGED, existing
        if existing is not None and not replace:
            raise AdapterConflictError(
                f"adapter {record.name!r} already holds different content; replace it explicitly",
                code="adapter_conflict",
                param="name",
            )
        if existing is None:
            others = [n for n in self._names(tenant_dir) if n != record.name]
            if len(others) >= self._max_per_tenant:
                raise AdapterRejectedError(
                    f"tenant {record.tenant!r} already has {len(others)} adapters, "
                    f"the limit; delete one first",
                    code="too_many_adapters",
                )
        self._write_locked(tenant_dir, record, existing_sig)
        return (PutResult.CREATED if existing is None else PutResult.REPLACED), record

    def _write_locked(
        self, tenant_dir: Path, record: AdapterRecord, existing_sig: Signature | None
    ) -> None:
        data = json.dumps(record.to_json(), indent=2, sort_keys=True).encode()
        mtime_ns = next_mtime_ns(existing_sig, time.time_ns())  # see record_cache.Signature
        _write_atomic(tenant_dir, record.name + _RECORD_SUFFIX, data, mtime_ns)
        self._cache.drop(self._path(record.tenant, record.name))
        self._bump_generation()

    def set_merged(
        self, tenant: str, name: str, digest: str, merged: tuple[MergedCopy, ...]
    ) -> AdapterRecord:
        tenant_dir = self._root / _checked_tenant(tenant)
        _checked_name(name)
        try:
            if not tenant_dir.is_dir():
                raise AdapterNotFoundError(f"no adapter named {name!r}", code="adapter_not_found")
            with _flocked(tenant_dir / LOCK_FILE):  # the invariant is stated in `put`
                self._sweep_partial(tenant_dir)
                existing, existing_sig = self._read(tenant_dir, name)
                updated = merged_onto(existing, name, digest, merged)
                self._write_locked(tenant_dir, updated, existing_sig)
                return updated
        except OSError as exc:
            raise _io_error(f"save adapter {name!r}", exc) from exc

    def delete(self, tenant: str, name: str) -> AdapterRecord:
        tenant_dir = self._root / _checked_tenant(tenant)
        _checked_name(name)
        try:
            if not tenant_dir.is_dir():
                raise AdapterNotFoundError(f"no adapter named {name!r}", code="adapter_not_found")
            with _flocked(tenant_dir / LOCK_FILE):  # the invariant is stated in `put`
                self._sweep_partial(tenant_dir)
                existing, _ = self._read(tenant_dir, name)
                if existing is None:
                    raise AdapterNotFoundError(
                        f"no adapter named {name!r}", code="adapter_not_found"
                    )
                os.unlink(tenant_dir / (name + _RECORD_SUFFIX))
                self._cache.drop(self._path(tenant, name))
                fsync_dir(tenant_dir)
                self._bump_generation()
                return existing
        except OSError as exc:
            raise _io_error(f"delete adapter {name!r}", exc) from exc

    def referenced_digests(self) -> set[str]:
        return {record.digest for record in self._every_record()}

    def referenced_merged_keys(self) -> set[str]:
        return {copy.key for record in self._every_record() for copy in record.merged}

    def _every_record(self) -> tuple[AdapterRecord, ...]:
        try:
            tenants = [t for t in os.listdir(self._root) if TENANT_NAME.fullmatch(t)]
        except OSError as exc:
            raise _io_error("list tenants", exc) from exc
        return tuple(record for tenant in tenants for record in self.list(tenant))

    def generation(self) -> int:
        try:
            return int((self._root / GENERATION_FILE).read_bytes())
        except FileNotFoundError:
            return 0
        except ValueError:
            logger.warning("adapter registry generation file is corrupt; reading it as 0")
            return 0
        except OSError as exc:
            raise _io_error("read its generation", exc) from exc

    def _bump_generation(self) -> None:
        # Called after the change is on disk, so a reader who sees the new number also sees the
        # change. The lock keeps concurrent changes (any tenant, any process) from sharing a number.
        with _flocked(self._root / (GENERATION_FILE + LOCK_FILE)):
            self._sweep_partial(self._root)  # tenant dirs never end in .tmp: see TENANT_NAME
            _write_atomic(self._root, GENERATION_FILE, b"%d" % (self.generation() + 1))

    def _ensure_dir(self, tenant_dir: Path) -> None:
        try:
            tenant_dir.mkdir(mode=0o755)
        except FileExistsError:
            return
        fsync_dir(self._root)

    def _names(self, tenant_dir: Path) -> builtins.list[str]:
        """Adapter names with a record file in tenant_dir, sorted."""
        try:
            entries = os.listdir(tenant_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _io_error(f"list {tenant_dir.name!r}", exc) from exc
        stems = (e.removesuffix(_RECORD_SUFFIX) for e in entries if e.endswith(_RECORD_SUFFIX))
        return sorted(s for s in stems if ADAPTER_NAME.fullmatch(s))

    def _sweep_partial(self, tenant_dir: Path) -> None:
        # Only called holding the lock of the writers into this dir: a partial file is a dead one's.
        for entry in os.listdir(tenant_dir):
            if entry.startswith(".") and entry.endswith(_PARTIAL_SUFFIX):
                (tenant_dir / entry).unlink(missing_ok=True)

    def _path(self, tenant: str, name: str) -> str:
        # A str, built without pathlib: `peek` runs on the event loop for every adapter request.
        return f"{self._root}/{tenant}/{name}{_RECORD_SUFFIX}"

    def _cached_read(self, tenant_dir: Path, name: str) -> AdapterRecord | None:
        path = self._path(tenant_dir.name, name)
        record = self._cache.fresh(path)
        if record is None:
            record, sig = self._read(tenant_dir, name)
            if record is not None and sig is not None:
                self._cache.store(path, sig, record)
        return record

    def _read(self, tenant_dir: Path, name: str) -> tuple[AdapterRecord | None, Signature | None]:
        """The record, or None if absent or corrupt (logged: one bad file must not stop serving),
        and the signature of the file it was read from (None if there was no file)."""
        path = tenant_dir / (name + _RECORD_SUFFIX)
        try:
            with path.open("rb") as f:
                sig = signature(os.fstat(f.fileno()))
                data = f.read()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise _io_error(f"read adapter {name!r}", exc) from exc
        try:
            record = AdapterRecord.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("skipping corrupt adapter record %s: %r", path, exc)
            return None, sig
        if (record.tenant, record.name) != (tenant_dir.name, name) or not DIGEST.fullmatch(
            record.digest
        ):
            logger.warning("skipping adapter record %s: it does not match its path", path)
            return None, sig
        return record, sig
