"""An adapter load is shared by every request that wants the adapter: no one waiter's
cancellation (its client went away) stops it or fails the others, and the slot accounting stays
exact whichever way it ends."""

from __future__ import annotations

import asyncio

import pytest

from server.engines.adapter_slots import AdapterLease, AdapterSlots
from server.errors import EngineUnavailableError
from tests.unit.test_adapter_slots import make, settle


async def assert_slots_free(adapters: AdapterSlots, capacity: int) -> None:
    """Every slot can be taken at once, without waiting (`make`'s slot wait is short here):
    nothing is left pinned or reserved."""
    leases = await asyncio.gather(*(adapters.acquire(f"free-{i}") for i in range(capacity)))
    for lease in leases:
        lease.release()


async def test_cancelling_the_request_that_started_a_load_does_not_fail_the_others() -> None:
    adapters, engine = make(capacity=2, load_s=0.2, wait_s=0.2)
    first = asyncio.create_task(adapters.acquire("A"))
    await settle()  # the load is under way, started by `first`
    others = [asyncio.create_task(adapters.acquire("A")) for _ in range(3)]
    await settle()
    first.cancel()
    results = await asyncio.gather(*others, return_exceptions=True)
    assert all(isinstance(r, AdapterLease) for r in results), results
    assert first.cancelled()
    assert engine.events == ["load lg-A"]
    assert adapters.in_use("A")  # the three leases
    for lease in results:
        assert isinstance(lease, AdapterLease)
        lease.release()
    assert not adapters.in_use("A")
    assert adapters.loaded == ["A"]
    await assert_slots_free(adapters, capacity=1)  # A is idle: evicted for the newcomer
    await adapters.aclose()


async def test_a_load_nobody_waits_for_any_more_finishes_and_stays_idle() -> None:
    adapters, engine = make(capacity=1, load_s=0.1, wait_s=0.2)
    only = asyncio.create_task(adapters.acquire("A"))
    await settle()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    await asyncio.sleep(0.2)
    assert adapters.loaded == ["A"] and engine.events == ["load lg-A"]
    assert not adapters.in_use("A")
    (await adapters.acquire("A")).release()
    assert engine.events == ["load lg-A"]  # loaded already: not again
    await assert_slots_free(adapters, capacity=1)
    await adapters.aclose()


async def test_cancelled_while_waiting_for_a_slot_releases_its_pin() -> None:
    adapters, engine = make(capacity=1, wait_s=2)
    lease_a = await adapters.acquire("A")
    waiting_b = asyncio.create_task(adapters.acquire("B"))
    await settle()
    waiting_b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting_b
    lease_a.release()
    await settle()
    assert not adapters.in_use("A") and not adapters.in_use("B")
    await assert_slots_free(adapters, capacity=1)
    assert engine.loaded == {"lg-free-0"}
    await adapters.aclose()


async def test_aclose_cancels_a_load_still_running() -> None:
    adapters, engine = make(capacity=1, load_s=30)
    waiting = asyncio.create_task(adapters.acquire("A"))
    await settle()
    await asyncio.wait_for(adapters.aclose(), 2)
    done, _ = await asyncio.wait({waiting}, timeout=1)
    assert waiting in done and waiting.cancelled()
    assert not adapters.in_use("A") and adapters.loaded == []
    assert engine.events == []


async def test_engine_going_away_mid_load_fails_every_waiter_and_frees_the_slot() -> None:
    adapters, engine = make(capacity=1, load_s=0.1, wait_s=0.2)
    waiters = [asyncio.create_task(adapters.acquire("A")) for _ in range(3)]
    await settle()
    engine.reachable = False  # while the engine loads
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, EngineUnavailableError) for r in results), results
    assert not adapters.busy() and adapters.loaded == [] and engine.events == []
    engine.reachable = True
    await assert_slots_free(adapters, capacity=1)
    await adapters.aclose()
