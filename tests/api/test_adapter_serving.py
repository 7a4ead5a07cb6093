"""Serving tenants' adapters on the fake engine: tenancy, load on first use, LRU eviction that
never touches a busy adapter, reload after the engine loses adapters."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from server.engines.adapter_slots import engine_name
from tests.adapter_factory import write_peft_adapter
from tests.api.conftest import MODEL, Gateway
from tests.api.test_adapters_admin import upload
from tests.api.test_errors import assert_envelope
from tests.api.test_metrics_endpoint import scrape
from tests.api.test_openai_routes import chat_body, sse_events


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [write_peft_adapter(root / f"a{i}", seed=i) for i in range(4)]


def ask(gateway: Gateway, model: str, tenant: str = "acme", **extra: object) -> httpx.Response:
    body = {**chat_body("one two three"), "model": model, **extra}
    return gateway.client.post("/v1/chat/completions", json=body, headers=gateway.headers(tenant))


def test_adapter_answer_differs_and_names_the_adapter(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    digest = upload(gateway, adapter_dirs[0], name="helper").json()["digest"]
    base = ask(gateway, MODEL).json()
    tuned = ask(gateway, "helper").json()
    assert tuned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert tuned["model"] == "helper"
    assert list(gateway.fake.state.stats.adapters) == [engine_name(digest)]


def test_streamed_adapter_events_name_the_adapter_not_the_digest(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    digest = upload(gateway, adapter_dirs[0], name="helper").json()["digest"]
    response = ask(gateway, "helper", stream=True)
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["model"] == "helper" for e in events[:-1])
    assert digest not in response.text
    assert "usage" not in response.text  # the gateway asked for usage; the client did not


def test_usage_is_forwarded_when_the_client_asks(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    upload(gateway, adapter_dirs[0], name="helper")
    response = ask(gateway, "helper", stream=True, stream_options={"include_usage": True})
    usage = [json.loads(e) for e in sse_events(response.text)[:-1] if '"usage"' in e]
    assert usage and usage[-1]["usage"]["completion_tokens"] > 0
    metrics = scrape(gateway)
    assert (
        'loragate_generation_tokens_total{kind="completion",mode="hotswap",model="acme/helper"}'
        in metrics
    )


def test_models_lists_only_the_callers_adapters(gateway: Gateway, adapter_dirs: list[Path]) -> None:
    upload(gateway, adapter_dirs[0], tenant="acme", name="mine")
    upload(gateway, adapter_dirs[1], tenant="globex", name="theirs")
    ids = [
        m["id"] for m in gateway.client.get("/v1/models", headers=gateway.headers()).json()["data"]
    ]
    assert ids == [MODEL, "mine"]


def test_other_tenants_adapter_is_404_like_a_missing_one(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    upload(gateway, adapter_dirs[0], tenant="globex", name="secret")
    theirs = ask(gateway, "secret", tenant="acme")
    missing = ask(gateway, "no-such-adapter", tenant="acme")
    assert_envelope(theirs, 404, "model")
    assert theirs.json()["error"]["message"].replace("secret", "X") == (
        missing.json()["error"]["message"].replace("no-such-adapter", "X")
    )
    assert gateway.fake.state.stats.loads == 0


def test_deleted_adapter_is_404_at_once(gateway: Gateway, adapter_dirs: list[Path]) -> None:
    upload(gateway, adapter_dirs[0], name="gone")
    assert ask(gateway, "gone").status_code == 200
    gateway.client.delete("/admin/v1/tenants/acme/adapters/gone", headers=gateway.admin)
    assert_envelope(ask(gateway, "gone"), 404, "model")


def test_replaced_adapter_serves_the_new_version(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    upload(gateway, adapter_dirs[0], name="v")
    first = ask(gateway, "v").json()["choices"][0]["message"]["content"]
    upload(gateway, adapter_dirs[1], name="v", replace="true")
    second = ask(gateway, "v").json()["choices"][0]["message"]["content"]
    assert first != second


def test_lru_eviction_keeps_at_most_capacity_loaded(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    names = [f"n{i}" for i in range(4)]
    for name, directory in zip(names, adapter_dirs, strict=True):
        upload(gateway, directory, name=name)
    for name in [*names, *names]:
        assert ask(gateway, name).status_code == 200
        assert len(gateway.fake.state.stats.adapters) <= 2  # max_loaded_adapters
    stats = gateway.fake.state.stats
    assert stats.loads == 8 and stats.unloads >= 6
    assert stats.unloaded_while_busy == 0


def test_engine_losing_adapters_reloads_on_demand(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    upload(gateway, adapter_dirs[0], name="helper")
    assert ask(gateway, "helper").status_code == 200
    gateway.fake.state.stats.adapters.clear()  # as if the engine restarted
    assert ask(gateway, "helper").status_code == 200
    assert gateway.fake.state.stats.loads == 2


def burst(gateway: Gateway, models: list[str]) -> list[int]:
    """One request per entry of `models`, all at once (every other one streamed); statuses."""
    bodies = [{**chat_body("x"), "model": m, "stream": i % 2 == 0} for i, m in enumerate(models)]
    return [r.status_code for r in gateway.send_together(bodies)]


def test_many_requests_at_once_load_an_adapter_once(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    upload(gateway, adapter_dirs[0], name="hot")
    gateway.knobs.load_s = 0.1
    assert burst(gateway, ["hot"] * 12) == [200] * 12
    assert gateway.fake.state.stats.loads == 1


def test_concurrent_requests_never_unload_a_busy_adapter(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    for i, directory in enumerate(adapter_dirs):
        upload(gateway, directory, name=f"c{i}")
    gateway.knobs.ttft_s = 0.05
    gateway.knobs.load_s = 0.02
    assert burst(gateway, [f"c{i % 4}" for i in range(24)]) == [200] * 24
    stats = gateway.fake.state.stats
    assert stats.unloaded_while_busy == 0
    assert len(stats.adapters) <= 2
