"""Tenants and API keys, loaded from the tenants file (YAML).

Keys are stored as sha256 hex digests, never in plaintext; a presented key is hashed and its
digest looked up in a dict, so authentication costs the same with 3 tenants or 100,000. The lookup
compares digests, never keys: how close a random key's digest comes to a stored one says nothing
about the stored key (sha256 is preimage resistant), so only the answer itself (valid or not) leaks.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_TENANTS_FILE_BYTES = 4 << 20
MAX_KEY_CHARS = 512

KeyDigests = Annotated[list[str], Field(min_length=1, max_length=64)]


class TenantsFileError(ValueError):
    """The tenants file is missing, unreadable or invalid."""


class DevTenantsExposedError(TenantsFileError):
    """A dev tenants file (public keys) would be served on a non-loopback address."""


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _KeyHolder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key_sha256: KeyDigests

    @field_validator("api_key_sha256")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        for digest in digests:
            if not SHA256_HEX.fullmatch(digest):
                raise ValueError("each key must be a lowercase sha256 hex digest (64 chars)")
        return digests


class TenantLimits(BaseModel):
    """A tenant's quotas, each optional (unset: unlimited). Tokens are prompt tokens plus the
    request's max_tokens, reserved up front; what the engine did not use is given back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(None, ge=1, le=10_000_000)
    tokens_per_minute: int | None = Field(None, ge=1, le=10_000_000_000)
    max_concurrent: int | None = Field(None, ge=1, le=1_000_000)


class TenantEntry(_KeyHolder):
    """One tenant's block: its keys and limits (a later issue adds `adapters`)."""

    limits: TenantLimits = Field(default_factory=TenantLimits)


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Marks a file with publicly known keys; the server warns loudly when it runs with one.
    dev: bool = False
    admin: _KeyHolder | None = None
    tenants: dict[str, TenantEntry] = Field(default_factory=dict, max_length=100_000)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, tenants: dict[str, TenantEntry]) -> dict[str, TenantEntry]:
        for name in tenants:
            if not TENANT_NAME.fullmatch(name):
                raise ValueError(f"tenant name {name!r} must be a lowercase slug")
        return tenants


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantLimits = field(default_factory=TenantLimits)


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to: a tenant, or the operator (admin)."""

    tenant: Tenant | None
    is_admin: bool = False


class TenantDirectory:
    def __init__(self, config: TenantsFile) -> None:
        self.is_dev = config.dev
        self._tenants = {name: Tenant(name, entry.limits) for name, entry in config.tenants.items()}
        # digest -> who holds it. Filled admin first, then tenants in file order: a digest listed
        # twice belongs to its last holder, as it did when every digest was compared in turn.
        self._keys: dict[bytes, Principal] = {}
        if config.admin:
            admin = Principal(tenant=None, is_admin=True)
            self._keys.update((bytes.fromhex(d), admin) for d in config.admin.api_key_sha256)
        for name, entry in config.tenants.items():
            principal = Principal(tenant=self._tenants[name])
            self._keys.update((bytes.fromhex(d), principal) for d in entry.api_key_sha256)

    @classmethod
    def load(cls, path: Path) -> TenantDirectory:
        try:
            if path.stat().st_size > MAX_TENANTS_FILE_BYTES:
                raise TenantsFileError(f"{path} is larger than {MAX_TENANTS_FILE_BYTES} bytes")
            raw = yaml.safe_load(path.read_text())
            return cls(TenantsFile.model_validate(raw or {}))
        except OSError as e:
            raise TenantsFileError(f"cannot read tenants file {path}: {e}") from e
        except (yaml.YAMLError, ValidationError) as e:
            raise TenantsFileError(f"invalid tenants file {path}: {e}") from e

    def authenticate(self, key: str) -> Principal | None:
        if not key or len(key) > MAX_KEY_CHARS:
            return None
        return self._keys.get(hashlib.sha256(key.encode()).digest())

    def tenant(self, name: str) -> Tenant | None:
        return self._tenants.get(name)


def is_loopback_host(host: str) -> bool:
    """True when a bind address reaches this machine only: 127.0.0.0/8, ::1 (also IPv4-mapped)
    or `localhost`. Every other name counts as reachable: `0.0.0.0`, `::` and "" bind every
    interface, and what another host name resolves to can change."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def open_tenants_file(path: Path | None, host: str, *, allow_dev: bool) -> TenantDirectory:
    """Load the tenants file the gateway will serve on `host`. A dev file (`dev: true`, keys
    published in the README) is refused there unless `host` is loopback or `allow_dev` is set:
    its keys would give anyone who reaches the port a tenant's and the operator's access."""
    if path is None:
        raise TenantsFileError(
            "LORAGATE_TENANTS_FILE is not set; `make serve` uses the dev file "
            "deploy/dev/tenants.dev.yaml"
        )
    directory = TenantDirectory.load(path)
    if directory.is_dev and not allow_dev and not is_loopback_host(host):
        raise DevTenantsExposedError(
            f"refusing to serve the dev tenants file {path} (`dev: true`, its API keys are "
            f"public) on {host!r}, which is not a loopback address. Use your own tenants file "
            "(`loragate keys new`), bind 127.0.0.1, or pass --allow-dev-tenants "
            "(LORAGATE_ALLOW_DEV_TENANTS=true) if exposing it is really meant."
        )
    return directory
