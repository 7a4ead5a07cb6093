"""The app factory and its lifespan, which owns every resource: the tenants directory, the
engine client, a local engine process when there is one, the engine monitor task, the Redis link,
the adapter store, registry and engine-side adapter slots, and the services built on them.
The metrics registry is made here too; `loragate serve` serves it on its own listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters.registry import LocalAdapterRegistry
from adapters.store import LocalAdapterStore
from adapters.types import BaseModelSpec
from adapters.validation import ValidationLimits
from server.adapter_admin import AdapterAdminService
from server.cache.policy import base_revision
from server.cache.result_cache import ResultCache
from server.cache.result_store import MemoryResultStore, RedisResultStore, ResultStore
from server.deps import Services
from server.engines.adapter_slots import AdapterSlots
from server.engines.admission import EngineAdmission
from server.engines.base import Engine
from server.engines.monitor import EngineMonitor
from server.engines.openai_http import OpenAIHttpEngine
from server.engines.process import (
    EngineProcess,
    EngineStartError,
    fake_argv,
    free_loopback_port,
    vllm_argv,
)
from server.errors import register_error_handlers
from server.generation.request_bounds import RequestBounds
from server.generation.serving import GenerationService
from server.generation.token_count import TokenCounter
from server.limits.backends import RedisLimits
from server.limits.tenant_limits import TenantLimiter
from server.metrics import Metrics
from server.middleware import BodySizeLimitMiddleware, MetricsMiddleware
from server.openapi import install_openapi
from server.redis_link import RedisLink
from server.routes import admin_adapters, openai_api, probes
from server.settings import Settings
from server.tenants import TenantDirectory, open_tenants_file

logger = logging.getLogger(__name__)

DEV_TENANTS_WARNING = (
    "RUNNING WITH A DEV TENANTS FILE (`dev: true`): its API keys are public. "
    "Never expose this server; set LORAGATE_TENANTS_FILE to your own file."
)


def vllm_engine_at(settings: Settings, base_url: str) -> OpenAIHttpEngine:
    e = settings.engine
    return OpenAIHttpEngine(base_url, e.request_timeout_s, e.connect_timeout_s)


def load_tenants(settings: Settings) -> TenantDirectory:
    """The tenants file; a dev file is refused on a non-loopback host unless allowed
    (`open_tenants_file`), and warned about whenever it is served."""
    tenants = open_tenants_file(
        settings.tenants_file, settings.host, allow_dev=settings.allow_dev_tenants
    )
    if tenants.is_dev:
        logger.warning(DEV_TENANTS_WARNING)
    return tenants


def load_base_spec(settings: Settings) -> BaseModelSpec | None:
    """The base model's shapes, to validate uploads against; None without a local config."""
    config_path = settings.model_path / "config.json"
    try:
        return BaseModelSpec.from_hf_config(json.loads(config_path.read_text()))
    except (OSError, ValueError, KeyError) as e:
        logger.warning("cannot read %s (%s): adapter uploads will be refused", config_path, e)
        return None


def validation_limits(settings: Settings) -> ValidationLimits:
    a = settings.adapters
    return ValidationLimits(
        max_config_bytes=a.max_config_bytes,
        max_weights_bytes=a.max_upload_bytes,
        max_rank=settings.engine.max_lora_rank,
    )


