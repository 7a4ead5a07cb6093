"""How the router (`server/engines/routing.py`) does against simpler policies, in a discrete-event
simulation: no process, no sleep, virtual time; a run of minutes of traffic takes seconds.

Why a simulation: what routing changes (adapter loads, queueing, batches made of fewer
adapters) only shows with many engines that saturate, more than a test machine holds.

- Engines follow the capacity model the fake engine runs (`server/engine_servers/capacity.py`):
  a decode step that slows as the batch grows, at most `--max-batch` sequences and
  `--lora-slots` distinct adapters running at once (vLLM's --max-loras; the others wait inside
  the engine), and adapter loads that stall the whole engine for `--load-ms`.
- In front of them, a gateway that keeps per engine what the real one does, and no more:
  admission (`server/engines/admission.py`: `--max-running` sent to the engine at once, then up
  to `--max-queued` waiting in the gateway, first come first served, refused after
  `--queue-timeout-s`), and the adapters it loaded there (`server/engines/adapter_slots.py`:
  `--max-loaded` of them, vLLM's --max-cpu-loras; a request pins its adapter until it ends; the
  least recently used idle one is unloaded to make room; with every one pinned, a load waits for
  one to go idle, refused after 30 s). A request takes its turn first, then pins its adapter.
- The gateway routes each request by one of: `affinity` (`server.engines.routing.choose`, the
  router itself), `round-robin`, `least-load` (fewest running + queued in the gateway).
- The workload: `--adapters` adapters with Zipf popularity (`--zipf`), a `--base-fraction`
  for the base model, Poisson arrivals (or `--arrivals gamma --cv 2`: bursts), prompt and
  output lengths from a small fixed distribution; every policy sees the same requests
  (`--seed`). The arrival rate is `--load` of what the cluster sustains without affinity:
  least-load's throughput when offered the engines' nominal capacity (full batches, no load,
  no adapter waiting), measured first. Nominal capacity itself is far out of reach: with
  hundreds of adapters, the adapters that may run at once bound an engine long before its
  batch does (the table's header says by how much).

Per engine count and policy: requests finished per second of virtual time (the first
`--warmup-s` left out, when every adapter is cold), the fraction of requests with their first
token within `--slo-ms` (a refused request misses it), p50 / p95 time to first token (a refused
request counts as infinitely late), refused requests, adapter loads per 1,000 requests. Under
the table: the fewest loads any router could do. Requests are independent draws, so the best a
cluster holding `engines * max_loaded` adapters can do is to hold the most popular ones: every
request for another is a load.

    .venv/bin/python loadtests/bench_routing.py              # about ten seconds
    .venv/bin/python loadtests/bench_routing.py --arrivals gamma --cv 2
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import itertools
import math
import shlex
import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import typer

from server.engine_servers.capacity import Capacity, Done, EngineModel
from server.engines.eviction import DemandTracker
from server.engines.routing import EngineView, choose

# Prompt and output lengths, in tokens, and how often each comes.
PROMPT_TOKENS = ((64, 0.3), (256, 0.3), (512, 0.25), (1024, 0.15))
OUTPUT_TOKENS = ((16, 0.15), (64, 0.3), (128, 0.3), (256, 0.2), (512, 0.05))
WAIT_FOR_SLOT_S = 30.0  # AdapterSlots' default


class Policy(enum.StrEnum):
    affinity = "affinity"
    round_robin = "round-robin"
    least_load = "least-load"


class Arrivals(enum.StrEnum):
    poisson = "poisson"
    gamma = "gamma"


@dataclass(frozen=True)
class Gateway:
    max_running: int
    max_queued: int
    queue_timeout_s: float
    max_loaded: int


@dataclass(frozen=True)
class Setup:
    capacity: Capacity
    gateway: Gateway
    digests: list[str]
    zipf: float
    base_fraction: float
    arrivals: Arrivals
    cv: float
    duration_s: float
    warmup_s: float
    slo_s: float
    seed: int


@dataclass(eq=False)
class Request:
    id: int
    arrival: float
    digest: str | None  # None: the base model
    prompt_tokens: int
    output_tokens: int
    queued: bool = False
    first_token: float | None = None
    finished: float | None = None
    refused: bool = False


# --- the workload -------------------------------------------------------------------------------


def popularity(adapters: int, zipf: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, adapters + 1) ** zipf
    return np.asarray(weights / weights.sum())


def mean_tokens(table: tuple[tuple[int, float], ...]) -> float:
    return sum(tokens * weight for tokens, weight in table)


def nominal_rate(capacity: Capacity) -> float:
    """Requests per second one engine serves with a full batch, no load, no adapter waiting."""
    per_token = capacity.step_s(capacity.max_batch) / capacity.max_batch
    return 1 / (
        mean_tokens(OUTPUT_TOKENS) * per_token
        + mean_tokens(PROMPT_TOKENS) * capacity.prefill_token_s
    )


def workload(setup: Setup, rate: float, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    count = int(rate * setup.duration_s * 1.5) + 100  # more gaps than needed; cut at the end
    if setup.arrivals is Arrivals.poisson:
        gaps = rng.exponential(1 / rate, count)
    else:  # mean 1 / rate, coefficient of variation cv
        shape = 1 / setup.cv**2
        gaps = rng.gamma(shape, 1 / (rate * shape), count)
    times = np.cumsum(gaps)
    times = times[times < setup.duration_s]
    n = len(times)
    digests = setup.digests
    ranks = rng.choice(len(digests), n, p=popularity(len(digests), setup.zipf))
    base = rng.random(n) < setup.base_fraction
    prompts = rng.choice([t for t, _ in PROMPT_TOKENS], n, p=[w for _, w in PROMPT_TOKENS])
    outputs = rng.choice([t for t, _ in OUTPUT_TOKENS], n, p=[w for _, w in OUTPUT_TOKENS])
    return [
        Request(
            i,
            float(times[i]),
            None if base[i] else digests[ranks[i]],
            int(prompts[i]),
            int(outputs[i]),
        )
        for i in range(n)
    ]


# --- one engine, and what the gateway keeps about it --------------------------------------------


@dataclass(eq=False)
class PendingLoad:
    """A load waiting for a slot (behind AdapterSlots' lock); refused if still so at `deadline`."""

    digest: str
    deadline: float


@dataclass(eq=False)
class SimEngine:
    name: str
    model: EngineModel
    gateway: Gateway
    # Admission (EngineAdmission): requests with a turn, and those waiting for one, in order.
    running: int = 0
    queue: deque[Request] = field(default_factory=deque)
    # Adapter slots (AdapterSlots): loaded, oldest use first; pins per digest; loads under way
    # with the requests waiting on them (from the moment the load is asked for, as
    # `held_or_loading` counts them); loads waiting for a slot, first come first served.
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)
    pins: Counter[str] = field(default_factory=Counter)
    loading: dict[str, list[Request]] = field(default_factory=dict)
    reserved: int = 0
    slot_line: deque[PendingLoad] = field(default_factory=deque)
    loads: list[float] = field(default_factory=list)  # when each load was sent
    demand: DemandTracker = field(default_factory=DemandTracker)  # AdapterSlots' eviction
    due: float | None = None  # the wake-up scheduled for the model
    version: int = 0

    def can_load(self) -> bool:
        if len(self.loaded) + self.reserved < self.gateway.max_loaded:
            return True
        return any(not self.pins[d] for d in self.loaded)

    def view(self) -> EngineView:
        return EngineView(
            name=self.name,
            ready=True,
            running=self.running,
            queued=len(self.queue),
            max_running=self.gateway.max_running,
            loaded=frozenset(self.loaded) | frozenset(self.loading),
            can_load=self.can_load(),
            free_slot=len(self.loaded) + self.reserved < self.gateway.max_loaded,
            active=frozenset(d for d, n in self.pins.items() if n > 0),
            max_active=self.model.capacity.lora_slots,
        )


