"""How the shipped engine HPA (`deploy/k8s/components/hpa/engine-hpa.yaml`) follows traffic, in a
discrete-event simulation in virtual time: no cluster, no sleep; hours of traffic take seconds.

Why a simulation: what the HPA's settings change (how long callers wait while engines start,
how many engines idle after a peak) shows only over traffic of minutes to hours, against pods
that take a minute or more to start.

- The HPA follows Kubernetes' autoscaling/v2 controller (pkg/controller/podautoscaler), read
  from the YAML: every `--sync-s` (the controller manager's 15 s), for each External
  AverageValue metric, `usageRatio = total / (target * statusReplicas)`; within the 10 %
  tolerance the proposal is `statusReplicas`, else `ceil(total / target)`; the largest proposal
  across metrics wins. Then `behavior`: the stabilization windows (the recommendation is held
  between the lowest recommendation of the scale-up window and the highest of the scale-down
  one), then the rate limits (each policy allows a change relative to the replicas at the start
  of its `periodSeconds`, from the scale events in it; `selectPolicy` Max takes the policy
  allowing the largest change, Min the smallest), clamped to min/max replicas.
- The metrics are the shipped ones: `loragate_engine_requests_waiting` (requests waiting in the
  gateway for an engine slot; the model's engines queue nothing of their own, the gateway's
  admission holds them back) and `loragate_engine_requests_running`, both summed. Prometheus
  scrapes every `--scrape-s`; the HPA reads the latest scrape at least `--metric-lag-s` old
  (adapter query, scrape duration): with the defaults it acts on what was true 14 s before.
- Pods: a new engine serves `--start-s` after the HPA asks for it (45 s; 180 s or more for a
  GPU host pulling weights). A scale-down removes a pod still starting first, else the newest
  ready one, which takes no new request and drains what it holds (its cost counts until then).
- Engines: at most `--max-running` requests at once (the gateway's admission, one gateway),
  each for a service time drawn from the output lengths of `bench_routing.py`, at the per-token
  time of a full batch of the capacity model (`server/engine_servers/capacity.py`): a request
  of 128 tokens runs 5.8 s, about 10 requests/s per engine. The gateway routes each request to
  the ready engine with the fewest running + queued; a request that finds its engine full waits
  there, first come first served (up to `--max-queued`, refused after `--queue-timeout-s`).
- Traffic: Poisson arrivals at a rate following a trace, as a fraction of `--peak-rps`: `step`
  (10 % for 10 min, 100 % for 20 min, 10 % for 40 min: time to scale back down), `diurnal` (a
  day's curve, 10 % at night to 100 % at noon, compressed into `--diurnal-h` hours, 2 by
  default: a ramp twelve times as steep as a real day's, so a harder test). Every setting sees
  the same requests (`--seed`).

Reported, per trace and setting: replica-minutes (cost: every pod that exists, starting or
draining too), mean and peak replicas, mean and peak requests queued in the gateway, the fraction
of requests that waited for an engine more than `--slo-s` (a refused request counts), p99 wait,
refused. The settings: the shipped targets, one tighter and one looser (`--tighter`,
`--looser`, as queue/running per engine), same behavior otherwise. The plot (`--out`): replicas
and queue over time per setting, with the engines the load needs at 100 % of their capacity.

    .venv/bin/python loadtests/bench_autoscaling.py                 # about 20 seconds
    .venv/bin/python loadtests/bench_autoscaling.py --start-s 180   # GPU hosts pulling weights
"""

from __future__ import annotations

import heapq
import math
import shlex
import sys
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
import yaml

from server.engine_servers.capacity import Capacity

ROOT = Path(__file__).resolve().parents[1]
ENGINE_HPA = ROOT / "deploy/k8s/components/hpa/engine-hpa.yaml"
QUEUE_METRIC = "loragate_engine_requests_waiting"
RUNNING_METRIC = "loragate_engine_requests_running"
# Prompt and output lengths, in tokens, and how often each comes: bench_routing.py's.
PROMPT_TOKENS = ((64, 0.3), (256, 0.3), (512, 0.25), (1024, 0.15))
OUTPUT_TOKENS = ((16, 0.15), (64, 0.3), (128, 0.3), (256, 0.2), (512, 0.05))
TRACES = ("step", "diurnal")


