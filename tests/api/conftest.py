"""The gateway in-process, in front of the fake engine served on a loopback port (in a thread), so
the gateway's real HTTP client is what talks to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import ASGIApp

from server.app import create_app
from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.engines.openai_http import OpenAIHttpEngine
from server.engines.process import free_loopback_port
from server.settings import Settings
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

    def send_together(
        self, bodies: list[dict[str, Any]], path: str = "/v1/chat/completions"
    ) -> list[httpx.Response]:
        """POST every body at once, as acme; the responses in order."""

        async def run() -> list[httpx.Response]:
            transport = httpx.ASGITransport(self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                headers = self.headers()
                requests = [client.post(path, json=b, headers=headers) for b in bodies]
                return list(await asyncio.gather(*requests))

        # On the loop the app's lifespan runs on: its locks and clients belong to that loop.
        return self.client.portal.call(run)  # type: ignore[union-attr,no-any-return]


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
def serving(app: ASGIApp, *, lifespan: bool = False) -> Iterator[str]:
    """Serve `app` on a free loopback port from a thread; yields its base URL. With `lifespan`,
    the app's lifespan runs too (a gateway's services live there)."""
    port = free_loopback_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on" if lifespan else "off",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"engine-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def engine_at(url: str) -> OpenAIHttpEngine:
    return OpenAIHttpEngine(url, request_timeout_s=60, connect_timeout_s=2)


@contextlib.contextmanager
def running_gateway(
    settings: Settings, knobs: FakeEngineKnobs, fake: FastAPI | None = None
) -> Iterator[Gateway]:
    """A gateway app in front of a fake engine; a new one unless `fake` is given (served
    already by `serving`, and shared)."""
    with contextlib.ExitStack() as stack:
        if fake is None:
            fake = create_fake_engine_app(knobs)
            fake.state.url = stack.enter_context(serving(fake))
        app = create_app(settings, engine=engine_at(fake.state.url))
        test_client = stack.enter_context(TestClient(app))
        yield Gateway(test_client, app, knobs, fake, settings)


@pytest.fixture
def gateway(settings: Settings, knobs: FakeEngineKnobs) -> Iterator[Gateway]:
    with running_gateway(settings, knobs) as gw:
        yield gw