# --- the simulation -----------------------------------------------------------------------------


class Simulation:
    def __init__(self, engines: int, policy: Policy, capacity: Capacity, gateway: Gateway) -> None:
        self.engines = [
            SimEngine(f"engine-{i}", EngineModel(capacity), gateway) for i in range(engines)
        ]
        self.by_name = {e.name: e for e in self.engines}
        self.policy = policy
        self.gateway = gateway
        self.now = 0.0
        self.requests: dict[Hashable, Request] = {}
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._order = itertools.count()  # ties in time run in the order they were scheduled
        self._turns = itertools.cycle(self.engines)

    def at(self, time: float, action: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (time, next(self._order), action, args))

    def run(self, requests: list[Request]) -> None:
        for request in requests:
            self.requests[request.id] = request
            self.at(request.arrival, self.arrive, request)
        while self._events:
            self.now, _, action, args = heapq.heappop(self._events)
            action(*args)

    # Routing.

    def route(self, request: Request) -> SimEngine:
        if self.policy is Policy.round_robin:
            return next(self._turns)
        if self.policy is Policy.least_load:
            return min(self.engines, key=lambda e: e.running + len(e.queue))
        view = choose([e.view() for e in self.engines], request.digest)
        assert view is not None  # every engine is ready
        return self.by_name[view.name]

    # The gateway: admission, then the adapter.

    def arrive(self, request: Request) -> None:
        engine = self.route(request)
        self.catch_up(engine)
        if engine.running < self.gateway.max_running and not engine.queue:
            self.take_turn(engine, request)
        elif len(engine.queue) >= self.gateway.max_queued:
            request.refused = True
        else:
            request.queued = True
            engine.queue.append(request)
            self.at(self.now + self.gateway.queue_timeout_s, self.queue_timeout, engine, request)
        self.reschedule(engine)

    def queue_timeout(self, engine: SimEngine, request: Request) -> None:
        if request.queued:
            request.queued = False
            request.refused = True
            engine.queue.remove(request)

    def take_turn(self, engine: SimEngine, request: Request) -> None:
        engine.running += 1
        digest = request.digest
        if digest is None:
            self.submit(engine, request)
            return
        engine.pins[digest] += 1  # pinned first: from here on nothing evicts it
        engine.demand.touch(digest, self.now)
        if digest in engine.loaded:
            engine.loaded.move_to_end(digest)
            self.submit(engine, request)
        elif digest in engine.loading:
            engine.loading[digest].append(request)
        else:
            engine.loading[digest] = [request]
            pending = PendingLoad(digest, self.now + WAIT_FOR_SLOT_S)
            engine.slot_line.append(pending)
            self.at(pending.deadline, self.slot_timeout, engine, pending)
            self.reserve_slots(engine)

    def reserve_slots(self, engine: SimEngine) -> None:
        """Start the loads waiting for a slot, evicting the least recently used idle adapter
        (an unload costs the engine nothing here), until one finds every slot pinned."""
        while engine.slot_line:
            if len(engine.loaded) + engine.reserved >= self.gateway.max_loaded:
                idle = (d for d in engine.loaded if not engine.pins[d])
                victim = engine.demand.victim(idle, self.now)
                if victim is None:
                    return  # until a pin is released
                del engine.loaded[victim]
                engine.demand.forget(victim)
                continue
            digest = engine.slot_line.popleft().digest
            engine.reserved += 1
            engine.loads.append(self.now)
            engine.model.load(self.now, digest)

    def slot_timeout(self, engine: SimEngine, pending: PendingLoad) -> None:
        if pending not in engine.slot_line:
            return
        self.catch_up(engine)
        engine.slot_line.remove(pending)
        for request in engine.loading.pop(pending.digest):  # ServerOverloadedError to each waiter
            request.refused = True
            self.release(engine, request)  # the next in the queue may reach the engine
        self.reschedule(engine)

    def submit(self, engine: SimEngine, request: Request) -> None:
        engine.model.submit(
            self.now, request.id, request.digest, request.prompt_tokens, request.output_tokens
        )

    def release(self, engine: SimEngine, request: Request) -> None:
        """The request is over: its pin, then its turn, which the next in the queue takes."""
        if request.digest is not None:
            engine.pins[request.digest] -= 1
            if engine.pins[request.digest] <= 0:
                del engine.pins[request.digest]
                self.reserve_slots(engine)
        engine.running -= 1
        if engine.queue:
            following = engine.queue.popleft()
            following.queued = False
            self.take_turn(engine, following)

    # The engine.

    def catch_up(self, engine: SimEngine) -> None:
        """What the engine finished by now, before anything changes its state."""
        for done in engine.model.advance(self.now):
            self.on_done(engine, done)

    def on_done(self, engine: SimEngine, done: Done) -> None:
        if done.loaded is not None:
            digest = str(done.loaded)
            engine.reserved -= 1
            engine.loaded[digest] = None
            for request in engine.loading.pop(digest):
                self.submit(engine, request)
            return
        # Sequence ids are the requests' ids.
        for seq_id in done.first:
            self.requests[seq_id].first_token = done.end
        for seq_id in done.finished:
            request = self.requests[seq_id]
            request.finished = done.end
            self.release(engine, request)

    def reschedule(self, engine: SimEngine) -> None:
        due = engine.model.next_time()
        if due is not None and due != engine.due:
            engine.version += 1
            self.at(due, self.wake, engine, engine.version)
        engine.due = due

    def wake(self, engine: SimEngine, version: int) -> None:
        if version == engine.version:
            engine.due = None
            self.catch_up(engine)
            self.reschedule(engine)


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    engines: int
    policy: Policy
    finished_per_s: float
    within_slo: float
    p50_ttft_s: float
    p95_ttft_s: float
    refused: float
    loads_per_1k: float


