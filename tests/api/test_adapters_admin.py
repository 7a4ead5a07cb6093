"""The operator API for adapters, in-process: upload, idempotency, conflicts, refusals, tenancy."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from adapters.types import CONFIG_FILE, WEIGHTS_FILE
from tests.adapter_factory import write_peft_adapter
from tests.api.conftest import Gateway
from tests.api.test_errors import assert_envelope

URL = "/admin/v1/tenants/{tenant}/adapters/{name}"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [write_peft_adapter(root / f"a{i}", seed=i) for i in range(2)]


def upload(
    gateway: Gateway, directory: Path, tenant: str = "acme", name: str = "helper", **params: str
) -> httpx.Response:
    files = {
        "adapter_config": (CONFIG_FILE, (directory / CONFIG_FILE).read_bytes()),
        "adapter_model": (WEIGHTS_FILE, (directory / WEIGHTS_FILE).read_bytes()),
    }
    return gateway.client.put(
        URL.format(tenant=tenant, name=name), files=files, headers=gateway.admin, params=params
    )


def store_blobs(gateway: Gateway) -> list[Path]:
    blobs = gateway.settings.store_path / "blobs"
    return sorted(blobs.iterdir()) if blobs.exists() else []


def test_upload_creates_then_same_content_is_200(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    first = upload(gateway, adapter_dirs[0])
    assert first.status_code == 201, first.text
    record = first.json()
    assert record["tenant"] == "acme" and record["name"] == "helper"
    assert record["rank"] == 8 and record["alpha"] == 16
    assert record["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(record["digest"]) == 64 and record["size_bytes"] > 0
    again = upload(gateway, adapter_dirs[0])
    assert again.status_code == 200
    assert again.headers["x-loragate-result"] == "unchanged"
    assert again.json() == record


def test_different_content_is_409_unless_replace(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    old = upload(gateway, adapter_dirs[0]).json()
    conflict = upload(gateway, adapter_dirs[1])
    assert assert_envelope(conflict, 409)["code"] == "adapter_conflict"
    replaced = upload(gateway, adapter_dirs[1], replace="true")
    assert replaced.status_code == 201
    assert replaced.headers["x-loragate-result"] == "replaced"
    assert replaced.json()["digest"] != old["digest"]


def test_list_show_delete(gateway: Gateway, adapter_dirs: list[Path]) -> None:
    upload(gateway, adapter_dirs[0], name="one")
    upload(gateway, adapter_dirs[1], name="two")
    base = "/admin/v1/tenants/acme/adapters"
    listed = gateway.client.get(base, headers=gateway.admin).json()["data"]
    assert [r["name"] for r in listed] == ["one", "two"]
    assert gateway.client.get(f"{base}/two", headers=gateway.admin).json()["name"] == "two"
    assert gateway.client.delete(f"{base}/two", headers=gateway.admin).status_code == 200
    assert_envelope(gateway.client.get(f"{base}/two", headers=gateway.admin), 404)
    assert_envelope(gateway.client.delete(f"{base}/two", headers=gateway.admin), 404)
    assert len(store_blobs(gateway)) == 1  # the deleted adapter's files are gone too


def test_upload_needs_the_admin_key(gateway: Gateway, adapter_dirs: list[Path]) -> None:
    files = {"adapter_config": (CONFIG_FILE, b"{}"), "adapter_model": (WEIGHTS_FILE, b"x")}
    url = URL.format(tenant="acme", name="x")
    assert_envelope(gateway.client.put(url, files=files), 401)
    assert_envelope(gateway.client.put(url, files=files, headers=gateway.headers()), 403)
    assert_envelope(
        gateway.client.get("/admin/v1/tenants/acme/adapters", headers=gateway.headers()), 403
    )


def test_unknown_tenant_is_404(gateway: Gateway, adapter_dirs: list[Path]) -> None:
    error = assert_envelope(upload(gateway, adapter_dirs[0], tenant="umbrella"), 404, "tenant")
    assert error["code"] == "tenant_not_found"
    missing = gateway.client.get("/admin/v1/tenants/acme/adapters/ghost", headers=gateway.admin)
    assert assert_envelope(missing, 404)["code"] == "adapter_not_found"


@pytest.mark.parametrize("name", ["Upper", "-dash", "a" * 64, "semi;colon", "..", "a b"])
def test_bad_names_are_400(gateway: Gateway, adapter_dirs: list[Path], name: str) -> None:
    response = upload(gateway, adapter_dirs[0], name=name)
    assert response.status_code in (400, 404, 405)  # some never even match the route
    assert store_blobs(gateway) == []


def test_refused_upload_leaves_nothing_behind(gateway: Gateway, adapter_dirs: list[Path]) -> None:
    files = {
        "adapter_config": (CONFIG_FILE, (adapter_dirs[0] / CONFIG_FILE).read_bytes()),
        "adapter_model": ("adapter_model.bin", b"\x80\x04pickle"),
    }
    response = gateway.client.put(
        URL.format(tenant="acme", name="x"), files=files, headers=gateway.admin
    )
    assert_envelope(response, 400, "adapter_model")
    assert store_blobs(gateway) == []
    uploads = gateway.settings.store_path / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


def test_missing_and_extra_fields_are_400(gateway: Gateway, adapter_dirs: list[Path]) -> None:
    url = URL.format(tenant="acme", name="x")
    config = (CONFIG_FILE, (adapter_dirs[0] / CONFIG_FILE).read_bytes())
    missing = gateway.client.put(url, files={"adapter_config": config}, headers=gateway.admin)
    assert_envelope(missing, 400, "adapter_model")
    both = {"adapter_config": config, "adapter_model": (WEIGHTS_FILE, b"x")}
    extra_field = gateway.client.put(url, files=both, data={"note": "hi"}, headers=gateway.admin)
    assert_envelope(extra_field, 400, "note")
    third_file = gateway.client.put(
        url, files={**both, "x.pt": ("x.pt", b"")}, headers=gateway.admin
    )
    assert_envelope(third_file, 400)


def test_upload_over_the_size_limit_is_413(gateway: Gateway) -> None:
    big = b"\0" * (gateway.settings.adapters.max_upload_bytes + 1)
    files = {"adapter_config": (CONFIG_FILE, b"{}"), "adapter_model": (WEIGHTS_FILE, big)}
    response = gateway.client.put(
        URL.format(tenant="acme", name="x"), files=files, headers=gateway.admin
    )
    assert_envelope(response, 413)
