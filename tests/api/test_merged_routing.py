"""A merged engine in the pool (fake engines over HTTP): it serves one adapter version merged,
under `lgm-<digest>`. That version's requests go to it, everything else to the hot-swap engine,
and when it goes away the same requests hot-swap with none failing; a replaced adapter is never
sent to the merged copy of its old version."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.engines.adapter_slots import merged_engine_name
from tests.adapter_factory import write_peft_adapter
from tests.api.conftest import MODEL, Gateway, make_settings, serving
from tests.api.test_adapters_admin import upload
from tests.api.test_errors import assert_envelope

PLACEHOLDER = "0" * 64  # what the merged engine serves until the test knows the digest


@dataclass
class MergedPool:
    gateway: Gateway
    base: FastAPI
    merged: FastAPI
    merged_knobs: FakeEngineKnobs
    merged_stop: contextlib.ExitStack

    def engines(self) -> dict[str, dict[str, object]]:
        response = self.gateway.client.get("/admin/v1/engines", headers=self.gateway.admin)
        assert response.status_code == 200, response.text
        return {e["url"]: e for e in response.json()["data"]}

    def serve_merged(self, digest: str) -> None:
        """The merged engine now serves `digest`; wait until the gateway has seen it."""
        self.merged_knobs.model = merged_engine_name(digest)
        deadline = time.monotonic() + 10
        while self.engines()[self.merged.state.url]["merged"] != digest:
            assert time.monotonic() < deadline, self.engines()
            time.sleep(0.1)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[MergedPool]:
    knobs = FakeEngineKnobs(model=MODEL)
    merged_knobs = FakeEngineKnobs(model=merged_engine_name(PLACEHOLDER))
    with contextlib.ExitStack() as stack:
        base = create_fake_engine_app(knobs)
        base.state.url = stack.enter_context(serving(base))
        merged_stop = stack.enter_context(contextlib.ExitStack())
        merged = create_fake_engine_app(merged_knobs)
        merged.state.url = merged_stop.enter_context(serving(merged))
        settings = make_settings(
            tmp_path,
            engine={
                "urls": [base.state.url, merged.state.url],
                "health_interval_s": 0.2,
                "models_refresh_s": 1,
            },
        )
        app = create_app(settings)
        client = stack.enter_context(TestClient(app))
        gateway = Gateway(client, app, knobs, base, settings)
        yield MergedPool(gateway, base, merged, merged_knobs, merged_stop)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return write_peft_adapter(root / "a", seed=3), write_peft_adapter(root / "b", seed=4)


def chat(gateway: Gateway, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}]}
    headers = gateway.headers() | {"Cache-Control": "no-cache"}
    return gateway.client.post("/v1/chat/completions", json=body, headers=headers).status_code


def test_the_merged_version_goes_to_its_merged_engine_and_the_rest_hot_swaps(
    pool: MergedPool, adapter_dirs: tuple[Path, Path]
) -> None:
    merged_record = upload(pool.gateway, adapter_dirs[0], name="hot").json()
    upload(pool.gateway, adapter_dirs[1], name="cold")
    pool.serve_merged(merged_record["digest"])

    assert [chat(pool.gateway, "hot") for _ in range(5)] == [200] * 5
    assert pool.merged.state.stats.generate_calls == 5
    assert pool.base.state.stats.loads == 0  # never hot-swapped while the merged copy serves
    assert chat(pool.gateway, "cold") == 200
    assert chat(pool.gateway, MODEL) == 200
    assert pool.merged.state.stats.generate_calls == 5  # neither went to the merged engine
    assert pool.base.state.stats.loads == 1
    registry = pool.gateway.app.state.metrics.registry
    served = {
        (model, mode): registry.get_sample_value(
            "loragate_generation_requests_total", {"model": model, "mode": mode}
        )
        for model, mode in (("acme/hot", "merged"), ("acme/cold", "hotswap"), (MODEL, "base"))
    }
    assert served == {("acme/hot", "merged"): 5, ("acme/cold", "hotswap"): 1, (MODEL, "base"): 1}


def test_when_the_merged_engine_goes_away_its_version_hot_swaps_with_no_failure(
    pool: MergedPool, adapter_dirs: tuple[Path, Path]
) -> None:
    record = upload(pool.gateway, adapter_dirs[0], name="hot").json()
    pool.serve_merged(record["digest"])
    assert chat(pool.gateway, "hot") == 200
    pool.merged_stop.close()  # connections are refused from now on
    assert [chat(pool.gateway, "hot") for _ in range(5)] == [200] * 5
    assert pool.base.state.stats.loads == 1


def test_a_replaced_adapter_is_never_sent_to_the_merged_copy_of_its_old_version(
    pool: MergedPool, adapter_dirs: tuple[Path, Path]
) -> None:
    old = upload(pool.gateway, adapter_dirs[0], name="hot").json()
    pool.serve_merged(old["digest"])
    assert chat(pool.gateway, "hot") == 200
    calls = pool.merged.state.stats.generate_calls
    new = upload(pool.gateway, adapter_dirs[1], name="hot", replace="true").json()
    assert new["digest"] != old["digest"]
    assert [chat(pool.gateway, "hot") for _ in range(3)] == [200] * 3
    assert pool.merged.state.stats.generate_calls == calls
    assert pool.base.state.stats.loads == 1


def test_a_merge_only_adapter_is_refused_until_a_merged_engine_serves_it(
    pool: MergedPool, tmp_path: Path
) -> None:
    dora = write_peft_adapter(tmp_path / "dora", seed=5, dora=True)
    response = upload(pool.gateway, dora, name="dora")
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["merge_only"] is True
    cards = pool.gateway.client.get("/v1/models", headers=pool.gateway.headers()).json()["data"]
    assert {c["id"]: c["merge_only"] for c in cards if c["id"] == "dora"} == {"dora": True}

    body = {"model": "dora", "messages": [{"role": "user", "content": "hi"}]}
    refused = pool.gateway.client.post(
        "/v1/chat/completions", json=body, headers=pool.gateway.headers()
    )
    error = assert_envelope(refused, 503)
    assert error["code"] == "merged_engine_unavailable" and "merged" in error["message"]
    assert record["digest"] not in refused.text
    assert pool.base.state.stats.loads == 0  # never hot-swapped

    pool.serve_merged(record["digest"])
    assert chat(pool.gateway, "dora") == 200
    assert pool.merged.state.stats.generate_calls == 1 and pool.base.state.stats.loads == 0