# --- the HPA ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingPolicy:
    type: str  # "Pods" or "Percent"
    value: int
    period_s: float


@dataclass(frozen=True)
class ScalingRules:
    stabilization_s: float
    policies: tuple[ScalingPolicy, ...]
    select: str = "Max"  # "Max", "Min" or "Disabled"


# Kubernetes' defaults for an absent `behavior` (HPAScalingRules' documentation).
DEFAULT_UP = ScalingRules(0, (ScalingPolicy("Percent", 100, 15), ScalingPolicy("Pods", 4, 15)))
DEFAULT_DOWN = ScalingRules(300, (ScalingPolicy("Percent", 100, 15),))


@dataclass(frozen=True)
class HpaSpec:
    min_replicas: int
    max_replicas: int
    targets: dict[str, float]  # External metric name -> AverageValue target
    scale_up: ScalingRules = DEFAULT_UP
    scale_down: ScalingRules = DEFAULT_DOWN
    tolerance: float = 0.1  # --horizontal-pod-autoscaler-tolerance
    sync_s: float = 15.0  # --horizontal-pod-autoscaler-sync-period


def _quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _rules(raw: dict[str, Any] | None, default: ScalingRules) -> ScalingRules:
    if raw is None:
        return default
    policies = tuple(
        ScalingPolicy(p["type"], int(p["value"]), float(p["periodSeconds"]))
        for p in raw.get("policies", [])
    )
    return ScalingRules(
        stabilization_s=float(raw.get("stabilizationWindowSeconds", default.stabilization_s)),
        policies=policies or default.policies,
        select=raw.get("selectPolicy", "Max"),
    )


def load_spec(path: Path = ENGINE_HPA) -> HpaSpec:
    """The HPA's spec, from its manifest (External AverageValue metrics only)."""
    spec = yaml.safe_load(path.read_text())["spec"]
    targets = {}
    for metric in spec["metrics"]:
        if metric["type"] != "External" or metric["external"]["target"]["type"] != "AverageValue":
            raise ValueError(f"only External AverageValue metrics are modelled: {metric}")
        external = metric["external"]
        targets[external["metric"]["name"]] = _quantity(external["target"]["averageValue"])
    behavior = spec.get("behavior", {})
    return HpaSpec(
        min_replicas=int(spec.get("minReplicas", 1)),
        max_replicas=int(spec["maxReplicas"]),
        targets=targets,
        scale_up=_rules(behavior.get("scaleUp"), DEFAULT_UP),
        scale_down=_rules(behavior.get("scaleDown"), DEFAULT_DOWN),
    )


def metric_replicas(total: float, target: float, status_replicas: int, tolerance: float) -> int:
    """GetExternalPerPodMetricReplicas: one AverageValue metric's proposal."""
    ratio = total / (target * status_replicas)
    if abs(1.0 - ratio) <= tolerance:
        return status_replicas
    return math.ceil(total / target)


