"""The engine's adapter slots: single-flight loads, LRU eviction of idle adapters only, waiting
(bounded) for a slot when every loaded adapter is busy; and the engine's adapters forgotten when
it goes down (`forget_all`), then adopted again from its model list (`reconcile`)."""

from __future__ import annotations

import asyncio

import pytest

from server.engines.adapter_slots import AdapterLease, AdapterSlots, engine_name
from server.errors import EngineError, EngineUnavailableError, ServerOverloadedError
from server.metrics import Metrics
from tests.engine_fake import FakeEngine


def make(
    capacity: int, load_s: float = 0.0, wait_s: float = 5.0, metrics: Metrics | None = None
) -> tuple[AdapterSlots, FakeEngine]:
    engine = FakeEngine(load_s=load_s)
    adapters = AdapterSlots(engine, lambda d: f"/store/{d}", capacity, metrics or Metrics(), wait_s)
    return adapters, engine


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


def loaded_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("loragate_adapters_loaded", {"engine": "local"})


async def test_many_acquires_at_once_load_once() -> None:
    adapters, engine = make(capacity=2, load_s=0.05)
    leases = await asyncio.gather(*(adapters.acquire("A") for _ in range(10)))
    assert engine.events == ["load lg-A"]
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
    assert engine.events == ["load lg-A", "unload lg-A", "load lg-B"]
    lease_b.release()


async def test_waiting_for_a_slot_is_bounded() -> None:
    adapters, _ = make(capacity=1, wait_s=0.05)
    lease = await adapters.acquire("A")
    with pytest.raises(ServerOverloadedError) as caught:
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
    engine.adapters.clear()  # the engine restarted
    await adapters.reload("A")
    assert engine.loaded == {engine_name("A")}
    waiting_b = asyncio.create_task(adapters.acquire("B"))
    await settle()
    assert not waiting_b.done()  # A is still pinned by the lease
    lease.release()
    (await asyncio.wait_for(waiting_b, 2)).release()


@pytest.mark.parametrize(
    ("knob", "error"), [("fail_loads", EngineError), ("reachable", EngineUnavailableError)]
)
async def test_failed_load_reaches_every_waiter_and_frees_the_slot(
    knob: str, error: type[Exception]
) -> None:
    metrics = Metrics()
    adapters, engine = make(capacity=1, load_s=0.02, metrics=metrics)
    if knob == "fail_loads":
        engine.fail_loads = True
    else:
        engine.reachable = False
    results = await asyncio.gather(
        *(adapters.acquire("A") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, error) for r in results), results
    errors = {"engine": "local", "result": "error"}
    assert metrics.registry.get_sample_value("loragate_adapter_loads_total", errors) == 1
    assert not adapters.busy() and not adapters.in_use("A") and adapters.can_load()
    engine.fail_loads, engine.reachable = False, True
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


async def test_forget_all_empties_the_slots_but_keeps_the_pins() -> None:
    metrics = Metrics()
    adapters, engine = make(capacity=2, metrics=metrics)
    lease_a = await adapters.acquire("A")
    (await adapters.acquire("B")).release()
    assert loaded_gauge(metrics) == 2
    adapters.forget_all()  # the engine went down
    assert adapters.loaded == [] and adapters.held_or_loading() == frozenset()
    assert loaded_gauge(metrics) == 0
    assert engine.events == ["load lg-A", "load lg-B"]  # nothing sent to a dead engine
    assert adapters.in_use("A") and adapters.busy()  # A's request still runs
    lease_a.release()
    assert not adapters.in_use("A") and not adapters.busy()
    (await adapters.acquire("A")).release()  # assumed lost: loaded again
    assert engine.events[-1] == "load lg-A"
    assert adapters.loaded == ["A"] and loaded_gauge(metrics) == 1


async def test_reconcile_adopts_the_listed_up_to_capacity_and_forgets_the_rest() -> None:
    metrics = Metrics()
    adapters, engine = make(capacity=2, metrics=metrics)
    (await adapters.acquire("A")).release()
    adapters.reconcile(["B", "C", "D"])  # the engine no longer holds A
    assert adapters.loaded == ["B", "C"]  # D would be over capacity
    assert loaded_gauge(metrics) == 2
    lease = await adapters.acquire("B")
    assert engine.events == ["load lg-A"]  # B adopted: not loaded again
    lease.release()
    adapters.reconcile([])
    assert adapters.loaded == [] and loaded_gauge(metrics) == 0


async def test_reconcile_adopting_what_it_holds_already_changes_nothing() -> None:
    adapters, _ = make(capacity=2)
    for digest in ("A", "B"):
        (await adapters.acquire(digest)).release()
    adapters.reconcile(["B", "A"])
    assert sorted(adapters.loaded) == ["A", "B"]


async def test_reconcile_never_touches_a_load_under_way() -> None:
    adapters, engine = make(capacity=2, load_s=0.1)
    loading = asyncio.create_task(adapters.acquire("X"))
    await settle()
    assert adapters.held_or_loading() == {"X"} and adapters.loaded == []
    # X's load holds a slot: only one listed adapter fits, and X is not adopted early, whether
    # the list names it or not.
    adapters.reconcile(["X", "A", "B"])
    assert adapters.loaded == ["A"]
    adapters.reconcile(["A"])
    assert adapters.held_or_loading() == {"X", "A"}
    lease = await asyncio.wait_for(loading, 2)
    assert sorted(adapters.loaded) == ["A", "X"]
    assert engine.events == ["load lg-X"]
    lease.release()


async def test_can_load_needs_a_free_slot_or_an_idle_adapter() -> None:
    adapters, _ = make(capacity=1, load_s=0.05)
    assert adapters.can_load()
    loading = asyncio.create_task(adapters.acquire("A"))
    await asyncio.sleep(0.01)
    assert not adapters.can_load()  # the one slot is reserved by A's load
    lease = await asyncio.wait_for(loading, 2)
    assert not adapters.can_load()  # A is pinned: it cannot be evicted
    lease.release()
    assert adapters.can_load()  # A is idle: it can be evicted


async def test_held_or_loading_is_what_a_request_would_find() -> None:
    adapters, _ = make(capacity=1, load_s=0.05)
    assert adapters.held_or_loading() == frozenset()
    loading = asyncio.create_task(adapters.acquire("A"))
    await asyncio.sleep(0.01)
    assert adapters.held_or_loading() == {"A"}
    lease: AdapterLease = await asyncio.wait_for(loading, 2)
    assert adapters.held_or_loading() == {"A"}
    lease.release()
    assert adapters.held_or_loading() == {"A"}  # idle, still loaded
    (await adapters.acquire("B")).release()  # A evicted for B
    assert adapters.held_or_loading() == {"B"}
