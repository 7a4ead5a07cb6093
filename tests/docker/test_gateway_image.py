"""The gateway image, really built and run: on a Docker daemon of the test's own, from a base
made with debootstrap (no registry is reachable), it serves /healthz as a non-root user, Docker's
HEALTHCHECK reports it healthy, and it stops promptly on SIGTERM (its init forwards the signal:
python as PID 1 would ignore it and `docker stop` would wait out its whole timeout).

About two minutes on a fresh machine (debootstrap, then pip in the build); deselect with
`-m "not docker"`. `make docker` installs docker.io and debootstrap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.engines.process import free_loopback_port
from tests.docker_daemon import DockerDaemon, missing_tools
from tests.support import ENGINE_KEY, write_tenants_file

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
BASE_TAG = "loragate-test-base:bookworm"
IMAGE_TAG = "loragate-gateway:test"
CACHE_DIR = Path.home() / ".cache" / "loragate" / "test-images"
STOP_TIMEOUT_S = 30
# Well under STOP_TIMEOUT_S: a server that ignored SIGTERM would take all of it.
PROMPT_STOP_S = 10


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerDaemon]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: run `make docker`")
    daemon = DockerDaemon(tmp_path_factory.mktemp("docker"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def gateway_image(daemon: DockerDaemon) -> str:
    daemon.import_base_image(BASE_TAG, CACHE_DIR)
    daemon.docker(
        "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_TAG}",
        "-f", str(ROOT / "deploy/docker/gateway.Dockerfile"), "-t", IMAGE_TAG, str(ROOT),
        timeout=900,
    )  # fmt: skip
    return IMAGE_TAG


@pytest.fixture
def gateway_container(
    daemon: DockerDaemon, gateway_image: str, tmp_path: Path
) -> Iterator[tuple[str, int]]:
    """The gateway in front of an engine that is not there: it lives (/healthz), not ready."""
    tenants = write_tenants_file(tmp_path / "tenants.yaml")
    tenants.chmod(0o644)  # the container's user is not the test's
    port = free_loopback_port()
    name = f"loragate-gateway-test-{port}"
    daemon.docker(
        "run", "--detach", "--name", name, "--network", "host",
        "--health-interval", "1s", "--health-start-period", "30s",
        "--volume", f"{tenants}:/etc/loragate/tenants.yaml:ro",
        "--env", "LORAGATE_TENANTS_FILE=/etc/loragate/tenants.yaml",
        "--env", f"LORAGATE_PORT={port}",
        "--env", f"LORAGATE_METRICS__PORT={free_loopback_port()}",
        "--env", f"LORAGATE_ENGINE__API_KEY={ENGINE_KEY}",
        "--env", f"LORAGATE_ENGINE__URLS=[\"http://127.0.0.1:{free_loopback_port()}\"]",
        gateway_image,
    )  # fmt: skip
    try:
        yield name, port
    finally:
        daemon.docker("rm", "--force", name, check=False)


def _inspect(daemon: DockerDaemon, name: str) -> dict[str, object]:
    state: dict[str, object] = json.loads(daemon.docker("inspect", name).stdout)[0]
    return state


def _wait_for(what: str, check: object, timeout_s: float, logs: DockerDaemon, name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s} s; logs:\n{logs.docker('logs', name).stderr}")


def _healthz(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_gateway_image_serves_healthz_as_a_non_root_user_and_stops_on_sigterm(
    daemon: DockerDaemon, gateway_container: tuple[str, int]
) -> None:
    name, port = gateway_container
    _wait_for("/healthz answered 200", lambda: _healthz(port), 60, daemon, name)
    # Live but not ready: its one engine does not exist.
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 503

    uid = daemon.docker("exec", name, "id", "-u").stdout.strip()
    assert uid != "0" and uid == "10001"
    processes = daemon.docker("top", name, "-o", "uid,pid,args").stdout.splitlines()[1:]
    assert processes and all(line.split()[0] == "10001" for line in processes), processes
    assert any("dumb-init" in line for line in processes), processes

    def healthy() -> bool:
        state = _inspect(daemon, name)["State"]
        assert isinstance(state, dict)
        return bool(state["Health"]["Status"] == "healthy")

    _wait_for("Docker's HEALTHCHECK reported healthy", healthy, 60, daemon, name)

    started = time.monotonic()
    daemon.docker("stop", "--time", str(STOP_TIMEOUT_S), name, timeout=STOP_TIMEOUT_S + 30)
    took = time.monotonic() - started
    state = _inspect(daemon, name)["State"]
    assert isinstance(state, dict)
    logs = daemon.docker("logs", name).stderr
    assert took < PROMPT_STOP_S, f"docker stop took {took:.1f} s; logs:\n{logs}"
    assert "Application shutdown complete" in logs
    # 143 (128 + SIGTERM): uvicorn re-raises the signal it drained on; never 137 (SIGKILL).
    assert state["ExitCode"] in (0, 143), state
    assert not state["OOMKilled"]
