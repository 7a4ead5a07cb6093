"""The engine's own report of its load (vLLM's scheduler gauges), read from its /metrics into
loragate_engine_reported_requests: the part of the autoscalers' queue signal that waits inside
the engines rather than in the gateways."""

from __future__ import annotations

import pytest

from server.engines.base import EngineLoad
from server.engines.monitor import EngineMonitor
from server.engines.openai_http import parse_engine_load
from server.metrics import Metrics
from server.settings import EngineSettings, ModelSettings
from tests.engine_fake import MODEL, FakeEngine

# What vLLM 0.32's /metrics carries for these (abridged), one sample per served model.
VLLM_EXPOSITION = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="SmolLM2-135M-Instruct"} 3.0
vllm:num_requests_running{engine="0",model_name="other"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="SmolLM2-135M-Instruct"} 7.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 12.0
"""


def test_vllm_scheduler_gauges_are_summed_over_models() -> None:
    assert parse_engine_load(VLLM_EXPOSITION) == EngineLoad(running=4.0, waiting=7.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html>not metrics</html>",
        # Only one of the two: an engine that reports half its load reports none.
        "vllm:num_requests_running 2\n",
        "vllm:num_requests_running 2\nvllm:num_requests_waiting NaN\n",
        "vllm:num_requests_running -1\nvllm:num_requests_waiting 0\n",
        "vllm:num_requests_running{ 2\n",
    ],
)
def test_an_exposition_without_both_gauges_reports_nothing(text: str) -> None:
    assert parse_engine_load(text) is None


def reported(metrics: Metrics) -> dict[str, float]:
    return {
        sample.labels["state"]: sample.value
        for family in metrics.engine_reported.collect()
        for sample in family.samples
        if sample.labels["engine"] == "e1"
    }


def monitor_for(engine: FakeEngine) -> tuple[EngineMonitor, Metrics]:
    metrics = Metrics()
    settings = EngineSettings(health_interval_s=0.1, load_poll_s=1)
    model = ModelSettings(name=MODEL, max_model_len=2048)
    return EngineMonitor(engine, settings, model, metrics, name="e1"), metrics


async def test_a_ready_engines_report_is_exported_and_follows_it() -> None:
    engine = FakeEngine(reported_load=EngineLoad(running=2, waiting=5))
    monitor, metrics = monitor_for(engine)
    await monitor.read_load()
    assert reported(metrics) == {}  # not ready yet: nothing read
    assert await monitor.check_now()
    await monitor.read_load()
    assert reported(metrics) == {"running": 2, "waiting": 5}
    engine.reported_load = EngineLoad(running=0, waiting=1)
    await monitor.read_load()
    assert reported(metrics) == {"running": 0, "waiting": 1}


async def test_the_report_is_dropped_when_the_engine_is_seen_down_or_stops_reporting() -> None:
    engine = FakeEngine(reported_load=EngineLoad(running=2, waiting=5))
    monitor, metrics = monitor_for(engine)
    assert await monitor.check_now()
    await monitor.read_load()
    monitor.mark_unreachable()
    assert reported(metrics) == {}, "a dead engine's queue left for the autoscaler"

    assert await monitor.check_now()
    await monitor.read_load()
    assert reported(metrics) == {"running": 2, "waiting": 5}
    engine.reported_load = None  # its /metrics became unreadable
    await monitor.read_load()
    assert reported(metrics) == {}