def summarize(
    sim: Simulation,
    requests: list[Request],
    warmup_s: float,
    duration_s: float,
    slo_s: float,
) -> Row:
    measured = [r for r in requests if r.arrival >= warmup_s]
    window = duration_s - warmup_s
    finished = sum(
        1 for r in requests if r.finished is not None and warmup_s <= r.finished < duration_s
    )
    ttft = np.array(
        [math.inf if r.first_token is None else r.first_token - r.arrival for r in measured]
    )
    # Loads sent in the window, per request that arrived in it.
    loads = sum(1 for e in sim.engines for t in e.loads if warmup_s <= t < duration_s)
    return Row(
        engines=len(sim.engines),
        policy=sim.policy,
        finished_per_s=finished / window,
        within_slo=float(np.mean(ttft <= slo_s)),
        # Sample values (not interpolated): a refused request's infinity stays one.
        p50_ttft_s=float(np.percentile(ttft, 50, method="inverted_cdf")),
        p95_ttft_s=float(np.percentile(ttft, 95, method="inverted_cdf")),
        refused=float(np.mean([r.refused for r in measured])),
        loads_per_1k=1000 * loads / len(measured),
    )


def simulate(setup: Setup, engines: int, policy: Policy, rate: float) -> Row:
    """One run; the same requests for every policy at a given engine count and rate."""
    requests = workload(setup, rate, setup.seed + engines)
    sim = Simulation(engines, policy, setup.capacity, setup.gateway)
    sim.run(requests)
    return summarize(sim, requests, setup.warmup_s, setup.duration_s, setup.slo_s)