class Hpa:
    """The controller's state for one HPA: past recommendations and scale events."""

    def __init__(self, spec: HpaSpec) -> None:
        self.spec = spec
        self.recommendations: list[tuple[float, int]] = []  # (time, unstabilized desired)
        self.up_events: list[tuple[float, int]] = []  # (time, replicas added)
        self.down_events: list[tuple[float, int]] = []  # (time, replicas removed)

    def reconcile(
        self, now: float, current: int, status_replicas: int, metrics: dict[str, float]
    ) -> int:
        """The replicas the HPA sets, from `current` (the scale's spec.replicas),
        `status_replicas` (its status: pods, ready or not) and the metrics' totals."""
        spec = self.spec
        if current == 0:
            return 0  # scaling disabled
        if current > spec.max_replicas:
            desired = spec.max_replicas
        elif current < spec.min_replicas:
            desired = spec.min_replicas
        else:
            proposal = max(
                metric_replicas(metrics[name], target, status_replicas, spec.tolerance)
                for name, target in spec.targets.items()
            )
            stabilized = self.stabilize(now, current, proposal)
            desired = self.limit_rate(now, current, stabilized)
        if desired > current:
            self.up_events.append((now, desired - current))
        elif desired < current:
            self.down_events.append((now, current - desired))
        self._forget(now)
        return desired

    def stabilize(self, now: float, current: int, desired: int) -> int:
        """stabilizeRecommendationWithBehaviors: records `desired`, returns it held between
        the scale-up window's lowest and the scale-down window's highest recommendation."""
        up_cutoff = now - self.spec.scale_up.stabilization_s
        down_cutoff = now - self.spec.scale_down.stabilization_s
        up, down = desired, desired
        for at, recommendation in self.recommendations:
            if at > up_cutoff:
                up = min(up, recommendation)
            if at > down_cutoff:
                down = max(down, recommendation)
        self.recommendations.append((now, desired))
        return min(max(current, up), down)

    def limit_rate(self, now: float, current: int, desired: int) -> int:
        """convertDesiredReplicasWithBehaviorRate, with min/max replicas."""
        spec = self.spec
        if desired > current:
            limit = max(self._up_limit(now, current), current)
            return min(desired, spec.max_replicas, limit)
        if desired < current:
            limit = min(self._down_limit(now, current), current)
            return max(desired, spec.min_replicas, limit)
        return desired

    def _changes(self, now: float, period_s: float) -> tuple[int, int]:
        cutoff = now - period_s
        added = sum(n for at, n in self.up_events if at > cutoff)
        removed = sum(n for at, n in self.down_events if at > cutoff)
        return added, removed

    def _up_limit(self, now: float, current: int) -> int:
        rules = self.spec.scale_up
        if rules.select == "Disabled":
            return current
        proposals = []
        for policy in rules.policies:
            added, removed = self._changes(now, policy.period_s)
            start = current - added + removed  # replicas at the start of the period
            if policy.type == "Pods":
                proposals.append(start + policy.value)
            else:
                proposals.append(math.ceil(start * (1 + policy.value / 100)))
        return min(proposals) if rules.select == "Min" else max(proposals)

    def _down_limit(self, now: float, current: int) -> int:
        rules = self.spec.scale_down
        if rules.select == "Disabled":
            return current
        proposals = []
        for policy in rules.policies:
            added, removed = self._changes(now, policy.period_s)
            start = current - added + removed
            if policy.type == "Pods":
                proposals.append(start - policy.value)
            else:
                proposals.append(int(start * (1 - policy.value / 100)))
        # Min: the smallest change, the highest count; Max: the largest change.
        return max(proposals) if rules.select == "Min" else min(proposals)

    def _forget(self, now: float) -> None:
        keep = max(self.spec.scale_up.stabilization_s, self.spec.scale_down.stabilization_s)
        self.recommendations = [r for r in self.recommendations if r[0] > now - keep]
        longest = max(
            (p.period_s for p in (*self.spec.scale_up.policies, *self.spec.scale_down.policies)),
            default=0.0,
        )
        self.up_events = [e for e in self.up_events if e[0] > now - longest]
        self.down_events = [e for e in self.down_events if e[0] > now - longest]


# --- the traffic --------------------------------------------------------------------------------


def trace_fraction(trace: str, t: np.ndarray, diurnal_s: float) -> np.ndarray:
    """The load at times `t`, as a fraction of the peak."""
    if trace == "step":
        return np.where((t >= 600) & (t < 1800), 1.0, 0.1)
    # A day from midnight: 10 % at night, 100 % at noon.
    return 0.1 + 0.9 * (1 - np.cos(2 * np.pi * t / diurnal_s)) / 2


def trace_duration(trace: str, diurnal_s: float) -> float:
    return 4200.0 if trace == "step" else diurnal_s


def draw(table: tuple[tuple[int, float], ...], rng: np.random.Generator, n: int) -> np.ndarray:
    values, weights = zip(*table, strict=True)
    return rng.choice(np.array(values), size=n, p=np.array(weights) / sum(weights))


