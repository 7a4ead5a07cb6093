from __future__ import annotations

from pathlib import Path

import pytest

from server.tenants import TenantDirectory, TenantsFileError, hash_api_key
from tests.support import ADMIN_KEY, TENANT_KEYS, write_tenants_file


@pytest.fixture
def directory(tmp_path: Path) -> TenantDirectory:
    return TenantDirectory.load(write_tenants_file(tmp_path / "t.yaml"))


def test_tenant_key_identifies_its_tenant(directory: TenantDirectory) -> None:
    principal = directory.authenticate(TENANT_KEYS["globex"])
    assert principal is not None and principal.tenant is not None
    assert principal.tenant.name == "globex" and not principal.is_admin


def test_admin_key_is_admin_and_no_tenant(directory: TenantDirectory) -> None:
    principal = directory.authenticate(ADMIN_KEY)
    assert principal is not None and principal.is_admin and principal.tenant is None


@pytest.mark.parametrize("key", ["", "sk-test-acm", "sk-test-acme ", hash_api_key("sk-test-acme")])
def test_wrong_keys_are_refused(directory: TenantDirectory, key: str) -> None:
    assert directory.authenticate(key) is None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text",
    [
        "tenants: {acme: {api_key_sha256: [plaintext-key]}}",
        "tenants: {Acme!: {api_key_sha256: ['" + "a" * 64 + "']}}",
        "tenants: {acme: {api_key_sha256: []}}",
        "tenants: {acme: {keys: ['" + "a" * 64 + "']}}",
        "tenants: [",
        "!!python/object/apply:os.system ['true']",
    ],
)
def test_invalid_tenants_files_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(TenantsFileError):
        TenantDirectory.load(write(tmp_path, text))


def test_missing_tenants_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TenantsFileError, match="cannot read"):
        TenantDirectory.load(tmp_path / "nope.yaml")


def test_dev_marker_is_read(tmp_path: Path) -> None:
    assert TenantDirectory.load(write(tmp_path, "dev: true\n")).is_dev


def test_shipped_dev_file_holds_the_documented_keys() -> None:
    directory = TenantDirectory.load(Path("deploy/dev/tenants.dev.yaml"))
    assert directory.is_dev
    acme = directory.authenticate("sk-dev-acme")
    assert acme is not None and acme.tenant is not None and acme.tenant.name == "acme"
    admin = directory.authenticate("sk-dev-admin")
    assert admin is not None and admin.is_admin


def test_limits_are_read_per_tenant(tmp_path: Path) -> None:
    path = write_tenants_file(
        tmp_path / "t.yaml", {"acme": {"requests_per_minute": 5, "max_concurrent": 2}}
    )
    directory = TenantDirectory.load(path)
    acme, globex = directory.tenant("acme"), directory.tenant("globex")
    assert acme is not None and globex is not None
    assert (acme.limits.requests_per_minute, acme.limits.max_concurrent) == (5, 2)
    assert acme.limits.tokens_per_minute is None
    assert globex.limits.requests_per_minute is None  # no block: unlimited


@pytest.mark.parametrize(
    "limits",
    [{"requests_per_minute": 0}, {"tokens_per_minute": -1}, {"burst": 5}, {"max_concurrent": "x"}],
)
def test_bad_limits_are_refused(tmp_path: Path, limits: dict[str, object]) -> None:
    path = write_tenants_file(tmp_path / "t.yaml", {"acme": limits})  # type: ignore[dict-item]
    with pytest.raises(TenantsFileError):
        TenantDirectory.load(path)


def test_the_dev_file_is_valid() -> None:
    dev = TenantDirectory.load(Path(__file__).parents[2] / "deploy/dev/tenants.dev.yaml")
    assert dev.is_dev and dev.tenant("acme") is not None
