"""Metrics live on their own listener, not the public port; a deleted adapter's series go with
it; names from the URL cannot forge log lines."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest

from server.engines.process import free_loopback_port
from server.metrics_server import MetricsListenerError, start_metrics_listener
from server.settings import MetricsSettings
from tests.adapter_factory import write_peft_adapter
from tests.api.conftest import MODEL, Gateway
from tests.api.test_adapters_admin import URL, upload
from tests.api.test_openai_routes import chat_body
from tests.support import fake_serve_env

LORAGATE = str(Path(sys.executable).parent / "loragate")
TOKENS = 'loragate_generation_tokens_total{kind="completion",mode="hotswap",model="acme/helper"}'
REQUESTS = 'loragate_generation_requests_total{mode="hotswap",model="acme/helper"}'


def scrape(gateway: Gateway) -> str:
    """What the metrics listener of this gateway would serve (its registry, exposed)."""
    return generate_latest(gateway.app.state.metrics.registry).decode()


def test_public_port_has_no_metrics(gateway: Gateway) -> None:
    gateway.client.get("/healthz")
    assert gateway.client.get("/metrics").status_code == 404
    assert "loragate_requests_total" in scrape(gateway)


def test_listener_serves_the_apps_registry(gateway: Gateway) -> None:
    assert gateway.app.state.metrics is gateway.app.state.services.metrics
    listener = start_metrics_listener(
        gateway.app.state.metrics.registry, MetricsSettings(host="127.0.0.1", port=0)
    )
    try:
        gateway.client.get("/healthz")
        response = httpx.get(listener.url, timeout=5)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        assert 'loragate_requests_total{route="/healthz",status="200"} 1.0' in response.text
    finally:
        listener.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(listener.url, timeout=5)


def test_taken_metrics_port_is_a_clear_error(gateway: Gateway) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsListenerError, match=f"cannot listen for metrics on .*:{port}"):
            start_metrics_listener(
                gateway.app.state.metrics.registry, MetricsSettings(host="127.0.0.1", port=port)
            )


def test_deleted_adapters_series_are_removed(gateway: Gateway, tmp_path: Path) -> None:
    upload(gateway, write_peft_adapter(tmp_path / "a", seed=0), name="helper")
    for model in ("helper", MODEL):
        body = {**chat_body("one two"), "model": model}
        assert gateway.client.post(
            "/v1/chat/completions", json=body, headers=gateway.headers()
        ).is_success
    before = scrape(gateway)
    assert TOKENS in before and REQUESTS in before
    deleted = gateway.client.delete(URL.format(tenant="acme", name="helper"), headers=gateway.admin)
    assert deleted.status_code == 200
    after = scrape(gateway)
    assert 'model="acme/helper"' not in after
    assert f'loragate_generation_requests_total{{mode="base",model="{MODEL}"}} 1.0' in after


def test_name_with_line_break_logs_one_line(
    gateway: Gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = write_peft_adapter(tmp_path / "a", seed=0)
    with caplog.at_level(logging.INFO, logger="server.adapter_admin"):
        response = upload(gateway, adapter, name="x%0aWARNING forged: admin key ok")
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_name"
    [refused] = [r for r in caplog.records if r.name == "server.adapter_admin"]
    message = refused.getMessage()  # escaped at the source, before any formatter
    assert "\n" not in message
    assert "acme/x\\nWARNING forged: admin key ok refused" in message


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int, Path]]:
    """`loragate serve` with the fake engine; (process, public port, metrics port, log)."""
    port, metrics_port = free_loopback_port(), free_loopback_port()
    env = fake_serve_env(tmp_path, port=port, metrics_port=metrics_port)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([LORAGATE, "serve"], env=env, stdout=out, stderr=out)
    try:
        yield proc, port, metrics_port, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_splits_metrics_from_the_public_port(
    serve: tuple[subprocess.Popen[bytes], int, int, Path],
) -> None:
    proc, port, metrics_port, log = serve
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 404
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert 'loragate_requests_total{route="/readyz",status="200"}' in text
    assert 'loragate_engine_up{engine="local"} 1.0' in text
    proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once it has shut down gracefully
    assert proc.wait(30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):  # stopped with the server
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)


def test_serve_with_taken_metrics_port_exits_before_the_engine(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = fake_serve_env(
            tmp_path, port=free_loopback_port(), metrics_port=taken.getsockname()[1]
        )
        done = subprocess.run(
            [LORAGATE, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 3, output
    assert "cannot listen for metrics on 127.0.0.1" in output
    assert not (tmp_path / "cache" / "logs").exists()  # no engine was started
