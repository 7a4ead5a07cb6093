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
from typing import NoReturn, TypeVar

from server.errors import LoragateError, RateLimitError
from server.limits.backends import (
    NEVER,
    Bucket,
    CacheProbe,
    LimitBackend,
    LocalLimits,
    ProbeOutcome,
    RedisLimits,
    SlotAsk,
)
from server.metrics import Metrics
from server.redis_link import RedisCircuitOpenError, RedisUnavailableError, run_upkeep
from server.tenants import Tenant

T = TypeVar("T")

MINUTE_S = 60.0
MAX_RELEASES_PER_CALL = 1000
MAX_UNRELEASED = 100_000  # beyond, the oldest is left to expire


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


@dataclass(frozen=True)
class Admitted:
    """What `TenantLimiter.admit` settled in its one round trip: the cache probe's outcome
    (None: not probed, look up as usual) and the engine quota (None: not taken yet)."""

    probe: ProbeOutcome | None
    reservation: TokenReservation | None


class TenantLimiter:
    """Checks and counts each tenant's limits. Concurrency leases taken in Redis are renewed
    while their requests run (`run`), so they can expire quickly when a replica dies; a release
    that Redis missed is retried until it lands, so a Redis blip never keeps a tenant's slot."""

    def __init__(self, shared: RedisLimits | None, metrics: Metrics, lease_ttl_s: float) -> None:
        self._shared = shared
        self._local = LocalLimits()
        self._metrics = metrics
        self._lease_ttl_s = lease_ttl_s
        self._held: dict[str, set[str]] = {}  # Redis slot key -> leases of running requests
        self._unreleased: dict[tuple[str, str], None] = {}  # releases Redis missed, in order

    async def check_request(self, tenant: Tenant) -> None:
        """Count one request against requests_per_minute, or raise 429."""
        rpm = tenant.limits.requests_per_minute
        if rpm is None:
            return
        wait_s, _ = await self._on(lambda b: b.take(f"{tenant.name}:rpm", rpm, rpm / MINUTE_S, 1))
        if wait_s > 0:
            self._reject_rpm(tenant, wait_s)

    async def admit(self, tenant: Tenant, tokens: int, probe: CacheProbe | None) -> Admitted:
        """`check_request`, the cache probe and `reserve` in one Redis round trip, stopping at
        the first that answers: a hit or a request another one computes takes no engine quota.
        Raises 429 like them. Without Redis (or when it fails) only the request is counted
        here, and the caller looks up and reserves as usual."""
        if self._shared is None:
            await self.check_request(tenant)
            return Admitted(None, None)
        limits, name = tenant.limits, tenant.name
        rpm = limits.requests_per_minute
        tpm = limits.tokens_per_minute
        if probe is None and rpm is None and tpm is None and limits.max_concurrent is None:
            return Admitted(None, TokenReservation(tokens, _no_refund, _nothing))  # no trip
        lease = uuid.uuid4().hex
        slot_key = f"{name}:concurrent"
        try:
            answer = await self._shared.admit(
                Bucket(f"{name}:rpm", rpm, rpm / MINUTE_S, 1) if rpm else None,
                probe,
                SlotAsk(slot_key, limits.max_concurrent, lease, self._lease_ttl_s)
                if limits.max_concurrent
                else None,
                Bucket(f"{name}:tpm", tpm, tpm / MINUTE_S, tokens) if tpm else None,
            )
        except RedisUnavailableError as e:
            self._metrics.limit_fallbacks.inc()
            if limits.max_concurrent and not isinstance(e, RedisCircuitOpenError):
                # The script reached Redis and may still run once it answers again.
                self._remember_release(slot_key, lease)
            await self.check_request(tenant)  # Redis is skipped now: counted in process
            return Admitted(None, None)
        match answer.answer:
            case "rpm":
                self._reject_rpm(tenant, answer.wait_s)
            case "slot":
                self._reject_concurrent(tenant, limits.max_concurrent or 0)
            case "tpm":
                self._reject_tokens(tenant, tpm or 0, tokens, answer.wait_s)
            case "hit":
                return Admitted(ProbeOutcome(answer.value, False), None)
            case "follow":
                return Admitted(ProbeOutcome(None, False, answer.own_claim), None)
        release = self._redis_release(slot_key, lease) if limits.max_concurrent else _nothing
        refund = self._refund(self._shared, f"{name}:tpm", tpm) if tpm else _no_refund
        reservation = TokenReservation(tokens, refund, release)
        return Admitted(ProbeOutcome(None, answer.claimed) if probe else None, reservation)

    async def reserve(self, tenant: Tenant, tokens: int) -> TokenReservation:
        """Take a concurrency slot and `tokens` against tokens_per_minute, or raise 429."""
        limits = tenant.limits
        release: Callable[[], Awaitable[None]] = _nothing
        if limits.max_concurrent is not None:
            release = await self._acquire_slot(tenant, limits.max_concurrent)
        tpm = limits.tokens_per_minute
        if tpm is None:
            return TokenReservation(tokens, _no_refund, release)
        try:
            key = f"{tenant.name}:tpm"
            wait_s, backend = await self._on(lambda b: b.take(key, tpm, tpm / MINUTE_S, tokens))
            if wait_s > 0:
                self._reject_tokens(tenant, tpm, tokens, wait_s)
        except BaseException:
            await release()
            raise
        return TokenReservation(tokens, self._refund(backend, key, tpm), release)

    async def run(self) -> None:
        """Renew the Redis leases of running requests every third of their lifetime, and retry
        the releases Redis missed every second, until cancelled."""
        if self._shared is not None:
            await run_upkeep("lease", self.retry_releases, self.renew_leases, self._lease_ttl_s / 3)

    async def renew_leases(self) -> None:
        if self._shared is None or not self._held:
            return
        held = {key: list(leases) for key, leases in self._held.items()}
        # Failing, the leases live until their expiry; renewed on the next round.
        with contextlib.suppress(RedisUnavailableError):
            await self._shared.renew_slots(held, self._lease_ttl_s)

    async def retry_releases(self) -> None:
        if self._shared is None or not self._unreleased:
            return
        pending = list(self._unreleased)[:MAX_RELEASES_PER_CALL]
        try:
            await self._shared.release_slots(pending)
        except RedisUnavailableError:
            return  # Redis is still away: next time
        for entry in pending:
            self._unreleased.pop(entry, None)

    @property
    def unreleased(self) -> int:
        """Releases Redis has not taken yet."""
        return len(self._unreleased)

    async def _acquire_slot(self, tenant: Tenant, limit: int) -> Callable[[], Awaitable[None]]:
        key, lease = f"{tenant.name}:concurrent", uuid.uuid4().hex
        backend: LimitBackend = self._local
        if self._shared is not None:
            try:
                granted = await self._shared.acquire_slot(key, limit, lease, self._lease_ttl_s)
                backend = self._shared
            except RedisUnavailableError as e:
                self._metrics.limit_fallbacks.inc()
                if not isinstance(e, RedisCircuitOpenError):
                    # The call reached Redis and may still run once it answers again.
                    self._remember_release(key, lease)
        if backend is self._local:
            granted = await self._local.acquire_slot(key, limit, lease, self._lease_ttl_s)
        if not granted:
            self._reject_concurrent(tenant, limit)
        if backend is self._local:
            return lambda: self._local.release_slot(key, lease)
        return self._redis_release(key, lease)

    def _redis_release(self, key: str, lease: str) -> Callable[[], Awaitable[None]]:
        """Hold `lease` (renewed while held); its release, retried if Redis misses it."""
        assert self._shared is not None
        shared = self._shared
        self._held.setdefault(key, set()).add(lease)

        async def release() -> None:
            leases = self._held.get(key)
            if leases is not None:
                leases.discard(lease)
                if not leases:
                    del self._held[key]
            try:
                await shared.release_slot(key, lease)
            except RedisUnavailableError:
                self._remember_release(key, lease)

        return release

    def _remember_release(self, key: str, lease: str) -> None:
        if len(self._unreleased) >= MAX_UNRELEASED:
            # The oldest lease is past renewal and expires on its own within its lifetime.
            del self._unreleased[next(iter(self._unreleased))]
        self._unreleased[(key, lease)] = None

    def _refund(
        self, backend: LimitBackend, key: str, tpm: int
    ) -> Callable[[int], Awaitable[None]]:
        async def refund(unused: int) -> None:
            # Best effort: without Redis the bucket refills on its own within a minute.
            with contextlib.suppress(RedisUnavailableError):
                await backend.give(key, tpm, tpm / MINUTE_S, unused)

        return refund

    async def _on(self, op: Callable[[LimitBackend], Awaitable[T]]) -> tuple[T, LimitBackend]:
        if self._shared is not None:
            try:
                return await op(self._shared), self._shared
            except RedisUnavailableError:
                self._metrics.limit_fallbacks.inc()
        return await op(self._local), self._local

    def _reject_rpm(self, tenant: Tenant, wait_s: float) -> NoReturn:
        rpm = tenant.limits.requests_per_minute
        self._reject(
            "requests_per_minute",
            f"Rate limit reached for {tenant.name}: {rpm} requests per minute.",
            wait_s,
        )

    def _reject_concurrent(self, tenant: Tenant, limit: int) -> NoReturn:
        self._reject(
            "max_concurrent",
            f"Too many concurrent requests for {tenant.name}: at most {limit} at a time.",
            1,
        )

    def _reject_tokens(self, tenant: Tenant, tpm: int, tokens: int, wait_s: float) -> NoReturn:
        if wait_s == NEVER:
            self._reject(
                "tokens_per_minute",
                f"Request too large for {tenant.name}: it may use {tokens} tokens "
                f"(prompt + max_tokens) and the limit is {tpm} tokens per minute; "
                "lower max_tokens or shorten the prompt.",
                MINUTE_S,
            )
        self._reject(
            "tokens_per_minute",
            f"Rate limit reached for {tenant.name}: {tpm} tokens per minute "
            f"(this request reserves {tokens}).",
            wait_s,
        )

    def _reject(self, limit: str, message: str, wait_s: float) -> NoReturn:
        self._metrics.limit_rejections.labels(limit).inc()
        raise RateLimitError(message, limit=limit, retry_after_s=math.ceil(wait_s))


async def _no_refund(_: int) -> None:
    return None


def engine_refused(exc: BaseException | None) -> bool:
    """Whether a request ended in an engine error (refused, unreachable, failed): its tokens are
    given back, rather than charging the tenant for the engine's failure."""
    return isinstance(exc, LoragateError)
