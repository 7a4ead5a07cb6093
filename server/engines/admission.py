"""Admission control: at most `max_running` requests sent to an engine at once and
`max_queued` more waiting in the gateway for a turn (first come, first served). Beyond that,
or after waiting `queue_timeout_s`, the request is refused with 503 and Retry-After: the server
is full, whoever the tenant. Per-tenant quotas (429) are `tenant_limits`' business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from server.errors import ServerOverloadedError
from server.metrics import Metrics
from server.settings import AdmissionSettings


class EngineAdmission:
    def __init__(self, settings: AdmissionSettings, metrics: Metrics, engine: str) -> None:
        self.max_running = settings.max_running
        self._max_queued = settings.max_queued
        self._timeout_s = settings.queue_timeout_s
        self._slots = asyncio.Semaphore(settings.max_running)
        self._queued = 0
        self._running = 0
        self._metrics = metrics
        self._engine = engine
        self._depth = metrics.engine_queue_depth.labels(engine)
        self._in_flight = metrics.engine_running.labels(engine)
        self._sent = metrics.engine_requests.labels(engine)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return self._running

    async def acquire(self) -> Callable[[], None]:
        """Wait for a turn on the engine; returns the release, which the caller must call once."""
        if self._slots.locked() or self._queued:
            if self._queued >= self._max_queued:
                self._reject("full", "the server is at capacity: try again shortly")
            self._queued += 1
            self._depth.set(self._queued)
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                self._reject("timeout", f"no engine capacity within {self._timeout_s:g} s")
            finally:
                self._queued -= 1
                self._depth.set(self._queued)
        else:
            await self._slots.acquire()  # free: returns at once
        self._running += 1
        self._in_flight.set(self._running)
        self._sent.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._running -= 1
                self._in_flight.set(self._running)
                self._slots.release()

        return release

    def _reject(self, reason: str, message: str) -> None:
        self._metrics.admission_rejections.labels(self._engine, reason).inc()
        raise ServerOverloadedError(message)