@dataclass(frozen=True)
class Workload:
    arrivals: np.ndarray  # seconds, sorted
    service: np.ndarray  # seconds each request holds an engine slot


def workload(
    trace: str, peak_rps: float, duration_s: float, diurnal_s: float, capacity: Capacity, seed: int
) -> Workload:
    """Poisson arrivals at the trace's rate (thinning a process at the peak rate)."""
    rng = np.random.default_rng(seed)
    count = int(peak_rps * duration_s * 1.1) + 100
    times = np.cumsum(rng.exponential(1 / peak_rps, count))
    times = times[times < duration_s]
    keep = rng.random(len(times)) < trace_fraction(trace, times, diurnal_s)
    times = times[keep]
    per_token = capacity.step_s(capacity.max_batch)  # a full batch: one token per step each
    service = (
        draw(OUTPUT_TOKENS, rng, len(times)) * per_token
        + draw(PROMPT_TOKENS, rng, len(times)) * capacity.prefill_token_s
    )
    return Workload(times, service)


# --- the cluster --------------------------------------------------------------------------------


@dataclass(eq=False)
class Pod:
    created: float
    ready_at: float
    running: int = 0
    queue: deque[int] = field(default_factory=deque)  # request indices, first come first served
    ready: bool = False
    draining: bool = False
    gone: float | None = None


@dataclass(frozen=True)
class Cluster:
    start_s: float
    max_running: int
    max_queued: int
    queue_timeout_s: float
    scrape_s: float
    scrape_offset_s: float
    metric_lag_s: float
    sample_s: float = 5.0


@dataclass
class Run:
    name: str
    trace: str
    wait: np.ndarray  # per request: seconds until an engine slot; inf: refused
    samples: np.ndarray  # columns: time, spec replicas, ready replicas, queued, running
    pod_seconds: float
    duration_s: float


_READY, _DONE, _SCRAPE, _SYNC, _SAMPLE = range(5)


