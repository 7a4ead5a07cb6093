"""The gateway in front of a pool of two fake engines over HTTP: adapter affinity, failover to
the other engine when one goes away, and the operator's view of the pool."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.engines.adapter_slots import engine_name
from tests.adapter_factory import write_peft_adapter
from tests.api.conftest import MODEL, Gateway, make_settings, serving
from tests.api.test_adapters_admin import upload
from tests.api.test_errors import assert_envelope


@dataclass
class Pool:
    gateway: Gateway
    fakes: list[FastAPI]
    stops: list[contextlib.ExitStack]

    def engines(self) -> dict[str, dict[str, object]]:
        response = self.gateway.client.get("/admin/v1/engines", headers=self.gateway.admin)
        assert response.status_code == 200, response.text
        return {e["url"]: e for e in response.json()["data"]}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    knobs = FakeEngineKnobs(model=MODEL)
    with contextlib.ExitStack() as stack:
        fakes, stops = [], []
        for _ in range(2):
            fake = create_fake_engine_app(knobs)
            engine_stack = stack.enter_context(contextlib.ExitStack())
            fake.state.url = engine_stack.enter_context(serving(fake))
            fakes.append(fake)
            stops.append(engine_stack)
        settings = make_settings(
            tmp_path,
            engine={"urls": [f.state.url for f in fakes], "health_interval_s": 0.2},
            adapters={"max_upload_bytes": 8 << 20},
        )
        app = create_app(settings)
        client = stack.enter_context(TestClient(app))
        yield Pool(Gateway(client, app, knobs, fakes[0], settings), fakes, stops)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft_adapter(tmp_path_factory.mktemp("adapters") / "a", seed=3)


def chat(gateway: Gateway, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}]}
    headers = gateway.headers() | {"Cache-Control": "no-cache"}
    return gateway.client.post("/v1/chat/completions", json=body, headers=headers).status_code


def test_an_adapter_loads_on_one_engine_and_its_requests_stay_there(
    pool: Pool, adapter_dir: Path
) -> None:
    record = upload(pool.gateway, adapter_dir, name="sticky").json()
    assert [chat(pool.gateway, "sticky") for _ in range(10)] == [200] * 10
    loads = [fake.state.stats.loads for fake in pool.fakes]
    assert sorted(loads) == [0, 1]
    holder = pool.fakes[loads.index(1)]
    assert engine_name(record["digest"]) in holder.state.stats.adapters
    views = pool.engines()
    assert views[holder.state.url]["adapters"] == [record["digest"]]


def test_base_requests_spread_over_both_engines(pool: Pool) -> None:
    responses = pool.gateway.send_together(
        [{"model": MODEL, "messages": [{"role": "user", "content": "x"}]}] * 8
    )
    assert [r.status_code for r in responses] == [200] * 8
    assert all(fake.state.stats.generate_calls > 0 for fake in pool.fakes)


def test_an_engine_that_goes_away_leaves_rotation_and_requests_go_to_the_other(
    pool: Pool, adapter_dir: Path
) -> None:
    upload(pool.gateway, adapter_dir, name="sticky")
    assert chat(pool.gateway, "sticky") == 200
    holder = next(i for i, f in enumerate(pool.fakes) if f.state.stats.loads)
    pool.stops[holder].close()  # its server stops: connections are refused from now on
    assert [chat(pool.gateway, "sticky") for _ in range(5)] == [200] * 5
    assert [chat(pool.gateway, MODEL) for _ in range(5)] == [200] * 5
    other = pool.fakes[1 - holder]
    assert other.state.stats.loads == 1  # the adapter loaded again where requests now go
    views = pool.engines()
    gone = views[pool.fakes[holder].state.url]
    assert gone["ready"] is False and gone["adapters"] == [] and gone["reason"]
    assert views[other.state.url]["ready"] is True


def test_the_engines_route_needs_the_admin_key(pool: Pool) -> None:
    client = pool.gateway.client
    assert_envelope(client.get("/admin/v1/engines"), 401)
    assert_envelope(client.get("/admin/v1/engines", headers=pool.gateway.headers()), 403)
