"""`loragate engine`: what an engine pod runs. It starts vLLM (or the fake) listening on the pod's
address, with every adapter of the store loadable by digest (the `store_resolver` plugin, which
the environment switches on for that process only), or with `--merged` one adapter's merged
copy (`merged_model`, following the adapter's current version), and every route but /health
behind the secret gateways and engines share, and supervises it: a dead engine is restarted or
ends the command non-zero (the pod restarts); SIGTERM stops the engine's whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from server.engine_servers.merged_model import MergedFollower, MergedModel, NotServableError
from server.engine_servers.store_resolver import RESOLVER_ENV
from server.engines.openai_http import OpenAIHttpEngine
from server.engines.process import EngineProcess, EngineStartError, fake_argv, vllm_argv
from server.settings import Settings

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = 5.0


def engine_argv(
    settings: Settings, host: str, port: int, merged: MergedModel | None = None
) -> list[str]:
    if settings.engine.kind == "vllm":
        served = None if merged is None else (merged.directory, merged.served_name)
        return vllm_argv(settings, port, host, merged=served)
    if merged is not None:
        return fake_argv(settings, port, host, served_name=merged.served_name)
    return [*fake_argv(settings, port, host), "--resolve-adapters"]


@dataclass(frozen=True)
class Following:
    """How a merged engine follows its adapter: what to serve now, and the engine command for it."""

    follower: MergedFollower
    argv_for: Callable[[MergedModel], list[str]]


async def supervise(
    process: EngineProcess,
    settings: Settings,
    health_url: str,
    following: Following | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the engine until SIGTERM/SIGINT or `stop` (0), or until it dies and is not restarted
    (1). With `following`, wait for a servable merged copy first, and stop serving it (and wait
    again) once its version is replaced, demoted or deleted."""
    loop = asyncio.get_running_loop()
    poll_s = settings.engine.merged_poll_s
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    probe = OpenAIHttpEngine(health_url, 10, settings.engine.connect_timeout_s)
    try:
        while True:
            serving = None
            if following is not None:
                serving = await _servable(following, poll_s, stop)
                if serving is None:
                    return 0
                process.argv = following.argv_for(serving)
            process.start()
            await _until_healthy_or_stopped(process, probe, settings, stop)
            retired = None
            next_check = loop.time() + poll_s
            while not stop.is_set() and process.returncode() is None and retired is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
                if following is not None and serving is not None and loop.time() >= next_check:
                    retired = await asyncio.to_thread(following.follower.retired, serving)
                    next_check = loop.time() + poll_s
            if stop.is_set():
                return 0
            if retired is not None:
                logger.warning("%s: no longer serving its merged copy", retired)
                await process.stop()
                continue
            logger.error("engine exited with code %s", process.returncode())
            await process.stop()  # whatever of its group outlived it
            if not settings.engine.restart:
                return 1
            await asyncio.sleep(RESTART_BACKOFF_S)
    finally:
        await process.stop()
        await probe.aclose()


async def _until_healthy_or_stopped(
    process: EngineProcess, probe: OpenAIHttpEngine, settings: Settings, stop: asyncio.Event
) -> None:
    """Wait for the engine to come up, or for SIGTERM: a pod deleted while vLLM loads (tens of
    seconds, minutes on a GPU) stops at once, not after the load."""
    healthy = asyncio.create_task(
        process.wait_healthy(probe.health, settings.engine.startup_timeout_s)
    )
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((healthy, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (healthy, stopped):
            task.cancel()
    if healthy.done() and not healthy.cancelled():
        if (error := healthy.exception()) is None:
            logger.info("engine serving")
        elif isinstance(error, EngineStartError):
            logger.error("%s", error)
        else:
            raise error


async def _servable(following: Following, poll_s: float, stop: asyncio.Event) -> MergedModel | None:
    """The merged model to serve, once there is one (None: stopped while waiting). Until then
    nothing listens on the engine's port: gateways and readiness probes see it down."""
    said = None
    while not stop.is_set():
        try:
            return await asyncio.to_thread(following.follower.resolve)
        except NotServableError as e:
            if e.message != said:
                logger.warning("not serving yet: %s (checked again every %g s)", e.message, poll_s)
                said = e.message
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_s)
    return None


def run_engine(settings: Settings, host: str, port: int, merged_spec: str | None = None) -> int:
    """`merged_spec` (TENANT/NAME): serve that adapter's merged copy instead of the base,
    following the adapter's current version."""
    key = settings.engine.api_key
    if key is None:
        raise EngineStartError(
            "LORAGATE_ENGINE__API_KEY is not set: an engine port takes runtime adapter loads, "
            "so it never runs without the secret the gateways send"
        )
    if settings.engine.kind == "vllm" and not (settings.model_path / "config.json").is_file():
        raise EngineStartError(
            f"no model at {settings.model_path}: run `loragate model prepare` first"
        )
    following = None
    if merged_spec is not None:
        following = Following(
            MergedFollower(settings, merged_spec),
            functools.partial(engine_argv, settings, host, port),
        )
    process = EngineProcess(
        engine_argv(settings, host, port),
        None,  # the engine's output is the pod's log
        api_key=key.get_secret_value(),
        extra_env={RESOLVER_ENV: "1"},
    )
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return asyncio.run(supervise(process, settings, f"http://{probe_host}:{port}", following))
