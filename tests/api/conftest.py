"""The gateway in-process, in front of the fake engine (through httpx's ASGI transport)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.app import create_app
from server.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.settings import Settings
from server.vllm_engine import VllmEngine
from tests.adapter_factory import SMOLLM2_CONFIG
from tests.support import ADMIN_KEY, TENANT_KEYS, write_tenants_file

MODEL = "test-model"


@dataclass
class Gateway:
    client: TestClient
    app: FastAPI
    knobs: FakeEngineKnobs
    fake: FastAPI
    settings: Settings

    def headers(self, tenant: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    @property
    def engine_calls(self) -> int:
        return int(self.fake.state.stats.generate_calls)


def make_settings(
    tmp_path: Path, limits: dict[str, dict[str, int]] | None = None, **overrides: object
) -> Settings:
    # model.path points at an empty dir: no tokenizer there, so prompt length is left to the
    # engine, except in tests that bring a tokenizer.
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    # The base model's shapes, which uploads are validated against (SmolLM2's).
    (model_dir / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    return Settings(
        tenants_file=write_tenants_file(tmp_path / "tenants.yaml", limits),
        cache_dir=tmp_path / "cache",
        model={"name": MODEL, "path": model_dir, "max_model_len": 2048},
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
def knobs() -> FakeEngineKnobs:
    return FakeEngineKnobs(model=MODEL)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path,
        engine={"health_interval_s": 0.2, "max_loras": 2},
        max_loaded_adapters=2,
        adapters={"max_upload_bytes": 8 << 20},
    )


@contextlib.contextmanager
def running_gateway(
    settings: Settings, knobs: FakeEngineKnobs, fake: FastAPI | None = None
) -> Iterator[Gateway]:
    """A gateway app in front of a fake engine (a new one unless `fake` is shared)."""
    fake = fake or create_fake_engine_app(knobs)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(fake), base_url="http://engine")
    app = create_app(settings, engine=VllmEngine(client))
    with TestClient(app) as test_client:
        yield Gateway(test_client, app, knobs, fake, settings)


@pytest.fixture
def gateway(settings: Settings, knobs: FakeEngineKnobs) -> Iterator[Gateway]:
    with running_gateway(settings, knobs) as gw:
        yield gw
