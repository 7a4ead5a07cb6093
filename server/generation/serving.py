"""The generation service: resolves a tenant's `model` (the base model or one of its adapters),
checks the request's bounds and the tenant's request rate, answers from the result cache when it
can, and otherwise takes the tenant's token and concurrency quota, then on the engine the pool's
router picks, a turn and a pin on the adapter, and hands back the result or an SSE byte stream.
A request that an engine fails before answering anything goes once more to another engine. With
Redis, the rate, the cache lookup and the quota are one round trip (`TenantLimiter.admit`). No
FastAPI in here.

Everything a request holds is entered on one AsyncExitStack, released in reverse order however
the request ends; a stream takes the stack with it and releases it when the response closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

from adapters.registry import AdapterRegistry
from adapters.types import ADAPTER_NAME, AdapterRecord
from server.cache.policy import CacheDirectives, CachePlan, CacheStatus, cache_key, is_reproducible
from server.cache.result_cache import Lookup, ResultCache
from server.engines.adapter_slots import AdapterLease, merged_engine_name
from server.engines.base import EngineStream, GenerationKind
from server.engines.pool import EngineMember, EnginePool
from server.errors import (
    EngineUnavailableError,
    LoragateError,
    ModelNotFoundError,
)
from server.generation.protocol import (
    ChatCompletionRequest,
    GenerationRequest,
    ModelCard,
    ModelList,
    dump_json,
)
from server.generation.request_bounds import RequestBounds, RequestBudget
from server.generation.sse_relay import RelayOptions, relay_events
from server.generation.stream_capture import StreamCapture, replay_events
from server.limits.tenant_limits import TenantLimiter, TokenReservation, engine_refused
from server.metrics import Metrics, adapter_label
from server.settings import Settings
from server.tenants import Tenant

T = TypeVar("T")
# How a request was served (the `mode` label of the generation metrics).
ServingMode = Literal["base", "hotswap", "merged", "fallback"]

RESOLVE_ATTEMPTS = 3  # reads of a record that keeps changing under a request, at most
ENGINE_ATTEMPTS = 2  # engines a request is sent to, at most: one retry elsewhere


@dataclass(frozen=True)
class OpenStream:
    """An open engine stream: its events, and `close`, which the caller must await however the
    response ends (even if `events` was never iterated: an unstarted generator's `finally`
    never runs, and the adapter would stay pinned). Closing twice is harmless."""

    events: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]
    cache: CacheStatus = "bypass"


@dataclass(frozen=True)
class Generated:
    """A non-streamed result, serialized: a cache hit returns these very bytes again."""

    content: bytes
    cache: CacheStatus


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolved to."""

    public_name: str
    metrics_label: str  # base model name or "<tenant>/<adapter>": from the registry only
    adapter: AdapterRecord | None


