"""Readiness never lies: the engine must serve our base model with at least our context, read
each time it comes up; /readyz says why not, and no engine-side name reaches a caller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.engines.base import ServedModel
from server.engines.monitor import EngineMonitor
from server.metrics import Metrics
from server.settings import EngineSettings, ModelSettings
from tests.api.conftest import MODEL, Gateway, make_settings, running_gateway, serving
from tests.api.test_errors import assert_envelope
from tests.api.test_openai_routes import chat_body

POLL_S = 0.1
# Another replica's tenant's adapter, loaded on the shared engine: never to be named to anyone.
ADAPTER = "lg-" + "0123456789abcdef" * 4
ADAPTER_PATH = "/srv/loragate/store/blobs/" + "0123456789abcdef" * 4


@contextlib.contextmanager
def gateway_for(tmp_path: Path, knobs: FakeEngineKnobs) -> Iterator[Gateway]:
    fake = create_fake_engine_app(knobs)
    fake.state.stats.adapters[ADAPTER] = ADAPTER_PATH
    settings = make_settings(tmp_path, engine={"health_interval_s": POLL_S})
    with serving(fake) as url:
        fake.state.url = url
        with running_gateway(settings, knobs, fake) as gw:
            yield gw


def not_ready(gw: Gateway) -> dict[str, Any]:
    """/readyz's 503 error, checked for what it must carry and must never show."""
    response = gw.client.get("/readyz")
    error = assert_envelope(response, 503)
    assert int(response.headers["retry-after"]) > 0
    assert "lg-" not in response.text and "/srv/" not in response.text
    return error


def readyz_code(gw: Gateway) -> str | None:
    response = gw.client.get("/readyz")
    return None if response.status_code == 200 else str(response.json()["error"]["code"])


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def model_list_calls(gw: Gateway) -> int:
    return int(gw.fake.state.stats.model_list_calls)


def test_engine_serving_another_name_is_not_ready_and_says_what_it_serves(
    tmp_path: Path,
) -> None:
    with gateway_for(tmp_path, FakeEngineKnobs(model="other-base")) as gw:
        error = not_ready(gw)
        assert error["code"] == "engine_model_mismatch"
        assert f"`{MODEL}`" in error["message"] and "`other-base`" in error["message"]
        response = gw.client.post("/v1/chat/completions", json=chat_body(), headers=gw.headers())
        assert_envelope(response, 503)
        assert "retry-after" in response.headers
        assert gw.engine_calls == 0


def test_engine_context_shorter_than_configured_is_not_ready(tmp_path: Path) -> None:
    with gateway_for(tmp_path, FakeEngineKnobs(model=MODEL, max_model_len=1024)) as gw:
        error = not_ready(gw)
        assert error["code"] == "engine_context_too_short"
        assert "1024" in error["message"] and "2048" in error["message"]
        response = gw.client.post("/v1/chat/completions", json=chat_body(), headers=gw.headers())
        assert_envelope(response, 503)
        assert gw.engine_calls == 0


@pytest.mark.parametrize("max_model_len", [2048, 4096, None])
def test_engine_serving_our_model_with_enough_context_is_ready(
    tmp_path: Path, max_model_len: int | None
) -> None:
    with gateway_for(tmp_path, FakeEngineKnobs(model=MODEL, max_model_len=max_model_len)) as gw:
        assert gw.client.get("/readyz").json() == {"status": "ready"}
        response = gw.client.post("/v1/chat/completions", json=chat_body(), headers=gw.headers())
        assert response.status_code == 200


def test_a_model_change_across_a_reconnect_is_noticed(tmp_path: Path) -> None:
    knobs = FakeEngineKnobs(model=MODEL)
    with gateway_for(tmp_path, knobs) as gw:
        assert readyz_code(gw) is None
        knobs.healthy = False
        wait_for(lambda: readyz_code(gw) == "engine_unavailable", "the engine going down")
        knobs.model = "other-base"  # redeployed with another model while it was down
        knobs.healthy = True
        wait_for(lambda: readyz_code(gw) == "engine_model_mismatch", "the mismatch")
        assert "`other-base`" in not_ready(gw)["message"]

        knobs.healthy = False
        wait_for(lambda: readyz_code(gw) == "engine_unavailable", "the engine going down")
        knobs.model = MODEL
        knobs.healthy = True
        wait_for(lambda: readyz_code(gw) is None, "the fixed engine to be ready")


def test_the_model_list_is_read_when_the_engine_comes_up_not_on_every_poll(
    tmp_path: Path,
) -> None:
    knobs = FakeEngineKnobs(model=MODEL)
    with gateway_for(tmp_path, knobs) as gw:
        assert model_list_calls(gw) == 1  # at start-up
        time.sleep(8 * POLL_S)
        assert model_list_calls(gw) == 1
        knobs.healthy = False
        wait_for(lambda: readyz_code(gw) is not None, "the engine going down")
        knobs.healthy = True
        wait_for(lambda: readyz_code(gw) is None, "the engine to be back")
        assert model_list_calls(gw) == 2


