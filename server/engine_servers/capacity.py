"""What an engine costs, as a small pure model shared by the fake engine (which sleeps through it
in real time) and the routing simulation (`loadtests/bench_routing.py`, in virtual time), so the
two cannot disagree about how an engine behaves.

It follows vLLM's scheduler in the few ways that matter to a router:

- The engine runs steps. Every running sequence gets one token per step; a step lasts
  `token_s * (1 + batch_growth * (running - 1))`, plus `prefill_token_s` per prompt token of the
  sequences that join in it (their first token comes at its end).
- At most `max_batch` sequences run; the others wait inside the engine, first come first served.
- At most `lora_slots` distinct adapters run at once (vLLM's `--max-loras`): a waiting sequence
  whose adapter would be one too many is skipped, and later ones that fit go ahead of it, as
  vLLM does. Base-model sequences take no slot.
- Loading an adapter (`/v1/load_lora_adapter`, or a LoRA resolver) takes `load_s`, between
  steps: vLLM's engine core runs it in its busy loop, so every running sequence stalls meanwhile.

Which adapters an engine holds (and evicting them) is the caller's business, as it is vLLM's
API server's: the model only charges the time. Neither is moving an adapter between CPU and GPU
memory charged (milliseconds, against the load's tens or hundreds).

The model does not read a clock: callers pass `now` and ask when the next change is due
(`next_time`), then `advance` to it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Capacity:
    token_s: float = 0.02  # one decode step with one sequence running
    batch_growth: float = 0.02  # each more running sequence makes a step this much longer
    prefill_token_s: float = 0.0  # per prompt token, added to the step a sequence joins in
    max_batch: int = 64  # running sequences at once (vLLM's --max-num-seqs)
    lora_slots: int = 4  # distinct adapters running at once (vLLM's --max-loras)
    load_s: float = 0.1  # one adapter load, during which no step runs

    def __post_init__(self) -> None:
        if self.token_s < 0 or self.batch_growth < 0 or self.prefill_token_s < 0:
            raise ValueError("token_s, batch_growth and prefill_token_s must be >= 0")
        if self.max_batch < 1 or self.lora_slots < 1 or self.load_s < 0:
            raise ValueError("max_batch and lora_slots must be >= 1, load_s >= 0")

    def step_s(self, running: int, prefill_tokens: int = 0) -> float:
        """How long one step takes with `running` sequences, `prefill_tokens` of them new."""
        return (
            self.token_s * (1 + self.batch_growth * max(running - 1, 0))
            + self.prefill_token_s * prefill_tokens
        )


@dataclass
class _Sequence:
    id: Hashable
    adapter: str | None
    prompt_tokens: int
    output_tokens: int
    emitted: int = 0


@dataclass(frozen=True)
class Done:
    """What one step or load finished, at `end`. For a step: `tokens` got one token each
    (`first` their first one), `finished` got their last (and left). For a load: `loaded`."""

    end: float
    tokens: tuple[Hashable, ...] = ()
    first: tuple[Hashable, ...] = ()
    finished: tuple[Hashable, ...] = ()
    loaded: Hashable | None = None


@dataclass
class _Operation:
    end: float
    load: Hashable | None = None  # a load's key; None: a step
    joined: tuple[Hashable, ...] = ()  # a step's sequences that got their first token
    # A step's running sequences, fixed when it started (an abort drops one from `_running`).
    batch: tuple[Hashable, ...] = ()


class EngineModel:
    """One engine's batch, waiting line and pending loads. Call `advance(now)` before
    anything else at `now`, so that what was due is reported before the state changes."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        # Invariants: `_running` holds at most max_batch sequences of at most lora_slots
        # distinct adapters; `_op` is None only when nothing could run, or when work reached
        # the idle engine at `_idle_until`: the next `advance` starts it then, with whatever
        # else arrived at that instant.
        self._running: dict[Hashable, _Sequence] = {}
        self._waiting: deque[_Sequence] = deque()
        self._loads: deque[Hashable] = deque()
        self._op: _Operation | None = None
        self._idle_until: float | None = None

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self,
        now: float,
        seq_id: Hashable,
        adapter: str | None,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        """A sequence of `output_tokens` (at least one) for `adapter` (None: the base model)."""
        self._waiting.append(_Sequence(seq_id, adapter, prompt_tokens, max(output_tokens, 1)))
        self._wake(now)

    def load(self, now: float, key: Hashable) -> None:
        """A load, done after the step under way and the loads before it; reported as
        `Done(loaded=key)`."""
        self._loads.append(key)
        self._wake(now)

    def abort(self, seq_id: Hashable) -> None:
        """Drop a sequence (its client went away); it gets no more tokens."""
        if self._running.pop(seq_id, None) is None:
            self._waiting = deque(s for s in self._waiting if s.id != seq_id)

    def next_time(self) -> float | None:
        """When the step or load under way ends, or the idle engine starts on new work; None:
        the engine is idle."""
        return self._op.end if self._op is not None else self._idle_until

    def advance(self, now: float) -> list[Done]:
        """Finish every step and load due by `now`, in order; the next starts as one ends."""
        if self._idle_until is not None and self._idle_until <= now:
            start, self._idle_until = self._idle_until, None
            self._start(start)
        done: list[Done] = []
        while self._op is not None and self._op.end <= now:
            op, self._op = self._op, None
            done.append(self._complete(op))
            self._start(op.end)
        return done

    def _wake(self, now: float) -> None:
        if self._op is None and self._idle_until is None:
            self._idle_until = now

    def _complete(self, op: _Operation) -> Done:
        if op.load is not None:
            return Done(op.end, loaded=op.load)
        tokens, finished = [], []
        for seq_id in op.batch:
            sequence = self._running.get(seq_id)
            if sequence is None:
                continue  # aborted during the step
            tokens.append(seq_id)
            sequence.emitted += 1
            if sequence.emitted >= sequence.output_tokens:
                finished.append(seq_id)
                del self._running[seq_id]
        emitted = set(tokens)
        first = tuple(s for s in op.joined if s in emitted)
        return Done(op.end, tuple(tokens), first, tuple(finished))

    def _start(self, now: float) -> None:
        if self._loads:  # vLLM serves its pending calls before the next step
            self._op = _Operation(now + self.capacity.load_s, load=self._loads.popleft())
            return
        joined = self._admit()
        if not self._running:
            return
        prefill = sum(self._running[s].prompt_tokens for s in joined)
        end = now + self.capacity.step_s(len(self._running), prefill)
        self._op = _Operation(end, joined=joined, batch=tuple(self._running))

    def _admit(self) -> tuple[Hashable, ...]:
        """Move waiting sequences into the batch, first come first served, skipping those
        whose adapter would be one too many."""
        active = {s.adapter for s in self._running.values() if s.adapter is not None}
        joined: list[Hashable] = []
        skipped: deque[_Sequence] = deque()
        while self._waiting and len(self._running) < self.capacity.max_batch:
            sequence = self._waiting.popleft()
            adapter = sequence.adapter
            if adapter is not None and adapter not in active:
                if len(active) >= self.capacity.lora_slots:
                    skipped.append(sequence)
                    continue
                active.add(adapter)
            self._running[sequence.id] = sequence
            joined.append(sequence.id)
        self._waiting.extendleft(reversed(skipped))  # skipped ones keep their place in line
        return tuple(joined)
