"""The fleet on loopback: two `loragate engine` processes (real vLLM), two `loragate serve`
gateways in front of both, sharing a real redis-server and an S3 store (moto's server over
HTTP). Nothing else is shared: each process has its own cache dir, so an adapter reaches an
engine only through the store, fetched and verified by the engine's resolver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import psutil
import pytest

from server.engines.process import free_loopback_port
from tests.adapter_factory import write_peft_adapter
from tests.e2e.conftest import (
    BASE_MODEL,
    LORAGATE,
    VLLM_START_TIMEOUT_S,
    ServeProcess,
    default_model_path,
    start_serve,
)
from tests.e2e.reference import greedy_references
from tests.moto_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, MotoServer
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, TENANT_KEYS

pytestmark = pytest.mark.e2e

ENGINE_KEY = "fleet-engine-secret-0123456789"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12
MIN_MARGIN = 0.02  # see test_adapters: near-ties may differ between two correct kernels
MAX_RUNNING = 4  # per engine, so a few streams saturate one


@dataclass
class EngineProc:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def vllm(self) -> psutil.Process:
        """The vLLM process `loragate engine` supervises (the leader of its own group)."""
        children = psutil.Process(self.proc.pid).children()
        assert len(children) == 1, children
        return children[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Fleet:
    engines: list[EngineProc]
    gateways: list[ServeProcess]
    s3: Any  # a boto3 S3 client on the store's bucket
    bucket: str
    adapters: Path


def start_engine(tmp: Path, env: dict[str, str]) -> EngineProc:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    log_path = tmp / "engine.log"
    full_env = {**os.environ, **env, "LORAGATE_CACHE_DIR": str(tmp / "cache")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [LORAGATE, "engine", "--host", "127.0.0.1", "--port", str(port), "--restart"],
            env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return EngineProc(proc, port, log_path)


def wait_until(what: str, check: Any, timeout_s: float, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    moto = MotoServer(root)
    moto.start()
    aws = {
        "AWS_ENDPOINT_URL": moto.url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
    }
    s3 = boto3.client(
        "s3", endpoint_url=moto.url, region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY,
    )  # fmt: skip
    bucket = "loragate-fleet"
    s3.create_bucket(Bucket=bucket)
    common = {
        **aws,
        "LORAGATE_STORE_URL": f"s3://{bucket}/fleet",
        "LORAGATE_ENGINE__API_KEY": ENGINE_KEY,
        "LORAGATE_MODEL__PATH": str(default_model_path()),
        "LORAGATE_ENGINE__DTYPE": "float32",  # compared with transformers+PEFT in fp32
    }
    engines: list[EngineProc] = []
    gateways: list[ServeProcess] = []
    try:
        engines = [start_engine(root / f"engine{i}", common) for i in range(2)]
        for engine in engines:
            deadline = time.monotonic() + VLLM_START_TIMEOUT_S
            while not engine.healthy():
                assert engine.proc.poll() is None, engine.log()
                assert time.monotonic() < deadline, engine.log()
                time.sleep(1)
        urls = [arg for e in engines for arg in ("--engine-url", e.url)]
        gateway_env = {
            **common,
            "LORAGATE_REDIS_URL": redis_server.url,
            "LORAGATE_ADMISSION__MAX_RUNNING": str(MAX_RUNNING),
            "LORAGATE_ENGINE__HEALTH_INTERVAL_S": "0.5",
        }
        for i in range(2):
            (root / f"gateway{i}").mkdir()
            gateways.append(start_serve(root / f"gateway{i}", env=gateway_env, args=urls))
        for gateway in gateways:
            gateway.wait_ready(120)
        yield Fleet(engines, gateways, s3, bucket, root / "adapters")
    finally:
        for gateway in gateways:
            gateway.stop()
        for engine in engines:
            engine.stop()
        moto.stop()


def admin(gateway: ServeProcess, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, f"{gateway.url}/admin/v1/{path}",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60, **kwargs,
    )  # fmt: skip


def engines_view(gateway: ServeProcess) -> dict[str, dict[str, Any]]:
    response = admin(gateway, "GET", "engines")
    assert response.status_code == 200, response.text
    return {e["name"]: e for e in response.json()["data"]}


def chat(gateway: ServeProcess, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0}
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=body | extra,
        # Every request reaches an engine: these tests are about engines, not the cache.
        headers={"Authorization": f"Bearer {TENANT_KEYS['acme']}", "Cache-Control": "no-cache"},
        timeout=300,
    )


def metric(gateway: ServeProcess, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(gateway.metrics_url, timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def loads_by_engine(gateway: ServeProcess, fleet: Fleet) -> dict[str, float]:
    name = "loragate_adapter_loads_total"
    return {e.name: metric(gateway, name, engine=e.name, result="ok") for e in fleet.engines}


def new_adapter(fleet: Fleet, seed: int) -> tuple[Path, str]:
    """A PEFT adapter and its transformers + PEFT greedy answer, with no near-tie in it."""
    while True:
        directory = write_peft_adapter(fleet.adapters / f"s{seed}", seed=seed, scale=3.0)
        [ref] = greedy_references(default_model_path(), [directory], QUESTION, MAX_TOKENS)
        if ref.min_margin >= MIN_MARGIN:
            return directory, ref.text
        seed += 1000


def open_stream(gateway: ServeProcess, model: str, max_tokens: int) -> Iterator[bytes]:
    """A streamed chat request, started: its first event has arrived when this returns."""
    body = {
        "model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "ignore_eos": True,
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {TENANT_KEYS['acme']}", "Cache-Control": "no-cache"}
    client = httpx.Client(timeout=300)
    cm = client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers)
    response = cm.__enter__()
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))

    def rest() -> Iterator[bytes]:
        try:
            yield first.encode()
            for line in lines:
                if line.startswith("data: "):
                    yield line.encode()
        finally:
            cm.__exit__(None, None, None)
            client.close()

    return rest()


def test_upload_on_one_gateway_serves_on_the_other_and_delete_reaches_both(fleet: Fleet) -> None:
    a, b = fleet.gateways
    directory, reference = new_adapter(fleet, seed=501)
    assert a.admin_put("acme", "shared", directory).status_code == 201
    answer = chat(b, "shared")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == reference
    listed = httpx.get(
        f"{b.url}/v1/models", headers={"Authorization": f"Bearer {TENANT_KEYS['acme']}"}
    ).json()
    assert "shared" in [m["id"] for m in listed["data"]]
    assert chat(a, "shared").status_code == 200  # A holds the record in memory now
    assert admin(b, "DELETE", "tenants/acme/adapters/shared").status_code == 200
    deleted_at = time.monotonic()
    wait_until("404 through A", lambda: chat(a, "shared").status_code == 404, 2.0, 0.1)
    assert time.monotonic() - deleted_at < 2.0


def test_one_adapter_loads_once_and_two_hot_ones_go_to_different_engines(fleet: Fleet) -> None:
    a = fleet.gateways[0]
    directory, _ = new_adapter(fleet, seed=601)
    assert a.admin_put("acme", "hot", directory).status_code == 201
    before = loads_by_engine(a, fleet)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: chat(a, "hot").status_code, range(20)))
    assert statuses == [200] * 20
    after = loads_by_engine(a, fleet)
    grown = {name: after[name] - before[name] for name in after}
    assert sorted(grown.values()) == [0, 1], grown  # one load in all, on one engine

    digests = {}
    for name, seed in (("x", 701), ("y", 801)):
        directory, _ = new_adapter(fleet, seed=seed)
        response = a.admin_put("acme", name, directory)
        assert response.status_code == 201, response.text
        digests[name] = response.json()["digest"]
    # x saturates one engine (MAX_RUNNING streams, all started), then y arrives.
    streams = [open_stream(a, "x", 48) for _ in range(MAX_RUNNING)]
    streams += [open_stream(a, "y", 48) for _ in range(MAX_RUNNING)]
    holders = {
        name: {e for e, view in engines_view(a).items() if digest in view["adapters"]}
        for name, digest in digests.items()
    }
    for stream in streams:
        assert b'"finish_reason":"length"' in b"".join(stream)
    assert len(holders["x"]) == len(holders["y"]) == 1, holders
    assert holders["x"] != holders["y"], holders


def test_an_engine_killed_mid_run_fails_no_plain_request_and_comes_back(fleet: Fleet) -> None:
    a, b = fleet.gateways
    victim, survivor = fleet.engines
    # Both engines in rotation and idle first (the test before leaves them busy a moment).
    wait_until(
        "both engines ready and idle",
        lambda: all(e["ready"] and e["running"] == 0 for e in engines_view(a).values()),
        60,
    )
    # Base-model streams, long enough to be running at the kill: each goes to the least loaded
    # engine, so both hold some.
    streams = [open_stream(a, BASE_MODEL, 600) for _ in range(4)]
    view = engines_view(a)
    on_victim = view[victim.name]["running"]
    assert 1 <= on_victim <= 3, (view, a.log())
    statuses: list[int] = []
    stop = threading.Event()

    def plain_requests(gateway: ServeProcess) -> None:
        while not stop.is_set():
            statuses.append(chat(gateway, BASE_MODEL, max_tokens=4).status_code)

    senders = [threading.Thread(target=plain_requests, args=(g,)) for g in (a, b, a)]
    for sender in senders:
        sender.start()
    time.sleep(0.5)
    os.killpg(victim.vllm().pid, signal.SIGKILL)
    killed_at = len(statuses)
    outcomes = []
    for stream in streams:
        events = b"\n".join(stream)
        complete = events.endswith(b"data: [DONE]") and b'"error"' not in events
        outcomes.append("done" if complete else "error" if b'"error"' in events else "cut")
    time.sleep(3)
    stop.set()
    for sender in senders:
        sender.join()
    assert sorted(outcomes) == ["done"] * (4 - on_victim) + ["error"] * on_victim, outcomes
    assert statuses and set(statuses) == {200}, (killed_at, statuses)
    for gateway in (a, b):
        assert not engines_view(gateway)[victim.name]["ready"]

    # `loragate engine --restart` starts vLLM again; both gateways take it back by themselves.
    for gateway in (a, b):
        wait_until(
            "the engine back in rotation",
            lambda g=gateway: engines_view(g)[victim.name]["ready"],
            VLLM_START_TIMEOUT_S,
            1.0,
        )
    sent_before = metric(a, "loragate_engine_requests_total", engine=victim.name)
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: chat(a, BASE_MODEL).status_code, range(8))) == {200}
    assert metric(a, "loragate_engine_requests_total", engine=victim.name) > sent_before
    assert survivor.healthy()


def test_racing_uploads_to_one_name_through_both_gateways_one_wins(fleet: Fleet) -> None:
    a, b = fleet.gateways
    dirs = [write_peft_adapter(fleet.adapters / f"race{i}", seed=900 + i) for i in range(2)]
    barrier = threading.Barrier(2)

    def upload(gateway: ServeProcess, directory: Path) -> httpx.Response:
        barrier.wait()
        return gateway.admin_put("globex", "race", directory)

    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(upload, (a, b), dirs))
    assert sorted(r.status_code for r in responses) == [201, 409], [r.text for r in responses]
    winner = next(r for r in responses if r.status_code == 201).json()
    for gateway in (a, b):
        record = admin(gateway, "GET", "tenants/globex/adapters/race").json()
        assert record["digest"] == winner["digest"]
    stored = fleet.s3.get_object(Bucket=fleet.bucket, Key="fleet/registry/globex/race.json")
    assert json.loads(stored["Body"].read())["digest"] == winner["digest"]
