"""The engine's adapter slots: single-flight loads, LRU eviction of idle adapters only, waiting
(bounded) for a slot when every loaded adapter is busy."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.engines.adapter_slots import AdapterSlots, engine_name
from server.errors import EngineUnavailableError
from server.metrics import Metrics


class RecordingEngine:
    """Only the adapter half of the Engine protocol, recording what happens."""

    def __init__(self, load_s: float = 0.0) -> None:
        self.load_s = load_s
        self.loaded: set[str] = set()
        self.events: list[str] = []

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.sleep(self.load_s)
        self.loaded.add(name)
        self.events.append(f"load {name[-1]}")

    async def unload_adapter(self, name: str) -> None:
        self.loaded.discard(name)
        self.events.append(f"unload {name[-1]}")


def make(
    capacity: int, load_s: float = 0.0, wait_s: float = 5.0
) -> tuple[AdapterSlots, RecordingEngine]:
    engine = RecordingEngine(load_s)
    adapters = AdapterSlots(engine, lambda d: f"/store/{d}", capacity, Metrics(), wait_s)  # type: ignore[arg-type]
    return adapters, engine


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_many_acquires_at_once_load_once() -> None:
    adapters, engine = make(capacity=2, load_s=0.05)
    leases = await asyncio.gather(*(adapters.acquire("A") for _ in range(10)))
    assert engine.events == ["load A"]
    assert {lease.engine_name for lease in leases} == {engine_name("A")}


async def test_busy_adapter_is_never_evicted_the_newcomer_waits() -> None:
    adapters, engine = make(capacity=1)
    lease_a = await adapters.acquire("A")
    waiting_b = asyncio.create_task(adapters.acquire("B"))
    await settle()
    assert not waiting_b.done()
    assert engine.loaded == {engine_name("A")}  # A is busy: not touched
    lease_a.release()
    lease_b = await asyncio.wait_for(waiting_b, 2)
    await settle()
    assert engine.loaded == {engine_name("B")}
    assert engine.events == ["load A", "unload A", "load B"]
    lease_b.release()


async def test_waiting_for_a_slot_is_bounded() -> None:
    adapters, _ = make(capacity=1, wait_s=0.05)
    lease = await adapters.acquire("A")
    with pytest.raises(EngineUnavailableError) as caught:
        await adapters.acquire("B")
    assert caught.value.retry_after_s
    lease.release()


async def test_least_recently_used_idle_adapter_goes_first() -> None:
    adapters, engine = make(capacity=2)
    for digest in ("A", "B", "A"):
        (await adapters.acquire(digest)).release()
    (await adapters.acquire("C")).release()
    await settle()
    assert engine.loaded == {engine_name("A"), engine_name("C")}


async def test_reload_keeps_the_pin() -> None:
    adapters, engine = make(capacity=1)
    lease = await adapters.acquire("A")
    engine.loaded.clear()  # the engine restarted
    await adapters.reload("A")
    assert engine.loaded == {engine_name("A")}
    waiting_b = asyncio.create_task(adapters.acquire("B"))
    await settle()
    assert not waiting_b.done()  # A is still pinned by the lease
    lease.release()
    (await asyncio.wait_for(waiting_b, 2)).release()


async def test_failed_load_reaches_every_waiter_and_frees_the_slot() -> None:
    adapters, engine = make(capacity=1, load_s=0.02)

    async def broken(name: str, path: str) -> None:
        await asyncio.sleep(0.02)
        raise EngineUnavailableError("engine down")

    engine.load_adapter = broken  # type: ignore[method-assign]
    results: list[Any] = await asyncio.gather(
        *(adapters.acquire("A") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, EngineUnavailableError) for r in results)
    engine.load_adapter = RecordingEngine.load_adapter.__get__(engine)  # type: ignore[method-assign]
    (await adapters.acquire("B")).release()
    assert engine.loaded == {engine_name("B")}


def test_lease_release_is_idempotent() -> None:
    async def run() -> None:
        adapters, _ = make(capacity=1)
        lease = await adapters.acquire("A")
        lease.release()
        lease.release()
        assert not adapters.in_use("A")

    asyncio.run(run())


async def test_a_hold_keeps_the_version_in_use_but_does_not_pin_it() -> None:
    """A request waiting before its turn holds its version (files stay) without keeping an
    idle adapter loaded: waiting requests must never keep others from a slot."""
    adapters, engine = make(capacity=1)
    idle: list[str] = []
    adapters.on_idle(idle.append)
    (await adapters.acquire("A")).release()
    idle.clear()
    release = adapters.hold("A")
    assert adapters.in_use("A")
    lease_b = await adapters.acquire("B")  # A is idle: evicted for B despite the hold
    assert engine.loaded == {engine_name("B")}
    lease_b.release()
    assert adapters.in_use("A") and idle == ["B"]
    release()
    release()  # idempotent
    assert not adapters.in_use("A") and idle == ["B", "A"]
