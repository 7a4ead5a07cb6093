"""The app factory and its lifespan, which owns every resource: the tenants directory, the
engine pool (a client, monitor, adapter slots and admission queue per engine) and a local
engine process when there is one, the Redis link, the adapter store and registry, and the
services built on them.
The metrics registry is made here too; `loragate serve` serves it on its own listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from server.adapter_admin import AdapterAdminService
from server.adapter_setup import (
    load_base_spec,
    open_adapter_store,
    open_merged_store,
    validation_limits,
)
from server.cache.policy import base_revision
from server.cache.result_cache import ResultCache
from server.cache.result_store import MemoryResultStore, RedisResultStore, ResultStore
from server.deps import Services
from server.engines.adapter_slots import ENGINE_NAME_PREFIX, AdapterSlots
from server.engines.admission import EngineAdmission
from server.engines.base import Engine
from server.engines.monitor import EngineMonitor
from server.engines.openai_http import OpenAIHttpEngine
from server.engines.pool import EngineMember, EnginePool, MemberFactory, adapters_listed
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
from server.merging.promotion import PromotionService
from server.metrics import Metrics
from server.middleware import BodySizeLimitMiddleware, MetricsMiddleware
from server.openapi import install_openapi
from server.redis_link import RedisLink
from server.routes import admin_adapters, admin_engines, openai_api, probes
from server.settings import Settings
from server.tenants import TenantDirectory, open_tenants_file

logger = logging.getLogger(__name__)

DEV_TENANTS_WARNING = (
    "RUNNING WITH A DEV TENANTS FILE (`dev: true`): its API keys are public. "
    "Never expose this server; set LORAGATE_TENANTS_FILE to your own file."
)


def engine_client(settings: Settings, base_url: str, api_key: str | None) -> OpenAIHttpEngine:
    e = settings.engine
    return OpenAIHttpEngine(base_url, e.request_timeout_s, e.connect_timeout_s, api_key)


def load_tenants(settings: Settings) -> TenantDirectory:
    """The tenants file; a dev file is refused on a non-loopback host unless allowed
    (`open_tenants_file`), and warned about whenever it is served."""
    tenants = open_tenants_file(
        settings.tenants_file, settings.host, allow_dev=settings.allow_dev_tenants
    )
    if tenants.is_dev:
        logger.warning(DEV_TENANTS_WARNING)
    return tenants


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
        local = _local_engine(settings, engine)
        keepers: list[asyncio.Task[None]] = []
        sweeper: asyncio.Task[None] | None = None
        admin: AdapterAdminService | None = None
        redis_link, result_store, limiter = shared_state(settings, metrics)
        store, registry = await asyncio.to_thread(open_adapter_store, settings)
        urls = [local.url] if local is not None else settings.engine.pool_urls()
        by_path = adapter_source(settings) == "path"

        def adapter_path(digest: str) -> str | None:
            return str(store.local_dir(digest)) if by_path else None

        make_member = member_factory(settings, metrics, local, adapter_path, on_fatal)
        pool = EnginePool(
            urls, make_member, metrics,
            max_engines=settings.engine.max_engines, dns_refresh_s=settings.engine.dns_refresh_s,
        )  # fmt: skip
        try:
            if local is not None and local.process is not None:
                local.process.start()
                probe = local.client.health
                await local.process.wait_healthy(probe, settings.engine.startup_timeout_s)
            await pool.start()
            if redis_link is not None and not await redis_link.check():
                logger.warning("Redis is not reachable: serving without it until it is")
            result_cache = ResultCache(result_store, settings.cache, metrics)
            # Renew leases, and make the releases Redis missed, in the background.
            keepers = [
                asyncio.create_task(limiter.run(), name="lease-keeper"),
                asyncio.create_task(result_cache.run(), name="claim-keeper"),
            ]
            bounds = RequestBounds(settings, TokenCounter.from_model_dir(settings.model_path))
            generation = GenerationService(
                settings, pool, metrics, bounds, registry, result_cache, base_revision(settings),
                limiter,
            )  # fmt: skip
            admin = AdapterAdminService(
                tenants, store, registry, load_base_spec(settings), validation_limits(settings),
                settings.store_path / "uploads", pool, metrics,
                orphan_grace_s=settings.adapters.orphan_grace_s,
            )  # fmt: skip
            promotion = PromotionService(
                registry, store,
                open_merged_store(settings),
                settings.model_path, base_revision(settings), settings.store_path / "merges",
                timeout_s=settings.adapters.merge_timeout_s,
                quantized=settings.model.quantization != "none",
            )  # fmt: skip
            sweeper = asyncio.create_task(
                admin.run_sweeps(settings.adapters.sweep_interval_s, promotion.sweep),
                name="adapter-sweeper",
            )
            app.state.services = Services(tenants, generation, admin, pool, metrics, promotion)
            yield
        finally:
            for task in [sweeper, *keepers]:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            # Stops every monitor and closes every client (a given engine's too: its
            # connections belong to this app's event loop); the slots' loads end first.
            await pool.aclose()
            if admin is not None:  # after the slots: cancelled loads can still collect files
                await admin.aclose()
            if redis_link is not None:
                await redis_link.aclose()
            if local is not None and local.process is not None:
                await local.process.stop()

    app = FastAPI(title="loragate", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_openapi(app)
    app.state.metrics = metrics  # `loragate serve` serves its registry on the metrics listener
    register_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(probes.router)
    app.include_router(admin_adapters.router)
    app.include_router(admin_engines.router)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.limits.max_body_bytes,
        upload_prefix="/admin/v1/tenants/",
        max_upload_bytes=settings.adapters.max_upload_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


@dataclass(frozen=True)
class LocalEngine:
    """The one engine `serve` runs itself (`process`), or the one a test hands in (no process);
    `client` talks to it."""

    url: str
    client: Engine
    process: EngineProcess | None


def _local_engine(settings: Settings, engine: Engine | None) -> LocalEngine | None:
    """The engine this gateway owns, or None when it serves a pool given by URL."""
    if engine is not None:
        return LocalEngine("local://test", engine, None)
    if settings.engine.pool_urls():
        return None
    if settings.engine.kind == "vllm" and not (settings.model_path / "config.json").is_file():
        raise EngineStartError(
            f"no model at {settings.model_path}: run `loragate model prepare` first"
        )
    port = settings.engine.port or free_loopback_port()
    # The local engine's port is private, but other users of the host can reach loopback: it
    # gets a key of its own unless one is configured.
    key = settings.engine.api_key
    api_key = key.get_secret_value() if key is not None else secrets.token_urlsafe(32)
    argv = (vllm_argv if settings.engine.kind == "vllm" else fake_argv)(settings, port)
    log_path = settings.cache_dir / "logs" / f"engine-{port}.log"
    process = EngineProcess(argv, log_path, api_key=api_key)
    url = f"http://127.0.0.1:{port}"
    return LocalEngine(url, engine_client(settings, url, api_key), process)


def adapter_source(settings: Settings) -> str:
    """`path` when engines read the store's files where the gateway does (a local directory),
    `store` when they fetch blobs from the store themselves (an object store)."""
    source = settings.engine.adapter_source
    if source == "auto":
        return "store" if settings.store_location.startswith("s3://") else "path"
    return source


def member_factory(
    settings: Settings,
    metrics: Metrics,
    local: LocalEngine | None,
    adapter_path: Callable[[str], str | None],
    on_fatal: Callable[[int], None] | None,
) -> MemberFactory:
    """How the pool makes the member for an engine: the local engine's client and process, or
    a client of its own for an engine given by URL."""
    key = settings.engine.api_key
    api_key = key.get_secret_value() if key is not None else None

    def make(name: str, url: str) -> EngineMember:
        is_local = local is not None and url == local.url
        client = local.client if local is not None and is_local else None
        if client is None:
            client = engine_client(settings, url, api_key)
        label = "local" if is_local else name
        slots = AdapterSlots(
            client, adapter_path, settings.max_loaded_adapters, metrics,
            settings.adapters.wait_for_slot_s, engine_label=label,
        )  # fmt: skip
        monitor = EngineMonitor(
            client, settings.engine, settings.model, metrics,
            local.process if local is not None and is_local else None,
            on_fatal if is_local else None,
            name=label,
            on_down=slots.forget_all,
            on_models=lambda served: slots.reconcile(adapters_listed(served, ENGINE_NAME_PREFIX)),
        )  # fmt: skip
        admission = EngineAdmission(settings.admission, metrics, engine=label)
        max_active = settings.engine.max_loras
        return EngineMember(label, url, client, monitor, slots, admission, max_active)

    return make