def simulate(name: str, trace: str, spec: HpaSpec, cluster: Cluster, load: Workload) -> Run:
    arrivals, service = load.arrivals, load.service
    n = len(arrivals)
    end = float(arrivals[-1]) if n else 0.0
    duration = max(end, 1.0)
    wait = np.full(n, np.nan)
    hpa = Hpa(spec)
    pods = [Pod(0.0, 0.0, ready=True) for _ in range(spec.min_replicas)]
    serving = list(pods)  # ready and not draining
    spec_replicas = spec.min_replicas
    scrapes: deque[tuple[float, float, float]] = deque()  # (time, queued, running)
    samples: list[tuple[float, int, int, int, int]] = []
    events: list[tuple[float, int, int, Any]] = []
    order = 0

    def at(time: float, kind: int, payload: Any = None) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (time, order, kind, payload))

    max_running, max_queued = cluster.max_running, cluster.max_queued
    timeout = cluster.queue_timeout_s

    def purge(pod: Pod, now: float) -> None:
        queue = pod.queue
        while queue and arrivals[queue[0]] < now - timeout:
            wait[queue.popleft()] = math.inf

    def start(pod: Pod, i: int, now: float) -> None:
        pod.running += 1
        wait[i] = now - arrivals[i]
        at(now + service[i], _DONE, pod)

    def finish_if_drained(pod: Pod, now: float) -> None:
        if pod.draining and pod.running == 0 and not pod.queue and pod.gone is None:
            pod.gone = now

    def scale(now: float, desired: int) -> None:
        nonlocal spec_replicas
        live = [p for p in pods if not p.draining and p.gone is None]
        if desired > len(live):
            for _ in range(desired - len(live)):
                pod = Pod(now, now + cluster.start_s)
                pods.append(pod)
                at(pod.ready_at, _READY, pod)
        else:
            # The ReplicaSet deletes pods not ready first, then the most recently ready.
            victims = sorted(live, key=lambda p: (p.ready, -p.ready_at))[: len(live) - desired]
            for pod in victims:
                pod.draining = True
                if pod in serving:
                    serving.remove(pod)
                if not pod.ready:
                    pod.gone = now
                finish_if_drained(pod, now)
        spec_replicas = desired

    t = 0.0
    while t <= duration:
        at(t + cluster.scrape_offset_s, _SCRAPE)
        at(t + spec.sync_s, _SYNC)
        t += spec.sync_s
    t = 0.0
    while t <= duration:
        at(t, _SAMPLE)
        t += cluster.sample_s

    index = 0
    while index < n or events:
        if index < n and (not events or arrivals[index] < events[0][0]):
            now = float(arrivals[index])
            i, index = index, index + 1
            if not serving:
                wait[i] = math.inf
                continue
            pod = min(serving, key=lambda p: p.running + len(p.queue))
            if pod.running < max_running and not pod.queue:
                start(pod, i, now)
            elif len(pod.queue) >= max_queued:
                wait[i] = math.inf
            else:
                pod.queue.append(i)
            continue
        now, _, kind, payload = heapq.heappop(events)
        if kind == _DONE:
            pod = payload
            pod.running -= 1
            purge(pod, now)
            if pod.queue:
                start(pod, pod.queue.popleft(), now)
            finish_if_drained(pod, now)
        elif kind == _READY:
            pod = payload
            if pod.gone is None and not pod.draining:
                pod.ready = True
                serving.append(pod)
        elif kind == _SCRAPE:
            for pod in serving:
                purge(pod, now)
            live = [p for p in pods if p.gone is None]
            queued = sum(len(p.queue) for p in live)
            running = sum(p.running for p in live)
            scrapes.append((now, queued, running))
        elif kind == _SYNC:
            while len(scrapes) > 1 and scrapes[1][0] <= now - cluster.metric_lag_s:
                scrapes.popleft()
            if not scrapes or scrapes[0][0] > now - cluster.metric_lag_s:
                continue  # nothing scraped yet: the metric is unavailable
            _, queued, running = scrapes[0]
            status = sum(1 for p in pods if not p.draining and p.gone is None)
            totals = {QUEUE_METRIC: queued, RUNNING_METRIC: running}
            desired = hpa.reconcile(now, spec_replicas, status, totals)
            if desired != spec_replicas:
                scale(now, desired)
        elif kind == _SAMPLE:
            for pod in serving:
                purge(pod, now)
            live = [p for p in pods if p.gone is None]
            samples.append(
                (
                    now,
                    spec_replicas,
                    len(serving),
                    sum(len(p.queue) for p in live),
                    sum(p.running for p in live),
                )
            )
    pod_seconds = sum(
        min(p.gone if p.gone is not None else duration, duration) - p.created for p in pods
    )
    return Run(name, trace, wait, np.array(samples, dtype=float), pod_seconds, duration)


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    trace: str
    setting: str
    replica_minutes: float
    mean_replicas: float
    peak_replicas: int
    mean_queued: float
    peak_queued: int
    slo_miss: float
    p99_wait_s: float
    refused: float


def summarize(run: Run, slo_s: float) -> Row:
    wait = run.wait
    samples = run.samples
    in_window = samples[:, 0] <= run.duration_s
    return Row(
        trace=run.trace,
        setting=run.name,
        replica_minutes=run.pod_seconds / 60,
        mean_replicas=run.pod_seconds / run.duration_s,
        peak_replicas=int(samples[in_window, 1].max()),
        mean_queued=float(samples[in_window, 3].mean()),
        peak_queued=int(samples[in_window, 3].max()),
        slo_miss=float(np.mean(wait > slo_s)),
        p99_wait_s=float(np.percentile(wait, 99, method="inverted_cdf")),
        refused=float(np.mean(np.isinf(wait))),
    )


def seconds(value: float) -> str:
    return "refused" if math.isinf(value) else f"{value:.1f}"


