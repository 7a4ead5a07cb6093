"""Per-tenant limits from the tenants file: requests per minute (every request, cache hits
included), and tokens per minute and concurrent requests (work that reaches the engine).

With Redis the counts are shared by every gateway replica. When Redis is down each replica
enforces every limit on its own (so N replicas admit up to N times a limit) rather than failing
closed or dropping limits altogether; `loragate_limit_local_fallbacks_total` counts those checks.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from server.errors import LoragateError, RateLimitError
from server.limit_backends import NEVER, LimitBackend, LocalLimits
from server.metrics import Metrics
from server.redis_link import RedisUnavailableError
from server.tenants import Tenant

T = TypeVar("T")

MINUTE_S = 60.0


@dataclass
class TokenReservation:
    """Tokens and a concurrency slot held for one engine request; `close` settles them."""

    reserved: int
    _refund: Callable[[int], Awaitable[None]]
    _release: Callable[[], Awaitable[None]]
    used: int | None = None

    def record_usage(self, tokens: int) -> None:
        self.used = tokens

    async def close(self, engine_refused: bool = False) -> None:
        """Give back what was not used: everything after an engine error, nothing when usage
        is unknown (a request cancelled or a stream cut short still cost the engine)."""
        if engine_refused:
            unused = self.reserved
        elif self.used is not None:
            unused = self.reserved - self.used
        else:
            unused = 0
        try:
            if unused > 0:
                await self._refund(unused)
        finally:
            await self._release()


async def _nothing() -> None:
    return None


class TenantLimiter:
    def __init__(self, shared: LimitBackend | None, metrics: Metrics, slot_ttl_s: float) -> None:
        self._shared = shared
        self._local = LocalLimits()
        self._metrics = metrics
        self._slot_ttl_s = slot_ttl_s

    async def check_request(self, tenant: Tenant) -> None:
        """Count one request against requests_per_minute, or raise 429."""
        rpm = tenant.limits.requests_per_minute
        if rpm is None:
            return
        wait_s, _ = await self._on(lambda b: b.take(f"{tenant.name}:rpm", rpm, rpm / MINUTE_S, 1))
        if wait_s > 0:
            self._reject(
                "requests_per_minute",
                f"Rate limit reached for {tenant.name}: {rpm} requests per minute.",
                wait_s,
            )

    async def reserve(self, tenant: Tenant, tokens: int) -> TokenReservation:
        """Take a concurrency slot and `tokens` against tokens_per_minute, or raise 429."""
        limits = tenant.limits
        release: Callable[[], Awaitable[None]] = _nothing
        if limits.max_concurrent is not None:
            release = await self._acquire_slot(tenant.name, limits.max_concurrent)
        tpm = limits.tokens_per_minute
        if tpm is None:
            return TokenReservation(tokens, lambda _: _nothing(), release)
        try:
            key = f"{tenant.name}:tpm"
            wait_s, backend = await self._on(lambda b: b.take(key, tpm, tpm / MINUTE_S, tokens))
            if wait_s == NEVER:
                self._reject(
                    "tokens_per_minute",
                    f"Request too large for {tenant.name}: it may use {tokens} tokens "
                    f"(prompt + max_tokens) and the limit is {tpm} tokens per minute; "
                    "lower max_tokens or shorten the prompt.",
                    MINUTE_S,
                )
            if wait_s > 0:
                self._reject(
                    "tokens_per_minute",
                    f"Rate limit reached for {tenant.name}: {tpm} tokens per minute "
                    f"(this request reserves {tokens}).",
                    wait_s,
                )
        except BaseException:
            await release()
            raise

        async def refund(unused: int) -> None:
            # Best effort: without Redis the bucket refills on its own within a minute.
            with contextlib.suppress(RedisUnavailableError):
                await backend.give(key, tpm, tpm / MINUTE_S, unused)

        return TokenReservation(tokens, refund, release)

    async def _acquire_slot(self, tenant: str, limit: int) -> Callable[[], Awaitable[None]]:
        key, lease = f"{tenant}:concurrent", uuid.uuid4().hex
        granted, backend = await self._on(
            lambda b: b.acquire_slot(key, limit, lease, self._slot_ttl_s)
        )
        if not granted:
            self._reject(
                "max_concurrent",
                f"Too many concurrent requests for {tenant}: at most {limit} at a time.",
                1,
            )

        async def release() -> None:
            # Without Redis the lease expires on its own after the slot TTL.
            with contextlib.suppress(RedisUnavailableError):
                await backend.release_slot(key, lease)

        return release

    async def _on(self, op: Callable[[LimitBackend], Awaitable[T]]) -> tuple[T, LimitBackend]:
        if self._shared is not None:
            try:
                return await op(self._shared), self._shared
            except RedisUnavailableError:
                self._metrics.limit_fallbacks.inc()
        return await op(self._local), self._local

    def _reject(self, limit: str, message: str, wait_s: float) -> None:
        self._metrics.limit_rejections.labels(limit).inc()
        raise RateLimitError(message, limit=limit, retry_after_s=math.ceil(wait_s))


def engine_refused(exc: BaseException | None) -> bool:
    """Whether a request ended in an engine error (refused, unreachable, failed): its tokens are
    given back, rather than charging the tenant for the engine's failure."""
    return isinstance(exc, LoragateError)
