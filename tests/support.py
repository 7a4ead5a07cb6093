"""Helpers shared by the test tiers (and the benchmarks): test tenants with known keys, and
the request count of a vLLM engine from its own metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from server.tenants import hash_api_key

ADMIN_KEY = "sk-test-admin"
TENANT_KEYS = {"acme": "sk-test-acme", "globex": "sk-test-globex", "initech": "sk-test-initech"}
# The secret gateways and engines share (LORAGATE_ENGINE__API_KEY), fixed so that tests can call
# an engine directly and more gateways can share it.
ENGINE_KEY = "sk-test-engine-secret"
ENGINE_HEADERS = {"Authorization": f"Bearer {ENGINE_KEY}"}


def write_tenants_file(path: Path, limits: dict[str, dict[str, int]] | None = None) -> Path:
    """The test tenants; `limits` maps a tenant to its `limits` block."""
    tenants: dict[str, Any] = {
        name: {"api_key_sha256": [hash_api_key(key)]} for name, key in TENANT_KEYS.items()
    }
    for name, block in (limits or {}).items():
        tenants[name]["limits"] = block
    config = {"admin": {"api_key_sha256": [hash_api_key(ADMIN_KEY)]}, "tenants": tenants}
    path.write_text(yaml.safe_dump(config))
    return path


def vllm_finished_requests(engine_url: str) -> float:
    """Requests a vLLM engine has finished, from its `vllm:request_success` counters."""
    text = httpx.get(f"{engine_url}/metrics", headers=ENGINE_HEADERS, timeout=10).text
    samples = [line for line in text.splitlines() if line.startswith("vllm:request_success")]
    if not samples:
        raise RuntimeError(f"{engine_url} exports no vllm:request_success metric")
    return sum(float(line.rsplit(" ", 1)[1]) for line in samples)


def settled_vllm_requests(engine_url: str, at_least: float) -> float:
    """vLLM counts a request a moment after answering it: wait for `at_least`, then a little
    longer for any request beyond it."""
    deadline = time.monotonic() + 10
    while vllm_finished_requests(engine_url) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    return vllm_finished_requests(engine_url)


def fake_serve_env(tmp_path: Path, *, port: int, metrics_port: int, **extra: str) -> dict[str, str]:
    """The environment of a `loragate serve` subprocess on the fake engine: the test tenants, its
    own cache dir under `tmp_path`, the given public and metrics ports, and `extra` on top."""
    return {
        **os.environ,
        "LORAGATE_ENGINE__KIND": "fake",
        "LORAGATE_TENANTS_FILE": str(write_tenants_file(tmp_path / "tenants.yaml")),
        "LORAGATE_CACHE_DIR": str(tmp_path / "cache"),
        "LORAGATE_MODEL__PATH": str(tmp_path / "model"),
        "LORAGATE_PORT": str(port),
        "LORAGATE_METRICS__PORT": str(metrics_port),
        **extra,
    }
