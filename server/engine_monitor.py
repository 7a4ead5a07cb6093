"""Whether the engine can serve right now, and what happens when a local engine dies.

`ready` is what /readyz reports and what requests check before touching the engine. It is set by
a periodic health check, and cleared at once when a request finds the engine unreachable or the
local engine process exits. A dead local engine is restarted, or the gateway is told to exit
non-zero after a grace period of answering 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from server.engine import Engine
from server.engine_process import EngineProcess, EngineStartError
from server.metrics import Metrics
from server.settings import EngineSettings

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = 5.0


class EngineMonitor:
    def __init__(
        self,
        engine: Engine,
        settings: EngineSettings,
        metrics: Metrics,
        process: EngineProcess | None = None,
        on_fatal: Callable[[int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self._process = process
        self._on_fatal = on_fatal
        self._ready = False
        self.fatal = False

    @property
    def ready(self) -> bool:
        return self._ready

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            logger.log(
                logging.INFO if ready else logging.WARNING,
                "engine is %s",
                "ready" if ready else "NOT ready",
            )
        self._ready = ready
        self._metrics.engine_up.set(1 if ready else 0)

    def mark_unreachable(self) -> None:
        """A request found the engine unreachable: stop sending it work until it is healthy."""
        self._set_ready(False)

    async def check_now(self) -> bool:
        self._set_ready(await self._engine.health())
        return self._ready

    async def run(self) -> None:
        """Poll until cancelled (the lifespan owns this task)."""
        interval = self._settings.health_interval_s
        since_check = interval
        while True:
            if self._process is not None and (code := self._process.returncode()) is not None:
                await self._on_engine_exit(code)
                if self.fatal:
                    return
                since_check = 0.0
            if since_check >= interval:
                await self.check_now()
                since_check = 0.0
            await asyncio.sleep(0.25)  # process exit is noticed within this
            since_check += 0.25

    async def _on_engine_exit(self, code: int) -> None:
        assert self._process is not None
        self._set_ready(False)
        logger.error("engine process exited with code %s", code)
        await self._process.stop()  # reap whatever of its process group outlived it
        if self._settings.restart:
            self._metrics.engine_restarts.inc()
            self._process.start()
            try:
                await self._process.wait_healthy(
                    self._engine.health, self._settings.startup_timeout_s
                )
            except EngineStartError as e:
                logger.error("engine restart failed: %s", e)
                await asyncio.sleep(RESTART_BACKOFF_S)
                return  # the next loop iteration sees the exit and tries again
            await self.check_now()
            return
        # Keep answering 503 for a moment so load balancers see /readyz fail, then exit.
        await asyncio.sleep(self._settings.exit_grace_s)
        self.fatal = True
        if self._on_fatal is not None:
            self._on_fatal(1)
