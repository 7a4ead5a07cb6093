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
