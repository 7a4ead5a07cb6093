"""The HPA model of `loadtests/bench_autoscaling.py` against Kubernetes' documented algorithm
(autoscaling/v2, "Horizontal Pod Autoscaling" and pkg/controller/podautoscaler): the desired
replicas of an External AverageValue metric, the tolerance, stabilization windows, the scaling
policies, min/max replicas; and the shipped manifest read as it is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_autoscaling", ROOT / "loadtests/bench_autoscaling.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load()
Q, R = bench.QUEUE_METRIC, bench.RUNNING_METRIC
SHIPPED = bench.load_spec()


def spec(**changes: object) -> object:
    from dataclasses import replace

    return replace(SHIPPED, **changes)


# A slower scale-up than the shipped one (+100 % or +2 pods per 30 s): the algorithm tests below
# use it, so they hold whatever the manifest says.
SLOW_UP = bench.ScalingRules(
    0, (bench.ScalingPolicy("Percent", 100, 30), bench.ScalingPolicy("Pods", 2, 30))
)
SLOW = spec(scale_up=SLOW_UP)


def test_shipped_manifest_is_read_as_written() -> None:
    assert SHIPPED.min_replicas == 2 and SHIPPED.max_replicas == 16
    assert SHIPPED.targets == {Q: 4.0, R: 48.0}
    assert SHIPPED.scale_up.stabilization_s == 0 and SHIPPED.scale_up.select == "Max"
    assert {(p.type, p.value, p.period_s) for p in SHIPPED.scale_up.policies} == {
        ("Percent", 100, 15),
        ("Pods", 4, 15),
    }
    assert SHIPPED.scale_down.stabilization_s == 300
    assert [(p.type, p.value, p.period_s) for p in SHIPPED.scale_down.policies] == [
        ("Pods", 1, 120)
    ]


def test_desired_replicas_is_ceil_of_current_times_ratio() -> None:
    # 3 pods, 30 queued in all (10 per pod) for a target of 4 per pod: ceil(3 * 10 / 4) = 8.
    assert bench.metric_replicas(30, 4, 3, 0.1) == 8
    # Below target: 3 pods running 60 (20 each) for 48 each: ceil(3 * 20 / 48) = 2.
    assert bench.metric_replicas(60, 48, 3, 0.1) == 2
    assert bench.metric_replicas(0, 4, 5, 0.1) == 0  # min replicas applies later


def test_within_tolerance_keeps_the_current_replicas() -> None:
    # 4 pods for 48 each (192): ratios 1.099 and 0.901 are within 10 %, 1.125 is not.
    assert bench.metric_replicas(211, 48, 4, 0.1) == 4
    assert bench.metric_replicas(173, 48, 4, 0.1) == 4
    assert bench.metric_replicas(216, 48, 4, 0.1) == 5
    assert bench.metric_replicas(168, 48, 4, 0.1) == 4  # 0.875: ceil(3.5)
    assert bench.metric_replicas(140, 48, 4, 0.1) == 3


def test_the_largest_metric_proposal_wins() -> None:
    hpa = bench.Hpa(spec(scale_up=bench.ScalingRules(0, (bench.ScalingPolicy("Pods", 10, 60),))))
    # Running asks for ceil(100 / 48) = 3, the queue for ceil(24 / 4) = 6.
    assert hpa.reconcile(0, 2, 2, {Q: 24, R: 100}) == 6


def test_scale_up_rate_selects_the_policy_allowing_the_most() -> None:
    hpa = bench.Hpa(SLOW)
    # From 2: Percent 100 -> 4, Pods 2 -> 4. From 6: Percent 100 -> 12 beats Pods 2 -> 8.
    assert hpa.reconcile(0, 2, 2, {Q: 400, R: 128}) == 4
    hpa = bench.Hpa(SLOW)
    assert hpa.reconcile(0, 6, 6, {Q: 400, R: 384}) == 12
    # The documented default (Percent 100 and Pods 4 per 15 s, Max): from 2 to 6.
    default = bench.Hpa(spec(scale_up=bench.DEFAULT_UP))
    assert default.reconcile(0, 2, 2, {Q: 400, R: 128}) == 6
    # selectPolicy Min: the smaller change.
    least = bench.ScalingRules(0, SLOW_UP.policies, select="Min")
    assert bench.Hpa(spec(scale_up=least)).reconcile(0, 6, 6, {Q: 400, R: 384}) == 8


def test_scale_up_counts_the_changes_within_the_period() -> None:
    hpa = bench.Hpa(SLOW)
    busy = {Q: 400, R: 0}
    assert hpa.reconcile(0, 2, 2, busy) == 4
    # 15 s later the period (30 s) still starts at 2 replicas: 4 is as far as it goes.
    assert hpa.reconcile(15, 4, 4, busy) == 4
    # At 30 s the event at 0 s has left it (strictly after now - period counts).
    assert hpa.reconcile(30, 4, 4, busy) == 8
    assert hpa.reconcile(60, 8, 8, busy) == 16  # max replicas
    assert hpa.reconcile(90, 16, 16, busy) == 16


def test_scale_down_takes_the_highest_recommendation_of_the_window() -> None:
    hpa = bench.Hpa(SHIPPED)
    steady = {Q: 0, R: 10 * 48}  # exactly on target: 10
    idle = {Q: 0, R: 0}  # asks for 0, min replicas 2
    assert hpa.reconcile(0, 10, 10, steady) == 10
    for now in range(15, 300, 15):
        assert hpa.reconcile(now, 10, 10, idle) == 10, now
    # At 300 s the recommendation of 0 s is out of the window; Pods 1 per 120 s: 9.
    assert hpa.reconcile(300, 10, 10, idle) == 9
    assert hpa.reconcile(315, 9, 9, idle) == 9
    assert hpa.reconcile(405, 9, 9, idle) == 9  # the event at 300 s is still in the period
    assert hpa.reconcile(420, 9, 9, idle) == 8  # now it is not: after 420 - 120 only


def test_a_spike_within_the_window_holds_the_replicas() -> None:
    hpa = bench.Hpa(
        spec(scale_down=bench.ScalingRules(60, (bench.ScalingPolicy("Percent", 100, 15),)))
    )
    assert hpa.reconcile(0, 6, 6, {Q: 0, R: 6 * 48}) == 6
    assert hpa.reconcile(15, 6, 6, {Q: 0, R: 3 * 48}) == 6  # 6 was recommended 15 s ago
    assert hpa.reconcile(60, 6, 6, {Q: 0, R: 3 * 48}) == 3  # it left the 60 s window


def test_scale_up_window_takes_the_lowest_recommendation() -> None:
    up = bench.ScalingRules(60, (bench.ScalingPolicy("Percent", 900, 15),))
    hpa = bench.Hpa(spec(scale_up=up))
    assert hpa.reconcile(0, 2, 2, {Q: 0, R: 96}) == 2
    assert hpa.reconcile(15, 2, 2, {Q: 0, R: 480}) == 2  # the window's lowest is 2
    assert hpa.reconcile(75, 2, 2, {Q: 0, R: 480}) == 10  # every recommendation since: 10


def test_min_and_max_replicas() -> None:
    hpa = bench.Hpa(
        spec(scale_down=bench.ScalingRules(0, (bench.ScalingPolicy("Percent", 100, 15),)))
    )
    assert hpa.reconcile(0, 5, 5, {Q: 0, R: 0}) == 2
    assert bench.Hpa(SHIPPED).reconcile(0, 20, 20, {Q: 0, R: 0}) == 16  # above max: max
    assert bench.Hpa(SHIPPED).reconcile(0, 1, 1, {Q: 0, R: 0}) == 2  # below min: min


def test_simulation_is_deterministic_and_idle_at_low_load() -> None:
    capacity = bench.Capacity(prefill_token_s=50e-6)
    cluster = bench.Cluster(45, 64, 256, 30, 15, 1, 5)
    load = bench.workload("step", 5, 900, 7200, capacity, seed=1)
    first = bench.simulate("shipped", "step", SHIPPED, cluster, load)
    again = bench.simulate("shipped", "step", SHIPPED, cluster, load)
    np.testing.assert_array_equal(first.wait, again.wait)
    row = bench.summarize(first, 2.0)
    assert row.peak_replicas == 2 and row.slo_miss == 0 and row.peak_queued == 0
    assert row.replica_minutes == pytest.approx(2 * first.duration_s / 60)