def ms(seconds: float) -> str:
    return "refused" if math.isinf(seconds) else f"{seconds * 1000:,.0f}"


def markdown(rows: list[Row], arrival_rates: dict[int, float], slo_ms: float) -> str:
    headers = [
        "engines", "arrivals/s", "policy", "finished/s", f"TTFT ≤ {slo_ms:g} ms",
        "p50 TTFT ms", "p95 TTFT ms", "refused", "loads / 1k req",
    ]  # fmt: skip
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [
            str(r.engines), f"{arrival_rates[r.engines]:.1f}", r.policy.value,
            f"{r.finished_per_s:.1f}", f"{r.within_slo:.1%}", ms(r.p50_ttft_s),
            ms(r.p95_ttft_s), f"{r.refused:.1%}", f"{r.loads_per_1k:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(
    engines: Annotated[str, typer.Option(help="Engine counts, comma-separated.")] = "2,4,8",
    policies: Annotated[str, typer.Option(help="Policies, comma-separated.")] = ",".join(Policy),
    load: Annotated[
        float, typer.Option(min=0.05, help="Arrival rate, as a fraction of nominal capacity.")
    ] = 0.7,
    adapters: Annotated[int, typer.Option(min=1)] = 500,
    zipf: Annotated[float, typer.Option(min=0, help="Zipf exponent of popularity.")] = 1.0,
    base_fraction: Annotated[float, typer.Option(min=0, max=1)] = 0.1,
    arrivals: Annotated[Arrivals, typer.Option()] = Arrivals.poisson,
    cv: Annotated[float, typer.Option(min=0.1, help="Gamma arrivals' gap variation.")] = 2.0,
    duration_s: Annotated[float, typer.Option(min=1, help="Virtual seconds of arrivals.")] = 600,
    warmup_s: Annotated[float, typer.Option(min=0, help="Left out of the results.")] = 60,
    slo_ms: Annotated[float, typer.Option(min=1, help="TTFT objective.")] = 500,
    token_ms: Annotated[float, typer.Option(help="Decode step, one sequence.")] = 20,
    batch_growth: Annotated[float, typer.Option(help="Step growth per more running.")] = 0.02,
    prefill_us: Annotated[float, typer.Option(help="Prefill, µs per prompt token.")] = 50,
    max_batch: Annotated[int, typer.Option(min=1, help="vLLM's --max-num-seqs.")] = 64,
    lora_slots: Annotated[int, typer.Option(min=1, help="vLLM's --max-loras.")] = 4,
    load_ms: Annotated[float, typer.Option(help="One adapter load (stalls the engine).")] = 100,
    max_loaded: Annotated[int, typer.Option(min=1, help="Adapters per engine.")] = 8,
    max_running: Annotated[int, typer.Option(min=1, help="Gateway admission.")] = 64,
    max_queued: Annotated[int, typer.Option(min=0)] = 256,
    queue_timeout_s: Annotated[float, typer.Option(min=0.1)] = 30,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Simulate the router, round-robin and least-load in front of N engines; a markdown table."""
    counts = [int(n) for n in engines.split(",")]
    chosen = [Policy(p) for p in policies.split(",")]
    if warmup_s >= duration_s:
        raise typer.BadParameter("--warmup-s must be below --duration-s")
    capacity = Capacity(
        token_s=token_ms / 1000,
        batch_growth=batch_growth,
        prefill_token_s=prefill_us / 1e6,
        max_batch=max_batch,
        lora_slots=lora_slots,
        load_s=load_ms / 1000,
    )
    setup = Setup(
        capacity=capacity,
        gateway=Gateway(max_running, max_queued, queue_timeout_s, max_loaded),
        digests=[hashlib.sha256(f"adapter-{k}".encode()).hexdigest() for k in range(adapters)],
        zipf=zipf,
        base_fraction=base_fraction,
        arrivals=arrivals,
        cv=cv,
        duration_s=duration_s,
        warmup_s=warmup_s,
        slo_s=slo_ms / 1000,
        seed=seed,
    )
    nominal = nominal_rate(capacity)
    # What the cluster sustains without affinity: least-load's throughput, offered the
    # engines' nominal rate (far more than it finishes).
    sustained = {
        n: simulate(setup, n, Policy.least_load, n * nominal).finished_per_s for n in counts
    }
    rates = {n: load * sustained[n] for n in counts}
    rows = [simulate(setup, n, policy, rates[n]) for n in counts for policy in chosen]

    print(f"command: {shlex.join(['python', *sys.argv])}\n")
    print(
        f"{arrivals.value} arrivals at {load:.0%} of what least-load sustains; {adapters} "
        f"adapters, Zipf {zipf:g}, {base_fraction:.0%} base model; {duration_s:g} s virtual, "
        f"the first {warmup_s:g} s left out. Engines: decode {token_ms:g} ms + "
        f"{batch_growth:.0%} per more running, prefill {prefill_us:g} µs/token, "
        f"max batch {max_batch}, {lora_slots} adapters running, load {load_ms:g} ms; gateway: "
        f"max_running {max_running}, {max_loaded} adapters loaded per engine.\n"
    )
    for n in counts:
        print(
            f"- {n} engines: least-load sustains {sustained[n]:.1f} req/s, "
            f"{sustained[n] / (n * nominal):.0%} of their nominal {n * nominal:.1f} "
            "(full batches, no load, no adapter waiting)"
        )
    print()
    print(markdown(rows, rates, slo_ms))
    top = np.cumsum(popularity(adapters, zipf))
    print("\nFewest loads / 1k requests any router can do (the most popular adapters held):")
    for n in counts:
        held = top[min(n * max_loaded, adapters) - 1]
        floor = max(0.0, 1000 * (1 - base_fraction) * (1 - held))  # no -0 when all fit
        print(f"- {n} engines: {floor:.0f}")


if __name__ == "__main__":
    typer.run(main)
