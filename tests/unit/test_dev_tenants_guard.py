"""The dev tenants file (public keys) is refused on a reachable address unless explicitly allowed:
the address rule, the loader, and `loragate serve` refusing before any engine is started."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from server.app import DEV_TENANTS_WARNING, load_tenants
from server.engines.process import free_loopback_port
from server.settings import Settings
from server.tenants import DevTenantsExposedError, is_loopback_host, open_tenants_file
from tests.support import fake_serve_env, write_tenants_file

DEV_FILE = Path(__file__).resolve().parents[2] / "deploy" / "dev" / "tenants.dev.yaml"
LORAGATE = str(Path(sys.executable).parent / "loragate")


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.10.20.30", "127.255.255.254", "::1", "[::1]", "localhost", "LocalHost",
     "localhost.", "::ffff:127.0.0.1"],
)  # fmt: skip
def test_loopback_addresses(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "::", "", "10.0.0.5", "192.168.1.20", "128.0.0.1", "::ffff:10.0.0.1", "fe80::1",
     "example.com", "localhost.example.com", "my-laptop", "127.0.0.1.nip.io"],
)  # fmt: skip
def test_every_other_address_is_reachable(host: str) -> None:
    assert not is_loopback_host(host)


def test_dev_file_is_refused_on_all_interfaces() -> None:
    with pytest.raises(DevTenantsExposedError, match="not a loopback address") as refused:
        open_tenants_file(DEV_FILE, "0.0.0.0", allow_dev=False)
    assert "--allow-dev-tenants" in str(refused.value)


def test_dev_file_is_served_on_loopback_or_when_allowed() -> None:
    assert open_tenants_file(DEV_FILE, "127.0.0.1", allow_dev=False).is_dev
    assert open_tenants_file(DEV_FILE, "0.0.0.0", allow_dev=True).is_dev


def test_own_tenants_file_is_served_anywhere(tmp_path: Path) -> None:
    own = write_tenants_file(tmp_path / "tenants.yaml")
    assert not open_tenants_file(own, "0.0.0.0", allow_dev=False).is_dev


def test_allowed_by_env_still_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LORAGATE_ALLOW_DEV_TENANTS", "true")
    settings = Settings(tenants_file=DEV_FILE, host="0.0.0.0")
    assert settings.allow_dev_tenants
    with caplog.at_level(logging.WARNING, logger="server.app"):
        assert load_tenants(settings).is_dev
    assert DEV_TENANTS_WARNING in caplog.messages


def test_app_refuses_dev_file_on_reachable_host() -> None:
    # What the lifespan runs first, before any engine: also refuses without the CLI.
    with pytest.raises(DevTenantsExposedError):
        load_tenants(Settings(tenants_file=DEV_FILE, host="::"))


def test_serve_on_all_interfaces_with_dev_file_exits_before_starting_anything(
    tmp_path: Path,
) -> None:
    env = fake_serve_env(
        tmp_path,
        port=free_loopback_port(),
        metrics_port=free_loopback_port(),
        LORAGATE_TENANTS_FILE=str(DEV_FILE),
    )
    env.pop("LORAGATE_ALLOW_DEV_TENANTS", None)
    done = subprocess.run(
        [LORAGATE, "serve", "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert done.returncode == 2, output
    assert "refusing to serve the dev tenants file" in output
    assert "--allow-dev-tenants" in output
    # No engine was started: it would have written its log under the cache dir.
    assert not (tmp_path / "cache" / "logs").exists()
    assert "engine process" not in output
