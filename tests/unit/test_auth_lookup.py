"""Authentication with a tenants file at its size limit: the right principal for every kind of
key, found by looking the digest up, not by comparing it with every stored one."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import pytest

from server.tenants import TenantDirectory, TenantsFile, hash_api_key

TENANTS = 100_000  # TenantsFile's limit
ADMIN_KEY = "sk-big-admin"


def tenant_key(i: int) -> str:
    return f"sk-big-tenant-{i}"


@pytest.fixture(scope="module")
def directory() -> TenantDirectory:
    tenants = {
        f"tenant-{i}": {"api_key_sha256": [hash_api_key(tenant_key(i))]} for i in range(TENANTS)
    }
    # A tenant with two keys: both are its own.
    tenants["tenant-7"]["api_key_sha256"].append(hash_api_key("sk-big-tenant-7-second"))
    raw = {"admin": {"api_key_sha256": [hash_api_key(ADMIN_KEY)]}, "tenants": tenants}
    return TenantDirectory(TenantsFile.model_validate(raw))


@pytest.mark.parametrize("i", [0, 7, 54_321, TENANTS - 1])
def test_each_tenant_key_identifies_its_tenant_among_100000(
    directory: TenantDirectory, i: int
) -> None:
    principal = directory.authenticate(tenant_key(i))
    assert principal is not None and principal.tenant is not None and not principal.is_admin
    assert principal.tenant.name == f"tenant-{i}"
    assert principal.tenant is directory.tenant(f"tenant-{i}")


def test_a_tenants_second_key_identifies_it_too(directory: TenantDirectory) -> None:
    principal = directory.authenticate("sk-big-tenant-7-second")
    assert principal is not None and principal.tenant is not None
    assert principal.tenant.name == "tenant-7"


def test_admin_key_is_admin_among_100000_tenants(directory: TenantDirectory) -> None:
    principal = directory.authenticate(ADMIN_KEY)
    assert principal is not None and principal.is_admin and principal.tenant is None


@pytest.mark.parametrize(
    "key",
    [
        "sk-big-tenant-100000",  # one past the last tenant
        "sk-big-tenant-",
        hash_api_key(tenant_key(3)),  # the digest itself is not a key
        "",
        "x" * 513,  # longer than any key
    ],
)
def test_unknown_keys_are_refused_among_100000_tenants(
    directory: TenantDirectory, key: str
) -> None:
    assert directory.authenticate(key) is None


def test_authentication_compares_at_most_one_digest(
    directory: TenantDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real: Callable[[bytes, bytes], bool] = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        nonlocal calls
        calls += 1
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = [tenant_key(TENANTS - 1), ADMIN_KEY, "sk-nobody"]
    principals = [directory.authenticate(key) for key in keys]
    assert [p is not None for p in principals] == [True, True, False]
    assert calls <= len(keys)
