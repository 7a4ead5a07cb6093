"""A request that an engine fails before answering goes once more to another engine
(`GenerationService._on_engine`), driven through the real service over a pool of two in-process
fake engines: the failed engine leaves rotation, the retry is counted against it, and however
the request ends it leaves no turn, pin or tenant slot held anywhere."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.registry import LocalAdapterRegistry
from adapters.types import AdapterRecord
from server.cache.policy import CacheDirectives
from server.cache.result_cache import ResultCache
from server.cache.result_store import MemoryResultStore
from server.engines.adapter_slots import engine_name
from server.engines.pool import EngineMember, EnginePool
from server.errors import EngineUnavailableError, ModelNotFoundError
from server.generation.protocol import ChatCompletionRequest
from server.generation.request_bounds import RequestBounds
from server.generation.serving import GenerationService
from server.generation.token_count import TokenCounter
from server.limits.tenant_limits import TenantLimiter
from server.metrics import Metrics
from server.settings import Settings
from server.tenants import Tenant, TenantLimits
from tests.engine_fake import ANSWER, MODEL, FakeEngine, fake_member

E1, E2 = "e1:8000", "e2:8000"
ADAPTER = "support-bot"
DIGEST = "cd" * 32  # one the router ranks e1 first for (routing.spread), at equal load
# One request at a time: a tenant slot a failed request kept would refuse the next one (429).
TENANT = Tenant("acme", TenantLimits(max_concurrent=1))


@dataclass
class Gateway:
    service: GenerationService
    pool: EnginePool
    metrics: Metrics
    fakes: dict[str, FakeEngine]  # by member name

    def member(self, name: str) -> EngineMember:
        return next(m for m in self.pool.members if m.name == name)

    def retries(self, engine: str) -> float | None:
        sample = "loragate_engine_retries_total"
        return self.metrics.registry.get_sample_value(sample, {"engine": engine})

    def assert_nothing_held(self) -> None:
        for member in self.pool.members:
            assert member.admission.running == 0 and member.admission.queued == 0, member.name
            assert not member.slots.busy(), member.name
        assert not self.pool.in_use(DIGEST)

    async def ask(self, model: str) -> dict[str, object]:
        generated = await self.service.generate(TENANT, chat(model), CacheDirectives())
        answer: dict[str, object] = json.loads(generated.content)
        return answer


def chat(model: str, *, stream: bool = False) -> ChatCompletionRequest:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return ChatCompletionRequest.model_validate(body)


@asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    settings = Settings(
        cache_dir=tmp_path / "cache",
        model={"name": MODEL, "max_model_len": 2048, "revision": "test"},
        engine={"max_loras": 2},
        max_loaded_adapters=2,
        cache={"enabled": False},
    )
    metrics = Metrics()
    fakes: dict[str, FakeEngine] = {}

    def make(name: str, url: str) -> EngineMember:
        fakes[name] = FakeEngine()
        return fake_member(name, url, fakes[name], metrics)

    pool = EnginePool([f"http://{E1}", f"http://{E2}"], make, metrics)
    registry = LocalAdapterRegistry(settings.store_path)
    registry.put(
        AdapterRecord(
            tenant=TENANT.name, name=ADAPTER, digest=DIGEST, rank=8, alpha=16.0,
            target_modules=("q_proj", "v_proj"), size_bytes=1, created_at="2025-01-01T00:00:00Z",
        ),
        replace=False,
    )  # fmt: skip
    service = GenerationService(
        settings,
        pool,
        metrics,
        RequestBounds(settings, TokenCounter(None)),
        registry,
        ResultCache(MemoryResultStore(1 << 20, 60), settings.cache, metrics),
        "test",
        TenantLimiter(None, metrics, lease_ttl_s=60),
    )
    await pool.start()
    # Let each monitor make its first poll: the next is a minute away, so an engine a test
    # makes unreachable from here died between polls, and only a request finds out.
    await asyncio.sleep(0.01)
    try:
        yield Gateway(service, pool, metrics, fakes)
    finally:
        await pool.aclose()


@pytest.mark.parametrize("model", [MODEL, ADAPTER])
async def test_an_unreachable_engine_is_left_for_the_other(tmp_path: Path, model: str) -> None:
    async with gateway(tmp_path) as gw:
        gw.fakes[E1].reachable = False  # e1 goes first: equal load, by name
        answer = await gw.ask(model)
        assert answer["model"] == model
        served = MODEL if model == MODEL else engine_name(DIGEST)
        assert gw.fakes[E2].generations == {served: 1}
        assert gw.fakes[E1].events == []
        assert not gw.member(E1).monitor.ready  # out of rotation at once
        assert gw.retries(E1) == 1 and gw.retries(E2) is None
        gw.assert_nothing_held()
        await gw.ask(model)  # straight to e2 now: no retry
        assert gw.fakes[E2].generations == {served: 2}
        assert gw.retries(E1) == 1


async def test_an_engine_dying_with_the_adapter_loaded_is_left_for_the_other(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as gw:
        await gw.ask(ADAPTER)
        assert gw.member(E1).slots.loaded == [DIGEST]
        gw.fakes[E1].reachable = False  # it dies between polls, holding the adapter
        await gw.ask(ADAPTER)  # pinned on e1, refused there, loaded and answered on e2
        assert gw.fakes[E2].events == [
            f"load {engine_name(DIGEST)}",
            f"generate {engine_name(DIGEST)}",
        ]
        assert gw.member(E1).slots.loaded == [] and gw.member(E2).slots.loaded == [DIGEST]
        assert gw.retries(E1) == 1
        gw.assert_nothing_held()


async def test_an_engine_that_lost_the_adapter_reloads_it_without_a_retry(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as gw:
        await gw.ask(ADAPTER)
        gw.fakes[E1].adapters.clear()  # it restarted between polls: 404 for the adapter
        await gw.ask(ADAPTER)
        name = engine_name(DIGEST)
        assert gw.fakes[E1].events == [f"load {name}", f"generate {name}"] * 2
        assert gw.fakes[E2].events == [] and gw.retries(E1) is None
        gw.assert_nothing_held()


async def test_an_unreachable_engine_is_left_for_the_other_stream(tmp_path: Path) -> None:
    async with gateway(tmp_path) as gw:
        gw.fakes[E1].reachable = False
        opened = await gw.service.stream(TENANT, chat(ADAPTER, stream=True), 0.0, CacheDirectives())
        try:
            events = b"".join([event async for event in opened.events])
        finally:
            await opened.close()
        assert events.endswith(b"data: [DONE]\n\n")
        assert f'"model": "{ADAPTER}"'.encode() in events and ANSWER.encode() in events
        assert engine_name(DIGEST).encode() not in events
        assert gw.fakes[E2].generations == {engine_name(DIGEST): 1}
        assert gw.retries(E1) == 1
        gw.assert_nothing_held()


@pytest.mark.parametrize("model", [MODEL, ADAPTER])
async def test_both_unreachable_is_a_503_holding_nothing(tmp_path: Path, model: str) -> None:
    async with gateway(tmp_path) as gw:
        for fake in gw.fakes.values():
            fake.reachable = False
        with pytest.raises(EngineUnavailableError):
            await gw.ask(model)
        assert not gw.member(E1).monitor.ready and not gw.member(E2).monitor.ready
        assert gw.retries(E1) == 1  # one retry, on e2; none after it
        assert gw.retries(E2) is None
        gw.assert_nothing_held()
        with pytest.raises(EngineUnavailableError):  # no engine ready: refused up front
            await gw.ask(model)
        gw.fakes[E2].reachable = True
        assert await gw.member(E2).monitor.check_now()
        await gw.ask(model)  # the tenant's one slot was given back
        gw.assert_nothing_held()


async def test_an_engine_error_that_is_not_unavailability_is_not_retried(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as gw:
        gw.fakes[E1].model = "another-model"  # answers 404 for our base model
        with pytest.raises(ModelNotFoundError):
            await gw.ask(MODEL)
        assert gw.member(E1).monitor.ready  # the engine answered: it stays in rotation
        assert gw.retries(E1) is None and gw.fakes[E2].events == []
        gw.assert_nothing_held()
