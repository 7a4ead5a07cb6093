"""The gateway's one Redis connection pool, and the circuit breaker that keeps Redis from being a
single point of failure: every call is bounded by a short timeout; after `failure_threshold`
failures in a row (or at once, when Redis refuses or drops the connection) Redis is left alone for
`retry_after_s` (callers go on without it, failing fast); then one probe call tries it again,
and its answer closes the breaker or opens it for another period. Recovery needs no one.

A command's answer is bounded by `timeout_s` (the socket timeout); opening a connection by
`connect_timeout_s`; the whole call by both together, whatever redis-py does inside. A timeout
that the event loop, not Redis, caused (the loop was blocked past the deadline) fails that call
but does not count against Redis.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.metrics import Metrics
from server.settings import RedisSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CONNECTIONS = 256


class RedisUnavailableError(Exception):
    """Redis did not answer in time, or is being left alone after failures."""


class RedisCircuitOpenError(RedisUnavailableError):
    """Refused without touching Redis: the breaker is open (or another call is probing it)."""


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls go to Redis; failures in a row are counted
    OPEN = "open"  # calls fail fast until the retry period is over
    HALF_OPEN = "half_open"  # one probe call goes to Redis; the others fail fast


def redis_refused(error: BaseException) -> bool:
    """Redis refused or dropped the connection: it is down, not slow, so waiting for more
    failures would only cost more calls. Running out of pooled connections is not this: the
    pool's ConnectionError then comes from a timeout waiting for one of our own connections."""
    if isinstance(error, RedisConnectionError):
        return not isinstance(error.__cause__, TimeoutError)
    return isinstance(error, ConnectionError)  # OSError's: refused, reset, broken pipe


