"""The engine port's guard: every route but the health probes needs the shared secret."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from server.engine_servers.engine_guard import API_KEY_ENV, EngineGuard

KEY = "engine-secret-0123456789abcdef"
PATHS = ("/health", "/ping", "/v1/models", "/tokenize", "/metrics", "/v1/load_lora_adapter")


def guarded(key: str | None = KEY) -> httpx.AsyncClient:
    async def ok(_: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in PATHS])
    transport = httpx.ASGITransport(EngineGuard(app, api_key=key))
    return httpx.AsyncClient(transport=transport, base_url="http://engine")


@pytest.mark.parametrize("path", PATHS[2:])
async def test_every_route_but_the_probes_needs_the_key(path: str) -> None:
    async with guarded() as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = await client.post(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["message"] == "Unauthorized"
        ok = await client.post(path, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


async def test_the_probes_stay_open() -> None:
    async with guarded() as client:
        for path in ("/health", "/ping"):
            assert (await client.get(path)).status_code == 200


def test_an_engine_without_its_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=API_KEY_ENV):
        guarded(None)
    monkeypatch.setenv(API_KEY_ENV, KEY)
    guarded(None)  # read from the environment, as vLLM's --middleware builds it
