"""The generation service: resolves a tenant's `model` (the base model or one of its adapters),
checks the request's bounds, pins the adapter on the engine, and hands back the result or an SSE
byte stream. No FastAPI in here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from adapters.registry import AdapterRegistry
from adapters.types import ADAPTER_NAME, AdapterRecord
from server.engine import Engine, EngineStream, GenerationKind
from server.engine_adapters import AdapterLease, EngineAdapters
from server.engine_monitor import EngineMonitor
from server.errors import (
    EngineUnavailableError,
    LoragateError,
    ModelNotFoundError,
)
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, GenerationRequest, ModelCard, ModelList
from server.request_bounds import RequestBounds
from server.settings import Settings
from server.sse_relay import RelayOptions, relay_events
from server.tenants import Tenant

T = TypeVar("T")


@dataclass(frozen=True)
class OpenStream:
    """An open engine stream: its events, and `close`, which the caller must await however the
    response ends (even if `events` was never iterated: an unstarted generator's `finally`
    never runs, and the adapter would stay pinned). Closing twice is harmless."""

    events: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolved to."""

    public_name: str
    metrics_label: str  # base model name or "<tenant>/<adapter>": from the registry only
    adapter: AdapterRecord | None


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        monitor: EngineMonitor,
        metrics: Metrics,
        bounds: RequestBounds,
        registry: AdapterRegistry,
        adapters: EngineAdapters,
    ) -> None:
        self._base = settings.model
        self._engine = engine
        self._monitor = monitor
        self._metrics = metrics
        self._bounds = bounds
        self._registry = registry
        self._adapters = adapters
        self._created = int(time.time())

    async def list_models(self, tenant: Tenant) -> ModelList:
        base = ModelCard(
            id=self._base.name,
            created=self._created,
            owned_by="loragate",
            max_model_len=self._base.max_model_len,
        )
        records = await asyncio.to_thread(self._registry.list, tenant.name)
        cards = [
            ModelCard(
                id=r.name, created=self._created, owned_by=tenant.name, parent=self._base.name
            )
            for r in records
        ]
        return ModelList(data=[base, *cards])

    async def generate(self, tenant: Tenant, request: GenerationRequest) -> dict[str, Any]:
        target, kind, body = await self._prepare(tenant, request)
        lease = await self._lease(target)
        try:
            result = await self._on_engine(
                target, lease, body, lambda: self._engine.generate(kind, body)
            )
        finally:
            if lease is not None:
                lease.release()
        result["model"] = target.public_name
        self._count(target, result.get("usage"))
        return result

    async def stream(
        self, tenant: Tenant, request: GenerationRequest, started: float
    ) -> OpenStream:
        """Open the engine stream (errors raise here, before any byte is sent) and return the
        events as they arrive; errors after that become an in-band SSE error event."""
        target, kind, body = await self._prepare(tenant, request)
        forward_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        lease = await self._lease(target)
        try:
            upstream = await self._on_engine(
                target, lease, body, lambda: self._engine.open_stream(kind, body)
            )
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        options = RelayOptions(
            str(body["model"]).encode(), target.public_name.encode(), forward_usage
        )

        async def close() -> None:
            if lease is not None:
                lease.release()  # the request is over: the adapter may be unloaded again
            # Closing the upstream response makes the engine abort the request instead of
            # generating for nobody.
            await upstream.aclose()

        events = self._relay(upstream, options, target, route, started)
        return OpenStream(events, close)

    def _relay(
        self,
        upstream: EngineStream,
        options: RelayOptions,
        target: Target,
        route: str,
        started: float,
    ) -> AsyncIterator[bytes]:
        def first_event() -> None:
            elapsed = time.perf_counter() - started
            self._metrics.time_to_first_token.labels(route).observe(elapsed)

        def usage(prompt: int, completion: int) -> None:
            self._count(target, {"prompt_tokens": prompt, "completion_tokens": completion})

        def error(e: LoragateError) -> None:
            if isinstance(e, EngineUnavailableError):
                self._monitor.mark_unreachable()

        return relay_events(upstream, options, first_event, usage, error)

    async def _lease(self, target: Target) -> AdapterLease | None:
        if target.adapter is None:
            return None
        return await self._guard(self._adapters.acquire(target.adapter.digest))

    async def _on_engine(
        self,
        target: Target,
        lease: AdapterLease | None,
        body: dict[str, Any],
        call: Callable[[], Awaitable[T]],
    ) -> T:
        if lease is not None:
            body["model"] = lease.engine_name
        try:
            return await self._guard(call())
        except ModelNotFoundError:
            if lease is None:
                raise
            # The engine lost the adapter (it restarted): load it again, once.
            await self._guard(self._adapters.reload(lease.digest))
            return await self._guard(call())

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except EngineUnavailableError:
            self._monitor.mark_unreachable()
            raise

    def _count(self, target: Target, usage: Any) -> None:
        label = target.metrics_label
        self._metrics.generation_requests.labels(label).inc()
        if isinstance(usage, dict):
            for kind in ("prompt", "completion"):
                tokens = usage.get(f"{kind}_tokens")
                if isinstance(tokens, int) and tokens >= 0:
                    self._metrics.generation_tokens.labels(label, kind).inc(tokens)

    async def _resolve(self, tenant: Tenant, model: str) -> Target:
        if model == self._base.name:
            return Target(model, model, None)
        record = None
        if ADAPTER_NAME.fullmatch(model):
            record = await asyncio.to_thread(self._registry.get, tenant.name, model)
        if record is None:
            # Another tenant's adapter answers exactly like one that does not exist.
            raise ModelNotFoundError(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            )
        return Target(model, f"{tenant.name}/{model}", record)

    async def _prepare(
        self, tenant: Tenant, request: GenerationRequest
    ) -> tuple[Target, GenerationKind, dict[str, Any]]:
        target = await self._resolve(tenant, request.model)
        max_tokens = await self._bounds.check(request)
        if not self._monitor.ready:
            raise EngineUnavailableError()
        body = request.engine_body()
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = max_tokens
        kind: GenerationKind = (
            "chat" if isinstance(request, ChatCompletionRequest) else "completions"
        )
        return target, kind, body
