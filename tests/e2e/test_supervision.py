"""`loragate serve` owns its engine process: readiness follows it, it leaves nothing behind.

The fake-engine tests run the same supervision code in seconds; the vLLM ones prove it on the
real engine, whose process tree (api server + engine core) is what must not be orphaned.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.e2e.conftest import BASE_MODEL, VLLM_START_TIMEOUT_S, ServeProcess, start_serve

pytestmark = pytest.mark.e2e

FAKE = {"LORAGATE_ENGINE__KIND": "fake", "LORAGATE_ENGINE__HEALTH_INTERVAL_S": "0.5"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def readyz(serve: ServeProcess) -> int:
    try:
        return httpx.get(f"{serve.url}/readyz", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def assert_all_gone(processes: list[psutil.Process]) -> None:
    assert processes, "nothing was recorded to check"
    _, alive = psutil.wait_procs(processes, timeout=15)
    assert not alive, f"left behind: {alive}"


def kill_engine_then_check_503_and_exit(serve: ServeProcess) -> None:
    serve.engine().kill()
    wait_for(lambda: readyz(serve) == 503, 10, "/readyz to fail")
    client = serve.client(max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=BASE_MODEL, messages=QUESTION, max_tokens=4)  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) > 0
    assert serve.proc.wait(timeout=60) != 0
    assert_all_gone(serve.descendants)


@pytest.fixture
def serve_fake(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServeProcess]:
    env = {**FAKE, **getattr(request, "param", {})}
    serve = start_serve(tmp_path, env=env)
    try:
        serve.wait_ready(60)
        yield serve
    finally:
        serve.stop()


@pytest.mark.parametrize("serve_fake", [{"LORAGATE_ENGINE__EXIT_GRACE_S": "3"}], indirect=True)
def test_fake_engine_killed_gives_503_then_nonzero_exit(serve_fake: ServeProcess) -> None:
    kill_engine_then_check_503_and_exit(serve_fake)


@pytest.mark.parametrize("serve_fake", [{"LORAGATE_ENGINE__RESTART": "true"}], indirect=True)
def test_restart_mode_brings_a_killed_engine_back(serve_fake: ServeProcess) -> None:
    first = serve_fake.engine()
    first.kill()
    wait_for(lambda: readyz(serve_fake) == 503, 10, "/readyz to fail")
    wait_for(lambda: readyz(serve_fake) == 200, 60, "/readyz to recover")
    assert serve_fake.engine().pid != first.pid
    answer = serve_fake.client().chat.completions.create(model=BASE_MODEL, messages=QUESTION)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    assert serve_fake.proc.poll() is None


def assert_clean_sigterm_exit(serve: ServeProcess, timeout_s: float) -> None:
    serve.proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the parent sees it.
    assert serve.proc.wait(timeout=timeout_s) in (0, -signal.SIGTERM)
    assert "engine process" in serve.log() and "stopped" in serve.log()
    assert_all_gone(serve.descendants)


def test_fake_engine_sigterm_leaves_no_process(serve_fake: ServeProcess) -> None:
    assert_clean_sigterm_exit(serve_fake, 30)


def test_vllm_engine_killed_gives_503_then_nonzero_exit(tmp_path: Path) -> None:
    serve = start_serve(tmp_path, env={"LORAGATE_ENGINE__EXIT_GRACE_S": "15"})
    try:
        serve.wait_ready(VLLM_START_TIMEOUT_S)
        assert len(serve.descendants) >= 2, "vLLM runs an api server and an engine core"
        kill_engine_then_check_503_and_exit(serve)
    finally:
        serve.stop()


def test_vllm_sigterm_leaves_no_process(tmp_path: Path) -> None:
    serve = start_serve(tmp_path)
    try:
        serve.wait_ready(VLLM_START_TIMEOUT_S)
        assert_clean_sigterm_exit(serve, 90)
    finally:
        serve.stop()
