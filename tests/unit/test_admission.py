"""Admission control: a bounded number running on the engine, a bounded queue, 503 beyond."""

from __future__ import annotations

import asyncio

import pytest

from server.engines.admission import EngineAdmission
from server.errors import ServerOverloadedError
from server.metrics import Metrics
from server.settings import AdmissionSettings


def admission(running: int, queued: int, timeout_s: float = 5) -> EngineAdmission:
    settings = AdmissionSettings(max_running=running, max_queued=queued, queue_timeout_s=timeout_s)
    return EngineAdmission(settings, Metrics(), engine="local")


async def test_requests_beyond_running_queue_and_beyond_queue_are_refused() -> None:
    gate = admission(running=2, queued=1)
    first, second = await gate.acquire(), await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    assert (gate.running, gate.queued) == (2, 1)
    with pytest.raises(ServerOverloadedError) as refused:
        await gate.acquire()
    assert refused.value.status_code == 503
    assert refused.value.headers() == {"Retry-After": "1"}
    first()
    third = await asyncio.wait_for(waiting, 1)  # the queued request gets the freed turn
    assert (gate.running, gate.queued) == (2, 0)
    second()
    third()
    third()  # releasing twice is harmless
    assert gate.running == 0


async def test_queue_is_first_come_first_served() -> None:
    gate = admission(running=1, queued=3)
    release = await gate.acquire()
    order: list[int] = []

    async def wait_turn(i: int) -> None:
        done = await gate.acquire()
        order.append(i)
        done()

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(wait_turn(i)))
        await asyncio.sleep(0)
    release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


async def test_a_request_waits_at_most_the_queue_timeout() -> None:
    metrics = Metrics()
    settings = AdmissionSettings(max_running=1, max_queued=5, queue_timeout_s=0.05)
    gate = EngineAdmission(settings, metrics, engine="local")
    await gate.acquire()
    with pytest.raises(ServerOverloadedError):
        await gate.acquire()
    assert gate.queued == 0
    rejected = metrics.registry.get_sample_value(
        "loragate_admission_rejections_total", {"engine": "local", "reason": "timeout"}
    )
    assert rejected == 1