def test_a_request_finding_the_engine_unreachable_makes_the_next_poll_recheck(
    tmp_path: Path,
) -> None:
    knobs = FakeEngineKnobs(model=MODEL)
    with gateway_for(tmp_path, knobs) as gw:
        knobs.model = "other-base"  # swapped faster than a poll could see it down
        gw.app.state.services.pool.members[0].monitor.mark_unreachable()
        wait_for(lambda: readyz_code(gw) == "engine_model_mismatch", "the mismatch")


def test_an_unreadable_model_list_is_retried_on_the_next_poll(tmp_path: Path) -> None:
    knobs = FakeEngineKnobs(model=MODEL, models_status=500)
    with gateway_for(tmp_path, knobs) as gw:
        assert not_ready(gw)["code"] == "engine_unavailable"
        calls = model_list_calls(gw)
        wait_for(lambda: model_list_calls(gw) > calls + 1, "the model list to be asked again")
        knobs.models_status = None
        wait_for(lambda: readyz_code(gw) is None, "the engine to be ready")


def test_each_reason_is_logged_once_not_on_every_poll(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.engines.monitor")
    knobs = FakeEngineKnobs(model="other-base")
    with gateway_for(tmp_path, knobs) as gw:
        time.sleep(8 * POLL_S)
        knobs.healthy = False
        wait_for(lambda: readyz_code(gw) == "engine_unavailable", "the engine going down")
        time.sleep(8 * POLL_S)
    lines = [r for r in caplog.records if r.name == "server.engines.monitor"]
    mismatch = [r for r in lines if "engine_model_mismatch" in r.getMessage()]
    assert len(mismatch) == 1 and mismatch[0].levelno == logging.ERROR
    assert "lg-" not in mismatch[0].getMessage()
    down = [r for r in lines if "engine_unavailable" in r.getMessage()]
    assert len(down) == 1 and down[0].levelno == logging.WARNING


def test_an_engine_404_never_shows_what_the_engine_serves(tmp_path: Path) -> None:
    knobs = FakeEngineKnobs(model=MODEL)
    with gateway_for(tmp_path, knobs) as gw:
        knobs.model = "other-base"  # renamed without the gateway seeing it go down
        response = gw.client.post("/v1/chat/completions", json=chat_body(), headers=gw.headers())
        assert assert_envelope(response, 404, param="model")["code"] == "model_not_found"
        assert gw.engine_calls == 1  # the engine did answer, with its alias list
        for engine_side in ("lg-", "other-base", "Valid aliases", "/srv/"):
            assert engine_side not in response.text


class StubEngine:
    """Only the half of the Engine protocol the monitor uses; `served_models` can be held."""

    def __init__(self, served: list[ServedModel]) -> None:
        self.served = served
        self.model_list_calls = 0
        self.asked = asyncio.Event()
        self.hold = asyncio.Event()
        self.hold.set()

    async def health(self) -> bool:
        return True

    async def load(self) -> None:
        return None

    async def served_models(self) -> list[ServedModel]:
        self.model_list_calls += 1
        self.asked.set()
        await self.hold.wait()
        return self.served


class StubProcess:
    """A local engine process that has exited until `start()`."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.starts = 0

    def returncode(self) -> int | None:
        return self.code

    async def stop(self) -> None:
        pass

    def start(self) -> None:
        self.starts += 1
        self.code = None

    async def wait_healthy(self, health: Callable[[], Any], timeout_s: float) -> None:
        await health()


def monitor_for(engine: StubEngine, process: StubProcess | None = None) -> EngineMonitor:
    settings = EngineSettings(health_interval_s=POLL_S, restart=True)
    model = ModelSettings(name=MODEL, max_model_len=2048)
    return EngineMonitor(engine, settings, model, Metrics(), process)  # type: ignore[arg-type]


async def test_a_check_that_began_before_the_engine_was_seen_down_does_not_make_it_ready() -> None:
    engine = StubEngine([ServedModel(MODEL, 2048)])
    monitor = monitor_for(engine)
    engine.hold.clear()
    check = asyncio.create_task(monitor.check_now())
    await engine.asked.wait()
    monitor.mark_unreachable()  # a request failed while the model list was being read
    engine.hold.set()
    assert await check is False
    assert not monitor.ready
    assert await monitor.check_now() is True  # the next poll reads the list again
    assert engine.model_list_calls == 2


async def test_a_restarted_local_engine_has_its_model_list_read_again() -> None:
    engine = StubEngine([ServedModel(MODEL, 2048)])
    process = StubProcess()
    monitor = monitor_for(engine, process)
    assert await monitor.check_now() is True
    task = asyncio.create_task(monitor.run())
    try:
        engine.served = [ServedModel(MODEL, 1024)]  # restarted with a shorter context
        process.code = 1
        deadline = time.monotonic() + 5
        while monitor.reason is None or monitor.reason.code != "engine_context_too_short":
            assert time.monotonic() < deadline, f"the restart went unnoticed: {monitor.reason}"
            await asyncio.sleep(0.01)
        assert process.starts == 1 and engine.model_list_calls == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
