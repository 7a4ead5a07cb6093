"""The Redis link's circuit breaker, against a real redis-server: one slow reply or a starved
event loop does not open it; failures in a row or a refused connection do; while open it costs
nothing; after the retry period exactly one probe call decides whether it closes again."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from server.metrics import Metrics
from server.redis_link import RedisCircuitOpenError, RedisLink, RedisUnavailableError
from server.settings import RedisSettings
from tests.redis_server import RedisServer

TIMEOUT_S = 0.1
# Far longer than any test waits, except the ones that wait for it: a breaker opened by mistake
# stays open for the rest of the test and fails it.
LONG = RedisSettings(timeout_s=TIMEOUT_S, retry_after_s=30, failure_threshold=3)
SHORT = RedisSettings(timeout_s=TIMEOUT_S, retry_after_s=0.4, failure_threshold=3)
FAST_S = 0.03  # a refused call returns well within this; one that reached a stalled Redis cannot


@pytest.fixture
async def make_link(redis: RedisServer) -> AsyncIterator[Callable[[RedisSettings], RedisLink]]:
    links: list[RedisLink] = []

    def make(settings: RedisSettings) -> RedisLink:
        links.append(RedisLink(redis.url, settings, Metrics()))
        return links[-1]

    try:
        yield make
    finally:
        redis.ensure_running()
        for link in links:
            await link.aclose()


async def ping(link: RedisLink) -> bool:
    return await link.call("ping", lambda client: client.ping())


async def timed(call: Awaitable[Any]) -> tuple[BaseException | None, float]:
    """The call's error (None if it succeeded) and how long it took."""
    started = time.perf_counter()
    try:
        await call
    except RedisUnavailableError as e:
        return e, time.perf_counter() - started
    return None, time.perf_counter() - started


def block_the_loop(seconds: float) -> None:
    """What a CPU-bound step or a stray blocking call in any coroutine does to every other one."""
    time.sleep(seconds)


def redis_up(link: RedisLink) -> float | None:
    return link._metrics.registry.get_sample_value("loragate_redis_up")


def commands_processed(redis: RedisServer) -> int:
    """Redis's own count of the commands it ran (the INFO asking for it included)."""
    info = redis.command("INFO", "stats").decode()
    return int(info.split("total_commands_processed:", 1)[1].split()[0])


async def open_by_timeouts(link: RedisLink, redis: RedisServer) -> None:
    """Stall Redis for three calls in a row, then let it answer again (the breaker stays open)."""
    redis.pause()
    try:
        for _ in range(3):
            with pytest.raises(RedisUnavailableError):
                await ping(link)
    finally:
        redis.resume()


async def test_one_slow_reply_does_not_open_the_breaker(
    make_link: Callable[[RedisSettings], RedisLink], redis: RedisServer
) -> None:
    link = make_link(LONG)
    assert await ping(link)
    redis.pause()
    slow = asyncio.create_task(ping(link))
    await asyncio.sleep(TIMEOUT_S * 1.5)
    redis.resume()
    with pytest.raises(RedisUnavailableError):
        await slow
    assert await ping(link)  # went to Redis: not refused
    assert redis_up(link) == 1


async def test_timeouts_of_a_starved_event_loop_do_not_count(
    make_link: Callable[[RedisSettings], RedisLink], redis: RedisServer
) -> None:
    link = make_link(LONG)
    await asyncio.gather(*(ping(link) for _ in range(20)))  # 20 pooled connections, ready
    redis.pause()  # for far less than the timeout: just so that every call is in flight
    calls = [asyncio.create_task(ping(link)) for _ in range(20)]
    await asyncio.sleep(0.02)
    redis.resume()
    block_the_loop(2 * TIMEOUT_S)  # meanwhile Redis answers every call
    results = await asyncio.gather(*calls, return_exceptions=True)
    # The replies were there in time; the loop was too late to read them.
    assert any(isinstance(r, RedisUnavailableError) for r in results), results
    assert await ping(link)
    assert redis_up(link) == 1


async def test_three_failures_in_a_row_open_it_and_then_calls_skip_redis(
    make_link: Callable[[RedisSettings], RedisLink], redis: RedisServer
) -> None:
    link = make_link(LONG)
    assert await ping(link)
    redis.pause()
    try:
        for _ in range(2):
            error, took = await timed(ping(link))
            assert error is not None and took >= TIMEOUT_S  # it asked Redis: still closed
        assert redis_up(link) == 1
        error, took = await timed(ping(link))
        assert error is not None and took >= TIMEOUT_S
        assert redis_up(link) == 0
        error, took = await timed(ping(link))  # Redis is stalled: only a refusal is this fast
        assert isinstance(error, RedisCircuitOpenError) and took < FAST_S
    finally:
        redis.resume()
    before = commands_processed(redis)
    results = await asyncio.gather(*(ping(link) for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, RedisCircuitOpenError) for r in results), results
    assert commands_processed(redis) == before + 1  # only the INFO above
    assert link._metrics.registry.get_sample_value(
        "loragate_redis_errors_total", {"op": "ping"}
    ) == 3  # fmt: skip


