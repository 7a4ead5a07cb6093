"""Which engine of the pool a request goes to: a pure function of what the gateway knows about
each engine right now, so it is tested and simulated without any engine.

An adapter request scores each ready engine (after llm-d's lora-affinity scorer):

- 1.0: the adapter is loaded (or loading) there and the engine has room;
- 0.8: a slot is free (or an idle adapter can be evicted) and the engine has room;
- 0.6: the adapter is loaded there, but the engine is saturated: the request would queue;
- 0.4: saturated, but it could load the adapter;
- 0: no slot can be had (every loaded adapter is busy).

Ties go to the least loaded engine. So a hot adapter spreads to a second engine once its holder
is saturated instead of queueing behind it, and an engine is only made to evict when no engine
holds the adapter or has room. Adapters are named by content digest: a replaced adapter is a new
digest that no engine holds, so a request never goes to an engine holding a stale version.
Base-model requests go to the least loaded engine.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

HELD_WITH_ROOM = 1.0
SLOT_WITH_ROOM = 0.8
HELD_SATURATED = 0.6
SLOT_SATURATED = 0.4
NO_SLOT = 0.0


@dataclass(frozen=True)
class EngineView:
    """One engine as the router sees it. `loaded` holds the digests loaded or loading there;
    `can_load` says whether one more adapter fits (a free slot, or an idle one to evict)."""

    name: str
    ready: bool
    running: int  # requests sent to the engine and not finished
    queued: int  # requests waiting in the gateway for a turn on it
    max_running: int  # above this the engine is saturated: requests queue in the gateway
    loaded: frozenset[str]
    can_load: bool

    @property
    def load(self) -> float:
        return (self.running + self.queued) / self.max_running

    @property
    def has_room(self) -> bool:
        return self.running + self.queued < self.max_running


def affinity(view: EngineView, digest: str) -> float:
    held = digest in view.loaded
    if view.has_room:
        if held:
            return HELD_WITH_ROOM
        return SLOT_WITH_ROOM if view.can_load else NO_SLOT
    if held:
        return HELD_SATURATED
    return SLOT_SATURATED if view.can_load else NO_SLOT


def choose(
    views: Sequence[EngineView], digest: str | None, exclude: Collection[str] = ()
) -> EngineView | None:
    """The engine for a request for `digest` (None: the base model), or None when no ready
    engine outside `exclude` can take it."""
    candidates = [v for v in views if v.ready and v.name not in exclude]
    if digest is None:
        return min(candidates, key=lambda v: (v.load, v.name), default=None)
    best: EngineView | None = None
    best_key: tuple[float, float, str] | None = None
    for view in candidates:
        score = affinity(view, digest)
        if score == NO_SLOT:
            continue
        key = (-score, view.load, view.name)
        if best_key is None or key < best_key:
            best, best_key = view, key
    if best is None:
        # Every slot on every engine is busy: the least loaded engine waits for one (bounded).
        return min(candidates, key=lambda v: (v.load, v.name), default=None)
    return best
