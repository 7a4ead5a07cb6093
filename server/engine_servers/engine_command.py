"""`loragate engine`: what an engine pod runs. It starts vLLM (or the fake) listening on the pod's
address, with every adapter of the store loadable by digest (the `store_resolver` plugin, which
the environment switches on for that process only), or with `--merged` one adapter's merged
copy (`merged_model`), and every route but /health behind the
secret gateways and engines share, and supervises it: a dead engine is restarted or ends the
command non-zero (the pod restarts); SIGTERM stops the engine's whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from server.engine_servers.merged_model import MergedModel, resolve_merged_model
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


async def supervise(process: EngineProcess, settings: Settings, health_url: str) -> int:
    """Run the engine until SIGTERM/SIGINT (0) or until it dies and is not restarted (1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    probe = OpenAIHttpEngine(health_url, 10, settings.engine.connect_timeout_s)
    try:
        while True:
            process.start()
            try:
                await process.wait_healthy(probe.health, settings.engine.startup_timeout_s)
                logger.info("engine serving")
            except EngineStartError as e:
                logger.error("%s", e)
            while not stop.is_set() and process.returncode() is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
            if stop.is_set():
                return 0
            logger.error("engine exited with code %s", process.returncode())
            await process.stop()  # whatever of its group outlived it
            if not settings.engine.restart:
                return 1
            await asyncio.sleep(RESTART_BACKOFF_S)
    finally:
        await process.stop()
        await probe.aclose()


def run_engine(settings: Settings, host: str, port: int, merged_spec: str | None = None) -> int:
    """`merged_spec` (TENANT/NAME): serve that adapter's merged copy instead of the base."""
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
    merged = None if merged_spec is None else resolve_merged_model(settings, merged_spec)
    process = EngineProcess(
        engine_argv(settings, host, port, merged),
        None,  # the engine's output is the pod's log
        api_key=key.get_secret_value(),
        extra_env={RESOLVER_ENV: "1"},
    )
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return asyncio.run(supervise(process, settings, f"http://{probe_host}:{port}"))