async def test_after_the_retry_period_one_probe_goes_and_its_success_closes_it(
    make_link: Callable[[RedisSettings], RedisLink], redis: RedisServer
) -> None:
    link = make_link(SHORT)
    assert await ping(link)
    await open_by_timeouts(link, redis)
    await asyncio.sleep(SHORT.retry_after_s)
    redis.pause()  # the probe waits for Redis; meanwhile everyone else must not
    probe = asyncio.create_task(ping(link))
    await asyncio.sleep(0.01)
    others = await asyncio.gather(*(timed(ping(link)) for _ in range(5)))
    assert all(isinstance(e, RedisCircuitOpenError) and took < FAST_S for e, took in others)
    redis.resume()  # in time for the probe's reply
    assert await probe
    assert redis_up(link) == 1
    assert all(await asyncio.gather(*(ping(link) for _ in range(5))))


async def test_a_failed_probe_opens_it_again(
    make_link: Callable[[RedisSettings], RedisLink], redis: RedisServer
) -> None:
    link = make_link(SHORT)
    assert await ping(link)
    await open_by_timeouts(link, redis)
    await asyncio.sleep(SHORT.retry_after_s)
    redis.pause()
    try:
        probe = asyncio.create_task(timed(ping(link)))
        await asyncio.sleep(0.01)
        error, took = await timed(ping(link))
        assert isinstance(error, RedisCircuitOpenError) and took < FAST_S  # the probe's turn
        error, took = await probe
        assert error is not None and took >= TIMEOUT_S
        error, took = await timed(ping(link))  # one failed probe is enough: open again
        assert isinstance(error, RedisCircuitOpenError) and took < FAST_S
        assert redis_up(link) == 0
    finally:
        redis.resume()
    await asyncio.sleep(SHORT.retry_after_s)
    assert await ping(link)
    assert redis_up(link) == 1


async def test_killed_redis_opens_it_at_once_and_recovery_is_automatic(
    make_link: Callable[[RedisSettings], RedisLink], redis: RedisServer
) -> None:
    link = make_link(SHORT)
    assert await ping(link)
    redis.kill()
    with pytest.raises(RedisUnavailableError):
        await ping(link)
    assert redis_up(link) == 0
    for _ in range(3):
        with pytest.raises(RedisCircuitOpenError):
            await ping(link)
    assert link._metrics.registry.get_sample_value(
        "loragate_redis_errors_total", {"op": "ping"}
    ) == 1  # fmt: skip
    redis.start()
    await asyncio.sleep(SHORT.retry_after_s)
    assert await ping(link)
    assert redis_up(link) == 1


async def test_a_busy_event_loop_never_gets_calls_refused(
    make_link: Callable[[RedisSettings], RedisLink],
) -> None:
    link = make_link(LONG)
    stop = threading.Event()

    def hog_the_gil() -> None:
        # One long C call holds the GIL throughout: the event loop's thread cannot run meanwhile.
        while not stop.is_set():
            sum(range(2_000_000))
            time.sleep(0.01)

    async def stall_the_loop() -> None:
        for _ in range(6):
            await asyncio.sleep(0.05)
            block_the_loop(1.5 * TIMEOUT_S)

    hog = threading.Thread(target=hog_the_gil, daemon=True)
    hog.start()
    results: list[Any] = []
    try:
        stalls = asyncio.create_task(stall_the_loop())
        while not stalls.done():
            # A reply that takes Redis 20 ms: the loop's stalls hit calls still waiting for one.
            calls = (link.call("blpop", lambda c: c.blpop(["none"], 0.02)) for _ in range(20))
            results += await asyncio.gather(*calls, return_exceptions=True)
    finally:
        stop.set()
        hog.join()
    refused = [r for r in results if isinstance(r, RedisCircuitOpenError)]
    assert not refused, f"{len(refused)} of {len(results)} calls refused: {refused[0]}"
    assert redis_up(link) == 1


async def test_connections_left_from_before_a_restart_do_not_open_it_again(
    make_link: Callable[[RedisSettings], RedisLink], redis: RedisServer
) -> None:
    """Every pooled connection dies with the old Redis and fails its next command once; each
    such command is retried on a new connection instead of opening the breaker while Redis is
    back (seen in the soak: it reopened every few seconds for 4-13 s after each restart)."""
    link = make_link(LONG)
    # Ten connections in the pool, all from before the restart.
    assert all(await asyncio.gather(*(ping(link) for _ in range(10))))
    redis.kill()
    redis.start()
    assert all(await asyncio.gather(*(ping(link) for _ in range(10))))
    assert redis_up(link) == 1
    assert link._metrics.registry.get_sample_value(
        "loragate_redis_errors_total", {"op": "ping"}
    ) is None  # fmt: skip