class RedisLink:
    def __init__(self, url: str, settings: RedisSettings, metrics: Metrics) -> None:
        self._timeout_s = settings.timeout_s
        self._deadline_s = settings.timeout_s + settings.connect_timeout_s
        self._retry_after_s = settings.retry_after_s
        self._threshold = settings.failure_threshold
        self._prefix = settings.key_prefix
        self._metrics = metrics
        # One client-side retry, on a new connection, and only for a connection error: after
        # Redis restarts, every pooled connection is dead and fails its next command once; that
        # must not open the breaker again and again while Redis is back. A timeout is not
        # retried: the call fails now and the caller goes on without Redis.
        # A blocking pool bounds connections; waiting for one counts against the same timeout.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=settings.timeout_s,
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.connect_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self.client = Redis(connection_pool=pool)
        # The breaker. Only the event loop's thread touches it, and no await separates a check
        # from its update, so it needs no lock.
        self.state = BreakerState.CLOSED
        self._failures = 0  # counted failures in a row, while closed
        self._open_until = 0.0
        self._probing = False  # the one half-open call is in flight
        self._undoing: set[asyncio.Task[None]] = set()  # see call_or_undo
        metrics.redis_up.set(1)

    def key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def call(self, op: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        """Run `command` against Redis within the timeout, or raise RedisUnavailableError
        (RedisCircuitOpenError, without touching Redis, while the breaker is open)."""
        probe = self._admit()
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = asyncio.current_task()
        cancels_before = task.cancelling() if task is not None else 0
        # A marker timer due with the reply's deadline: how late the loop runs it is how late the
        # loop itself was at that moment. redis-py's own read timer is due at about the same time
        # and, after a blocked loop, fires in the same loop iteration, before the task can read a
        # reply that may have been waiting in the socket all along.
        due = loop.time() + self._timeout_s
        ran_at: list[float] = []
        marker = loop.call_at(due, lambda: ran_at.append(loop.time()))
        try:
            async with asyncio.timeout(self._deadline_s):
                result = await command(self.client)
        except (RedisError, OSError, TimeoutError) as e:
            self._metrics.redis_errors.labels(op).inc()
            self._on_failure(op, e, probe, loop_late_s=ran_at[0] - due if ran_at else 0.0)
            raise RedisUnavailableError(f"Redis {op} failed: {e!r}") from e
        finally:
            marker.cancel()
            if probe:
                self._probing = False
        self._on_success(probe)
        self._metrics.redis_call_seconds.labels(op).observe(loop.time() - started)
        if task is not None and task.cancelling() > cancels_before:
            # The caller was cancelled meanwhile, and redis-py lost it: on Python 3.11 its
            # `asyncio.wait_for` around a socket write swallows a cancellation that lands as
            # the write completes. Raised here, a request whose client left does not go on.
            raise asyncio.CancelledError
        return result

    async def call_or_undo(
        self,
        op: str,
        command: Callable[[Redis], Awaitable[T]],
        undo: Callable[[T], Awaitable[None]],
    ) -> T:
        """`call`, for a command that takes something (a lease, tokens, a claim). If the caller
        is cancelled while it runs, the command still finishes and `undo(result)` then gives
        back what it took, in the background: a client that leaves mid-admission leaks nothing."""
        running = asyncio.ensure_future(self.call(op, command))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            running.add_done_callback(lambda done: self._undo_when_done(op, done, undo))
            raise

    def _undo_when_done(
        self, op: str, done: asyncio.Future[T], undo: Callable[[T], Awaitable[None]]
    ) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # it failed: nothing to give back (one that timed out expires on its own)
        task = asyncio.ensure_future(self._undo(op, undo, done.result()))
        self._undoing.add(task)  # referenced until done
        task.add_done_callback(self._undoing.discard)

    async def _undo(self, op: str, undo: Callable[[T], Awaitable[None]], result: T) -> None:
        try:
            await undo(result)
        except RedisUnavailableError as e:
            logger.info("undoing an abandoned Redis %s failed (%s): it expires on its own", op, e)

    def _admit(self) -> bool:
        """Let the call through (True when it is the half-open probe) or refuse it."""
        if self.state is BreakerState.CLOSED:
            return False
        if self.state is BreakerState.OPEN:
            if time.monotonic() < self._open_until:
                raise RedisCircuitOpenError("Redis is down; retrying it shortly")
            self.state = BreakerState.HALF_OPEN
            logger.info("Redis retry period over: trying it with one call")
        if self._probing:
            raise RedisCircuitOpenError("Redis is being tried again; not yet back")
        self._probing = True
        return True

    def _on_failure(self, op: str, error: BaseException, probe: bool, loop_late_s: float) -> None:
        # The rule for a timeout: a healthy loop runs a timer within a millisecond or two of its
        # time. One that runs it half the timeout late or more was blocked (CPU-bound work, the
        # GIL, a blocking call) across the deadline, so Redis got no fair chance to answer: the
        # call fails, but the timeout measured the loop, not Redis, and is not counted.
        timed_out = isinstance(error, (TimeoutError, RedisTimeoutError))
        if timed_out and loop_late_s >= self._timeout_s / 2:
            logger.debug(
                "Redis %s timed out, the event loop %.3f s late: not counted", op, loop_late_s
            )
            return
        if probe:
            self._open(f"Redis is still failing ({error!r})")
        elif self.state is BreakerState.CLOSED:
            # Calls that fail while the breaker is already open began before it opened: they
            # say nothing new, and do not extend the period.
            self._failures += 1
            if redis_refused(error):
                self._open(f"Redis {op} failed ({error!r}): it is down")
            elif self._failures >= self._threshold:
                self._open(f"Redis {op} failed {self._failures} times in a row (last: {error!r})")

    def _on_success(self, probe: bool) -> None:
        if self.state is BreakerState.CLOSED:
            self._failures = 0
        elif probe:
            self.state = BreakerState.CLOSED
            self._failures = 0
            self._metrics.redis_up.set(1)
            logger.info("Redis is reachable again")

    def _open(self, why: str) -> None:
        self.state = BreakerState.OPEN
        self._open_until = time.monotonic() + self._retry_after_s
        self._metrics.redis_up.set(0)
        logger.warning("%s: serving without Redis, retrying in %.1f s", why, self._retry_after_s)

    async def check(self) -> bool:
        """Ping Redis once (at start-up: to log its state, and open the first connection)."""
        try:
            await self.call("ping", lambda client: client.ping())
        except RedisUnavailableError:
            return False
        return True

    async def aclose(self) -> None:
        await self.client.aclose()


async def run_upkeep(
    name: str,
    retry: Callable[[], Awaitable[None]],
    renew: Callable[[], Awaitable[None]],
    renew_every_s: float,
    retry_every_s: float = 1.0,
) -> None:
    """Until cancelled: `retry` (what Redis missed) every `retry_every_s`, and `renew` (what
    this process holds in Redis) every `renew_every_s`. An error is logged, never the end of
    the loop: renewals must not stop for the process's life."""
    loop = asyncio.get_running_loop()
    next_renewal = loop.time() + renew_every_s
    while True:
        await asyncio.sleep(min(retry_every_s, renew_every_s))
        try:
            await retry()
            if loop.time() >= next_renewal:
                next_renewal = loop.time() + renew_every_s
                await renew()
        except Exception:
            logger.exception("%s upkeep failed; trying again", name)