def shared_state(
    settings: Settings, metrics: Metrics
) -> tuple[RedisLink | None, ResultStore, TenantLimiter]:
    """The result store and limit counts: in Redis (shared by replicas) when it is configured,
    else in this process."""
    lease_ttl_s = settings.redis.lease_ttl_s
    if settings.redis_url is None:
        store = MemoryResultStore(settings.cache.memory_max_bytes, settings.cache.ttl_s)
        return None, store, TenantLimiter(None, metrics, lease_ttl_s)
    link = RedisLink(str(settings.redis_url), settings.redis, metrics)
    redis_store = RedisResultStore(link, settings.cache.ttl_s, settings.cache.claim_ttl_s)
    return link, redis_store, TenantLimiter(RedisLimits(link), metrics, lease_ttl_s)


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    on_fatal: Callable[[int], None] | None = None,
) -> FastAPI:
    """Build the gateway. With `engine` given (tests), no engine process or client is made;
    the app closes it when it stops."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tenants = load_tenants(settings)
        process, the_engine = _make_engine(settings, engine)
        monitor = EngineMonitor(
            the_engine, settings.engine, settings.model, metrics, process, on_fatal
        )
        monitor_task: asyncio.Task[None] | None = None
        keepers: list[asyncio.Task[None]] = []
        sweeper: asyncio.Task[None] | None = None
        admin: AdapterAdminService | None = None
        redis_link, result_store, limiter = shared_state(settings, metrics)
        store = LocalAdapterStore(settings.store_path)
        registry = LocalAdapterRegistry(settings.store_path, settings.adapters.max_per_tenant)
        adapter_slots = AdapterSlots(
            the_engine,
            lambda digest: str(store.local_dir(digest)),
            settings.max_loaded_adapters,
            metrics,
            settings.adapters.wait_for_slot_s,
        )
        try:
            if process is not None:
                process.start()
                await process.wait_healthy(the_engine.health, settings.engine.startup_timeout_s)
            await monitor.check_now()
            if redis_link is not None and not await redis_link.check():
                logger.warning("Redis is not reachable: serving without it until it is")
            monitor_task = asyncio.create_task(monitor.run(), name="engine-monitor")
            result_cache = ResultCache(result_store, settings.cache, metrics)
            # Renew leases, and make the releases Redis missed, in the background.
            keepers = [
                asyncio.create_task(limiter.run(), name="lease-keeper"),
                asyncio.create_task(result_cache.run(), name="claim-keeper"),
            ]
            bounds = RequestBounds(settings, TokenCounter.from_model_dir(settings.model_path))
            generation = GenerationService(
                settings, the_engine, monitor, metrics, bounds, registry, adapter_slots,
                result_cache, base_revision(settings),
                limiter, EngineAdmission(settings.admission, metrics, engine="local"),
            )  # fmt: skip
            admin = AdapterAdminService(
                tenants, store, registry, load_base_spec(settings), validation_limits(settings),
                settings.store_path / "uploads", adapter_slots, metrics,
                orphan_grace_s=settings.adapters.orphan_grace_s,
            )  # fmt: skip
            sweeper = asyncio.create_task(
                admin.run_sweeps(settings.adapters.sweep_interval_s), name="adapter-sweeper"
            )
            app.state.services = Services(tenants, generation, admin, monitor, metrics)
            yield
        finally:
            for task in [sweeper, *keepers]:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await adapter_slots.aclose()
            if admin is not None:  # after the slots: cancelled loads can still collect files
                await admin.aclose()
            if monitor_task is not None:
                monitor_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor_task
            # Also a given engine: its connections belong to this app's event loop.
            await the_engine.aclose()
            if redis_link is not None:
                await redis_link.aclose()
            if process is not None:
                await process.stop()

    app = FastAPI(title="loragate", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_openapi(app)
    app.state.metrics = metrics  # `loragate serve` serves its registry on the metrics listener
    register_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(probes.router)
    app.include_router(admin_adapters.router)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.limits.max_body_bytes,
        upload_prefix="/admin/v1/tenants/",
        max_upload_bytes=settings.adapters.max_upload_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _make_engine(settings: Settings, engine: Engine | None) -> tuple[EngineProcess | None, Engine]:
    if engine is not None:
        return None, engine
    if settings.engine.url is not None:
        return None, vllm_engine_at(settings, str(settings.engine.url))
    if settings.engine.kind == "vllm" and not (settings.model_path / "config.json").is_file():
        raise EngineStartError(
            f"no model at {settings.model_path}: run `loragate model prepare` first"
        )
    port = settings.engine.port or free_loopback_port()
    argv = (vllm_argv if settings.engine.kind == "vllm" else fake_argv)(settings, port)
    process = EngineProcess(argv, settings.cache_dir / "logs" / f"engine-{port}.log")
    return process, vllm_engine_at(settings, f"http://127.0.0.1:{port}")
