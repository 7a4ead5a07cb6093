"""The gateway's one Redis connection pool, and what keeps Redis from being a single point of
failure: every call is bounded by a short timeout, and after a failure Redis is left alone for
`retry_after_s` (callers go on without it, failing fast) before the next call tries it again. So
a dead or stalled Redis costs at most one timeout per retry period, and recovery needs no one.

A command's answer is bounded by `timeout_s` (the socket timeout); opening a connection by
`connect_timeout_s`; the whole call by both together, whatever redis-py does inside.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from server.metrics import Metrics
from server.settings import RedisSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CONNECTIONS = 256


class RedisUnavailableError(Exception):
    """Redis did not answer in time, or is being left alone after a failure."""


class RedisLink:
    def __init__(self, url: str, settings: RedisSettings, metrics: Metrics) -> None:
        self._deadline_s = settings.timeout_s + settings.connect_timeout_s
        self._retry_after_s = settings.retry_after_s
        self._prefix = settings.key_prefix
        self._metrics = metrics
        # No client-side retries: a failed call fails now and the caller goes on without Redis.
        # A blocking pool bounds connections; waiting for one counts against the same timeout.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=settings.timeout_s,
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self.client = Redis(connection_pool=pool)
        self._down_until = 0.0
        self._up = True
        metrics.redis_up.set(1)

    def key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def call(self, op: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        """Run `command` against Redis within the timeout, or raise RedisUnavailableError."""
        if time.monotonic() < self._down_until:
            raise RedisUnavailableError("Redis is down; retrying it shortly")
        try:
            async with asyncio.timeout(self._deadline_s):
                result = await command(self.client)
        except (RedisError, OSError, TimeoutError) as e:
            self._mark_down(op, e)
            raise RedisUnavailableError(f"Redis {op} failed: {e!r}") from e
        if not self._up:
            self._up = True
            self._metrics.redis_up.set(1)
            logger.info("Redis is reachable again")
        return result

    def _mark_down(self, op: str, error: BaseException) -> None:
        self._metrics.redis_errors.labels(op).inc()
        self._down_until = time.monotonic() + self._retry_after_s
        if self._up:
            self._up = False
            self._metrics.redis_up.set(0)
            logger.warning(
                "Redis %s failed (%r): serving without Redis, retrying in %.1f s",
                op, error, self._retry_after_s,
            )  # fmt: skip

    async def check(self) -> bool:
        """Ping Redis once (at start-up: to log its state, and open the first connection)."""
        try:
            await self.call("ping", lambda client: client.ping())
        except RedisUnavailableError:
            return False
        return True

    async def aclose(self) -> None:
        await self.client.aclose()