def markdown(rows: list[Row], slo_s: float) -> str:
    headers = [
        "trace", "setting (queue / running per engine)", "replica-min", "mean replicas",
        "peak replicas", "mean queued", "peak queued", f"wait > {slo_s:g} s", "p99 wait s",
        "refused",
    ]  # fmt: skip
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [
            r.trace, r.setting, f"{r.replica_minutes:,.0f}", f"{r.mean_replicas:.1f}",
            str(r.peak_replicas), f"{r.mean_queued:.1f}", str(r.peak_queued),
            f"{r.slo_miss:.3%}", seconds(r.p99_wait_s), f"{r.refused:.3%}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    runs: list[Run], needed: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r.trace for r in runs))
    fig, axes = plt.subplots(2, len(traces), figsize=(7 * len(traces), 7.5), squeeze=False)
    colors = dict(
        zip(dict.fromkeys(r.name for r in runs), plt.get_cmap("tab10").colors, strict=False)
    )
    for column, trace in enumerate(traces):
        top, bottom = axes[0][column], axes[1][column]
        t, engines = needed[trace]
        top.plot(t / 60, engines, color="0.6", ls="--", lw=1, label="needed at 100 % busy")
        for run in (r for r in runs if r.trace == trace):
            minutes = run.samples[:, 0] / 60
            top.step(minutes, run.samples[:, 1], where="post", color=colors[run.name],
                     label=run.name)  # fmt: skip
            top.step(minutes, run.samples[:, 2], where="post", color=colors[run.name], lw=0.8,
                     ls=":")  # fmt: skip
            bottom.plot(minutes, run.samples[:, 3], color=colors[run.name], lw=1, label=run.name)
        top.set_title(f"{trace}: engine replicas (HPA spec; dotted: ready)")
        top.set_ylabel("replicas")
        bottom.set_title(f"{trace}: requests queued in the gateway")
        bottom.set_ylabel("queued")
        bottom.set_xlabel("virtual minutes")
        top.legend(fontsize=8, loc="upper right")
        bottom.legend(fontsize=8, loc="upper right")
        for axis in (top, bottom):
            axis.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _targets(text: str) -> tuple[float, float]:
    queue, running = text.split("/")
    return float(queue), float(running)


def with_targets(spec: HpaSpec, queue: float, running: float) -> HpaSpec:
    return replace(spec, targets={QUEUE_METRIC: queue, RUNNING_METRIC: running})


def main(
    traces: Annotated[str, typer.Option(help="Traces, comma-separated.")] = ",".join(TRACES),
    tighter: Annotated[str, typer.Option(help="Tighter targets, queue/running.")] = "2/40",
    looser: Annotated[str, typer.Option(help="Looser targets, queue/running.")] = "8/56",
    peak_rps: Annotated[float, typer.Option(min=0.1, help="Arrivals/s at 100 % load.")] = 100,
    diurnal_h: Annotated[float, typer.Option(min=0.1, help="The day, compressed.")] = 2,
    start_s: Annotated[float, typer.Option(min=0, help="A new engine's start.")] = 45,
    scrape_s: Annotated[float, typer.Option(min=1, help="Prometheus' scrape.")] = 15,
    metric_lag_s: Annotated[
        float, typer.Option(min=0, help="The newest scrape the HPA gets is this old.")
    ] = 5,
    sync_s: Annotated[float, typer.Option(min=1, help="The HPA controller's period.")] = 15,
    slo_s: Annotated[float, typer.Option(min=0, help="Queueing delay objective.")] = 2,
    max_running: Annotated[int, typer.Option(min=1, help="Requests per engine.")] = 64,
    max_queued: Annotated[int, typer.Option(min=0, help="Gateway queue per engine.")] = 256,
    queue_timeout_s: Annotated[float, typer.Option(min=0.1)] = 30,
    token_ms: Annotated[float, typer.Option(help="Decode step, one sequence.")] = 20,
    batch_growth: Annotated[float, typer.Option(help="Step growth per more running.")] = 0.02,
    prefill_us: Annotated[float, typer.Option(help="Prefill, µs per prompt token.")] = 50,
    hpa: Annotated[Path, typer.Option(help="The HPA manifest.")] = ENGINE_HPA,
    out: Annotated[Path, typer.Option(help="The plot.")] = ROOT / "docs/images/autoscaling.png",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Replay traces against the engine HPA's model, shipped and two other targets."""
    chosen = [t.strip() for t in traces.split(",")]
    for trace in chosen:
        if trace not in TRACES:
            raise typer.BadParameter(f"unknown trace {trace!r}: one of {', '.join(TRACES)}")
    shipped = replace(load_spec(hpa), sync_s=sync_s)
    if set(shipped.targets) != {QUEUE_METRIC, RUNNING_METRIC}:
        raise typer.BadParameter(f"expected {QUEUE_METRIC} and {RUNNING_METRIC} in {hpa}")
    capacity = Capacity(
        token_s=token_ms / 1000,
        batch_growth=batch_growth,
        prefill_token_s=prefill_us / 1e6,
        max_batch=max_running,
    )
    cluster = Cluster(
        start_s=start_s,
        max_running=max_running,
        max_queued=max_queued,
        queue_timeout_s=queue_timeout_s,
        scrape_s=scrape_s,
        scrape_offset_s=1.0,
        metric_lag_s=metric_lag_s,
    )
    q0, r0 = shipped.targets[QUEUE_METRIC], shipped.targets[RUNNING_METRIC]
    settings = {}
    for label, (queue, running) in (
        ("tighter", _targets(tighter)),
        ("shipped", (q0, r0)),
        ("looser", _targets(looser)),
    ):
        settings[f"{label} {queue:g} / {running:g}"] = with_targets(shipped, queue, running)
    diurnal_s = diurnal_h * 3600
    runs, rows, needed = [], [], {}
    per_token = capacity.step_s(capacity.max_batch)
    mean_service = (
        sum(t * w for t, w in OUTPUT_TOKENS) * per_token
        + sum(t * w for t, w in PROMPT_TOKENS) * capacity.prefill_token_s
    )
    engine_rps = max_running / mean_service
    for k, trace in enumerate(chosen):
        duration = trace_duration(trace, diurnal_s)
        load = workload(trace, peak_rps, duration, diurnal_s, capacity, seed + k)
        grid = np.arange(0, duration, 5.0)
        needed[trace] = (grid, trace_fraction(trace, grid, diurnal_s) * peak_rps / engine_rps)
        for name, spec in settings.items():
            run = simulate(name, trace, spec, cluster, load)
            runs.append(run)
            rows.append(summarize(run, slo_s))

    print(f"command: {shlex.join(['python', *sys.argv])}\n")
    up = ", ".join(f"{p.type} {p.value}/{p.period_s:g}s" for p in shipped.scale_up.policies)
    down = ", ".join(f"{p.type} {p.value}/{p.period_s:g}s" for p in shipped.scale_down.policies)
    print(
        f"HPA from {hpa.relative_to(ROOT) if hpa.is_relative_to(ROOT) else hpa}: "
        f"{shipped.min_replicas}-{shipped.max_replicas} replicas, tolerance "
        f"{shipped.tolerance:.0%}, sync {sync_s:g} s; scale-up window "
        f"{shipped.scale_up.stabilization_s:g} s, {up} (select {shipped.scale_up.select}); "
        f"scale-down window {shipped.scale_down.stabilization_s:g} s, {down} (select "
        f"{shipped.scale_down.select}). Metrics scraped every {scrape_s:g} s, read "
        f"{metric_lag_s:g} s late at the earliest; engines start in {start_s:g} s.\n"
    )
    print(
        f"Engines: {max_running} requests at once, {mean_service:.1f} s each on average: "
        f"{engine_rps:.1f} requests/s at 100 % busy. Peak {peak_rps:g} requests/s "
        f"({peak_rps / engine_rps:.1f} engines at 100 % busy). Traces: step (10 % -> 100 % "
        f"-> 10 %, 70 min), diurnal (a day in {diurnal_h:g} h). Wait: arrival to an engine "
        f"slot; refused after {queue_timeout_s:g} s or with {max_queued} queued.\n"
    )
    print(markdown(rows, slo_s))
    title = (
        f"Engine HPA model: {peak_rps:g} req/s peak, engines start in {start_s:g} s, "
        f"metric {scrape_s:g} s scrape + {metric_lag_s:g} s lag (seed {seed})"
    )
    plot(runs, needed, title, out)
    print(f"\nplot: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    typer.run(main)