@dataclass(frozen=True)
class Job:
    """A request resolved and bounded: what goes to the engine, and what it may cost. `release`
    ends its hold on the adapter version it resolved (whose files stay until then); the caller
    calls it, on the exit stack it enters right away, however the request ends."""

    target: Target
    kind: GenerationKind
    body: dict[str, Any]
    budget: RequestBudget
    release: Callable[[], None]


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        pool: EnginePool,
        metrics: Metrics,
        bounds: RequestBounds,
        registry: AdapterRegistry,
        cache: ResultCache,
        base_revision: str,
        limiter: TenantLimiter,
    ) -> None:
        self._base = settings.model
        self._pool = pool
        self._metrics = metrics
        self._bounds = bounds
        self._registry = registry
        self._cache = cache
        self._cache_enabled = settings.cache.enabled
        self._base_revision = base_revision
        self._limiter = limiter
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
                id=r.name,
                created=self._created,
                owned_by=tenant.name,
                parent=self._base.name,
                merge_only=r.merge_only,
            )
            for r in records
        ]
        return ModelList(data=[base, *cards])

    async def generate(
        self, tenant: Tenant, request: GenerationRequest, directives: CacheDirectives
    ) -> Generated:
        job = await self._prepare(tenant, request)
        async with AsyncExitStack() as stack:
            stack.callback(job.release)
            plan = self._plan(job, tenant, directives)
            lookup, admitted = await self._admit_and_look_up(stack, tenant, job, plan)
            if lookup.value is not None:
                return Generated(lookup.value, "hit")
            reservation = await self._quota(stack, tenant, job, admitted)
            result, member = await self._on_engine(
                stack, job, job.body, lambda m: m.engine.generate(job.kind, job.body)
            )
            result["model"] = job.target.public_name
            usage = result.get("usage")
            self._count(job.target, usage, self._mode(job.target, member))
            if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                reservation.record_usage(usage["total_tokens"])
            content = dump_json(result)
            await lookup.store(content)
            return Generated(content, lookup.status)

    async def stream(
        self,
        tenant: Tenant,
        request: GenerationRequest,
        started: float,
        directives: CacheDirectives,
    ) -> OpenStream:
        """Open the engine stream (errors raise here, before any byte is sent) and return the
        events as they arrive; errors after that become an in-band SSE error event."""
        job = await self._prepare(tenant, request)
        body, chat = job.body, job.kind == "chat"
        forward_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        async with AsyncExitStack() as stack:
            stack.callback(job.release)
            plan = self._plan(job, tenant, directives)
            lookup, admitted = await self._admit_and_look_up(stack, tenant, job, plan)
            if lookup.value is not None:
                replayed = _iterate(replay_events(lookup.value, chat, forward_usage))
                return OpenStream(replayed, stack.pop_all().aclose, "hit")
            reservation = await self._quota(stack, tenant, job, admitted)
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            upstream, member = await self._on_engine(
                stack, job, body, lambda m: m.engine.open_stream(job.kind, body)
            )
            # Closing the upstream response makes the engine abort the request instead of
            # generating for nobody.
            stack.push_async_callback(upstream.aclose)
            capture = StreamCapture(chat) if plan.key is not None else None
            if capture is not None:

                async def store_captured() -> None:
                    if (result := capture.result()) is not None:
                        await lookup.store(result)

                stack.push_async_callback(store_captured)
            route = "/v1/chat/completions" if chat else "/v1/completions"
            options = RelayOptions(
                str(body["model"]).encode(), job.target.public_name.encode(), forward_usage
            )
            events = self._relay(
                upstream, options, job, route, started, reservation, capture, member
            )
            return OpenStream(events, stack.pop_all().aclose, lookup.status)
        raise AssertionError("unreachable")  # for type checkers: the block always returns

    def _plan(self, job: Job, tenant: Tenant, directives: CacheDirectives) -> CachePlan:
        if not self._cache_enabled or not is_reproducible(job.body):
            return CachePlan.bypass()
        adapter = job.target.adapter
        key = cache_key(
            tenant=tenant.name,
            base_revision=self._base_revision,
            # The version, not the name: replaced, or deleted and uploaded again, is a new key.
            adapter_version=f"{adapter.digest}@{adapter.created_at}" if adapter else None,
            public_model=job.target.public_name,
            endpoint=job.kind,
            body=job.body,
        )
        return CachePlan(key, read=not directives.no_cache, write=not directives.no_store)

    async def _admit_and_look_up(
        self, stack: AsyncExitStack, tenant: Tenant, job: Job, plan: CachePlan
    ) -> tuple[Lookup, TokenReservation | None]:
        """Count the request against the tenant's limits and look it up in the cache: with
        Redis both in one round trip, which also takes the engine quota of a request that will
        need the engine (returned, and settled on `stack`)."""
        admitted = await self._limiter.admit(
            tenant, job.budget.most_tokens, self._cache.probe(plan)
        )
        if admitted.reservation is not None:
            _settle_on(stack, admitted.reservation)
        lookup = await stack.enter_async_context(self._cache.lookup(plan, admitted.probe))
        return lookup, admitted.reservation

    async def _quota(
        self,
        stack: AsyncExitStack,
        tenant: Tenant,
        job: Job,
        reservation: TokenReservation | None,
    ) -> TokenReservation:
        """The tenant's token and concurrency quota for an engine request (429), settled on
        `stack`; unless admission took it already. 503 first when no engine can serve."""
        self._pool.ensure_ready()
        if reservation is None:
            reservation = await self._limiter.reserve(tenant, job.budget.most_tokens)
            _settle_on(stack, reservation)
        return reservation

    async def _on_engine(
        self,
        stack: AsyncExitStack,
        job: Job,
        body: dict[str, Any],
        call: Callable[[EngineMember], Awaitable[T]],
    ) -> tuple[T, EngineMember]:
        """Run `call` on the engine the router picks, holding there (released on `stack`) a
        turn (503 when its queue is full) and a pin on the adapter. An engine that turns out
        unreachable before answering is taken out of rotation and the request sent once more
        to another; a non-streamed request has sent nothing to its caller yet, a stream has
        not started."""
        adapter = job.target.adapter
        digest = adapter.digest if adapter is not None else None
        merged_only = adapter is not None and adapter.merge_only
        if merged_only and digest is not None and not self._pool.serves_merged(digest):
            raise EngineUnavailableError(
                f"the adapter {job.target.public_name!r} can only be served merged (it uses "
                "DoRA or modules_to_save, which hot-swapping cannot serve), and no engine "
                "serving it merged is up: promote it (`loragate adapters merge`) and start "
                "`loragate engine --merged` for it",
                code="merged_engine_unavailable",
            )
        tried: list[str] = []
        while True:
            member = self._pool.choose(digest, exclude=tried, merged_only=merged_only)
            attempt = AsyncExitStack()
            try:
                attempt.callback(await member.admission.acquire())
                lease = None
                merged = digest is not None and member.monitor.merged == digest
                if digest is not None and not merged:
                    lease = await self._guard(member, member.slots.acquire(digest))
                    attempt.callback(lease.release)  # over: the adapter may be unloaded
                if merged:
                    assert digest is not None
                    result = await self._call_merged(member, digest, body, call)
                else:
                    result = await self._call(member, lease, body, call)
            except EngineUnavailableError:
                await attempt.aclose()
                tried.append(member.name)
                if len(tried) >= ENGINE_ATTEMPTS or not self._pool.ready_except(tried):
                    raise
                self._metrics.engine_retries.labels(member.name).inc()
                continue
            except BaseException:
                await attempt.aclose()
                raise
            stack.push_async_callback(attempt.aclose)
            return result, member

    def _relay(
        self,
        upstream: EngineStream,
        options: RelayOptions,
        job: Job,
        route: str,
        started: float,
        reservation: TokenReservation,
        capture: StreamCapture | None,
        member: EngineMember,
    ) -> AsyncIterator[bytes]:
        def first_event() -> None:
            elapsed = time.perf_counter() - started
            self._metrics.time_to_first_token.labels(route).observe(elapsed)

        def usage(prompt: int, completion: int) -> None:
            usage = {"prompt_tokens": prompt, "completion_tokens": completion}
            self._count(job.target, usage, self._mode(job.target, member))
            reservation.record_usage(prompt + completion)

        def error(e: LoragateError) -> None:
            if isinstance(e, EngineUnavailableError):
                member.monitor.mark_unreachable()

        on_event = capture.feed if capture is not None else None
        return relay_events(upstream, options, first_event, usage, error, on_event)

    async def _call(
        self,
        member: EngineMember,
        lease: AdapterLease | None,
        body: dict[str, Any],
        call: Callable[[EngineMember], Awaitable[T]],
    ) -> T:
        body["model"] = lease.engine_name if lease is not None else self._base.name
        try:
            return await self._guard(member, call(member))
        except ModelNotFoundError:
            if lease is None:
                raise
            # The engine lost the adapter (it restarted): load it again, once.
            await self._guard(member, member.slots.reload(lease.digest))
            return await self._guard(member, call(member))

    async def _call_merged(
        self,
        member: EngineMember,
        digest: str,
        body: dict[str, Any],
        call: Callable[[EngineMember], Awaitable[T]],
    ) -> T:
        body["model"] = merged_engine_name(digest)
        try:
            return await self._guard(member, call(member))
        except ModelNotFoundError:
            # It serves something else now (restarted with another model): out of rotation
            # until its model list is read again, and the request goes to another engine.
            member.monitor.mark_unreachable()
            raise EngineUnavailableError("the merged engine no longer serves the adapter") from None

    @staticmethod
    async def _guard(member: EngineMember, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except EngineUnavailableError:
            member.monitor.mark_unreachable()
            raise

    def _mode(self, target: Target, member: EngineMember) -> ServingMode:
        adapter = target.adapter
        if adapter is None:
            return "base"
        if member.monitor.merged == adapter.digest:
            return "merged"
        # Promoted, but no merged engine was up or had room.
        return "fallback" if adapter.merged_copy(self._base_revision) else "hotswap"

    def _count(self, target: Target, usage: Any, mode: ServingMode) -> None:
        label = target.metrics_label
        self._metrics.generation_requests.labels(label, mode).inc()
        if isinstance(usage, dict):
            for kind in ("prompt", "completion"):
                tokens = usage.get(f"{kind}_tokens")
                if isinstance(tokens, int) and tokens >= 0:
                    self._metrics.generation_tokens.labels(label, mode, kind).inc(tokens)

    async def _resolve(self, tenant: Tenant, model: str) -> tuple[Target, Callable[[], None]]:
        """What `model` names, and a hold on the adapter version it names (the release is
        returned): from here its files stay, even if the adapter is replaced or deleted while the
        request waits (for a claim, the queue, a slot) before it pins the adapter."""
        if model == self._base.name:
            return Target(model, model, None), _nothing
        for attempt in range(1, RESOLVE_ATTEMPTS + 1):
            record, on_thread = None, False
            if ADAPTER_NAME.fullmatch(model):
                # A record held in memory costs one stat here, a microsecond; only the first
                # request for a name, or the first after its file changed, pays a read on a
                # worker thread (30-70 us for the hop alone: loadtests/bench_hot_path.py).
                record = self._registry.peek(tenant.name, model)
                if record is None:
                    on_thread = True
                    record = await asyncio.to_thread(self._registry.get, tenant.name, model)
            if record is None:
                # Another tenant's adapter answers exactly like one that does not exist.
                raise ModelNotFoundError(
                    f"The model `{model}` does not exist or you do not have access to it.",
                    param="model",
                )
            release = self._pool.hold(record.digest)
            # Read from memory, nothing ran between the read and the hold. A record read on a
            # worker thread may predate a replace or delete that committed, and collected its
            # files, before the hold: held now, check it is still the current one.
            current = self._registry.peek(tenant.name, model) if on_thread else record
            if current == record or attempt == RESOLVE_ATTEMPTS:
                return Target(model, adapter_label(tenant.name, model), record), release
            release()
        raise AssertionError("unreachable")  # the last attempt always returns

    async def _prepare(self, tenant: Tenant, request: GenerationRequest) -> Job:
        target, release = await self._resolve(tenant, request.model)
        try:
            budget = await self._bounds.check(request)
        except BaseException:
            release()
            raise
        body = request.engine_body()
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = budget.max_tokens
        kind: GenerationKind = (
            "chat" if isinstance(request, ChatCompletionRequest) else "completions"
        )
        return Job(target, kind, body, budget, release)


def _nothing() -> None:
    return None


def _settle_on(stack: AsyncExitStack, reservation: TokenReservation) -> None:
    """Settle `reservation` when `stack` closes: unused tokens back, the slot released."""

    async def settle(
        _: type[BaseException] | None, exc: BaseException | None, __: TracebackType | None
    ) -> bool:
        await reservation.close(engine_refused=engine_refused(exc))
        return False

    stack.push_async_exit(settle)


async def _iterate(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event
