"""Readiness, 503s when the engine is unavailable, mid-stream failures, and metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from server.app import create_app
from server.engines.process import free_loopback_port
from server.settings import Settings
from tests.api.conftest import MODEL, Gateway, engine_at, make_settings, serving
from tests.api.test_errors import assert_envelope
from tests.api.test_metrics_endpoint import scrape
from tests.api.test_openai_routes import chat_body, sse_events
from tests.support import TENANT_KEYS

HEADERS = {"Authorization": f"Bearer {TENANT_KEYS['acme']}"}


def gateway_on(settings: Settings, engine_url: str) -> TestClient:
    return TestClient(create_app(settings, engine=engine_at(engine_url)))


def test_healthy_engine_is_ready(gateway: Gateway) -> None:
    assert gateway.client.get("/healthz").status_code == 200
    assert gateway.client.get("/readyz").json() == {"status": "ready"}


def test_unhealthy_engine_makes_readyz_and_requests_503(gateway: Gateway) -> None:
    gateway.knobs.healthy = False
    deadline = time.monotonic() + 5
    while gateway.client.get("/readyz").status_code == 200:
        assert time.monotonic() < deadline, "readyz never noticed the engine going down"
        time.sleep(0.05)
    response = gateway.client.post("/v1/chat/completions", json=chat_body(), headers=HEADERS)
    assert_envelope(response, 503)
    assert int(response.headers["retry-after"]) > 0
    assert gateway.engine_calls == 0
    assert gateway.client.get("/healthz").status_code == 200  # alive, just not ready

    gateway.knobs.healthy = True
    deadline = time.monotonic() + 5
    while gateway.client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "readyz never recovered"
        time.sleep(0.05)


@pytest.fixture
def unreachable_engine(tmp_path: Path) -> Iterator[TestClient]:
    nobody = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens: connection refused
    with gateway_on(make_settings(tmp_path), nobody) as client:
        yield client


def test_unreachable_engine_is_503_with_retry_after(unreachable_engine: TestClient) -> None:
    readyz = unreachable_engine.get("/readyz")
    assert assert_envelope(readyz, 503)["code"] == "engine_unavailable"
    assert int(readyz.headers["retry-after"]) > 0
    response = unreachable_engine.post("/v1/chat/completions", json=chat_body(), headers=HEADERS)
    assert assert_envelope(response, 503)["code"] == "engine_unavailable"
    assert "retry-after" in response.headers


async def dies_mid_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """An engine that is healthy and serves our model, then dies after the first event of a
    stream."""
    if scope["path"] in ("/health", "/v1/models"):
        models = {"object": "list", "data": [{"id": MODEL, "max_model_len": 2048}]}
        body = json.dumps(models).encode() if scope["path"] == "/v1/models" else b""
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n'
    await send({"type": "http.response.body", "body": event, "more_body": True})
    # Dead a moment after the event, not in the same instant: on a loaded machine the client
    # would otherwise see the reset before it read the event (aiohttp then drops the buffer).
    await asyncio.sleep(0.2)
    raise RuntimeError("engine died")  # the server drops the connection mid-body


def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event(tmp_path: Path) -> None:
    with (
        serving(dies_mid_stream) as url,
        gateway_on(make_settings(tmp_path), url) as client,
    ):
        response = client.post("/v1/chat/completions", json=chat_body(stream=True), headers=HEADERS)
        events = sse_events(response.text)
        assert response.status_code == 200
        assert '"Hel"' in events[0]
        assert '"engine_unavailable"' in events[1]
        assert events[-1] == "[DONE]"
        assert client.get("/readyz").status_code == 503  # marked down at once


def test_metrics_count_requests_by_route_and_status(gateway: Gateway) -> None:
    gateway.client.post("/v1/chat/completions", json=chat_body(), headers=gateway.headers())
    gateway.client.post(
        "/v1/chat/completions", json=chat_body(stream=True), headers=gateway.headers()
    )
    gateway.client.post("/v1/chat/completions", json=chat_body())  # 401
    gateway.client.get("/v1/does-not-exist/" + "x" * 50, headers=gateway.headers())
    text = scrape(gateway)
    assert 'loragate_requests_total{route="/v1/chat/completions",status="200"} 2.0' in text
    assert 'loragate_requests_total{route="/v1/chat/completions",status="401"} 1.0' in text
    assert 'loragate_requests_total{route="other",status="404"} 1.0' in text
    assert 'loragate_time_to_first_token_seconds_count{route="/v1/chat/completions"} 1.0' in text
    assert 'loragate_engine_up{engine="local"} 1.0' in text
    assert "xxxxx" not in text  # raw paths never become label values
