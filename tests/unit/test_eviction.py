"""The eviction choice: the idle adapter asked for least lately, not merely least recently."""

from __future__ import annotations

from server.engines.eviction import DemandTracker


def test_a_popular_adapter_outlives_a_run_of_rare_ones() -> None:
    demand = DemandTracker(half_life_s=60)
    for t in range(10):
        demand.touch("popular", float(t))
    demand.touch("rare-1", 10.0)
    demand.touch("rare-2", 11.0)
    # Least recently used order (oldest first) would name `popular`.
    assert demand.victim(["popular", "rare-1", "rare-2"], 12.0) == "rare-1"


def test_demand_halves_every_half_life_and_ties_go_to_the_first_listed() -> None:
    demand = DemandTracker(half_life_s=60)
    demand.touch("a", 0.0)
    assert abs(demand.demand("a", 60.0) - 0.5) < 1e-9
    demand.touch("b", 0.0)
    assert demand.victim(["b", "a"], 1.0) == "b"  # equal demand: least recently used first
    assert demand.victim([], 1.0) is None


def test_forgotten_adapters_start_again_from_nothing() -> None:
    demand = DemandTracker()
    demand.touch("a", 0.0)
    demand.forget("a")
    assert demand.demand("a", 0.0) == 0.0
