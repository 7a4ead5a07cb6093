"""Which engine of the pool a request goes to: a pure function of what the gateway knows about
each engine right now, so it is tested and simulated without any engine.

An adapter request scores each ready engine (after llm-d's lora-affinity scorer):

- 1.0: the adapter is loaded (or loading) there and the engine has room for it;
- 0.8: a slot is free there and the engine has room;
- 0.75: the adapter is loaded there and the gateway has room, but the engine batches its limit
  of other adapters: the request waits there for a LoRA slot rather than evict elsewhere;
- 0.7: an idle adapter can be evicted there and the engine has room;
- 0.6: the adapter is loaded there, but the engine has no room: the request would queue;
- 0.4: no room, but it could load the adapter;
- 0: no slot can be had (every loaded adapter is busy).

An engine has room for a request while its running plus queued requests are below
`max_running`, and the engine would batch the adapter at once: it is one of those running there
already, or fewer than `max_active` (vLLM's --max-loras) are. Past that, vLLM makes the request
wait inside the engine for a LoRA slot, however idle the gateway thinks the engine is.

Ties go to the least loaded engine, then to the engine a hash of (digest, engine) ranks first:
so equally idle engines share new adapters evenly, and every gateway replica, seeing the same
engines, picks the same one for the same adapter. A hot adapter spreads to a second engine once
its holder has no room instead of queueing behind it, and an engine is only made to evict when
no engine holds the adapter or has a free slot. Adapters are named by content digest: a replaced
adapter is a new digest that no engine holds, so a request never goes to an engine holding a
stale version. Base-model requests go to the least loaded engine.

A merged engine serves one adapter version merged into the base, with no LoRA cost: that
version's requests go to the least loaded of its merged engines that has room, and to the
hot-swap engines above when none has (or none is up), so callers never wait on a merged engine
while a base engine could serve them. Merged engines take no other request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

HELD_WITH_ROOM = 1.0
HELD_BATCH_FULL = 0.75
SLOT_WITH_ROOM = 0.8
EVICT_WITH_ROOM = 0.7
HELD_SATURATED = 0.6
SLOT_SATURATED = 0.4
NO_SLOT = 0.0


@dataclass(frozen=True)
class EngineView:
    """One engine as the router sees it. `loaded` holds the digests loaded or loading there,
    `active` those with requests running there; `free_slot` says whether one more adapter fits
    as it is, `can_load` whether it fits at all (a free slot, or an idle one to evict)."""

    name: str
    ready: bool
    running: int  # requests sent to the engine and not finished
    queued: int  # requests waiting in the gateway for a turn on it
    max_running: int  # above this the engine is saturated: requests queue in the gateway
    loaded: frozenset[str]
    can_load: bool
    free_slot: bool = True
    active: frozenset[str] = frozenset()
    max_active: int = 1 << 30  # adapters the engine batches at once (vLLM's --max-loras)
    merged: str | None = None  # the adapter version a merged engine serves; None: the base

    @property
    def load(self) -> float:
        return (self.running + self.queued) / self.max_running

    def has_room(self, digest: str | None = None) -> bool:
        if self.running + self.queued >= self.max_running:
            return False
        return digest is None or digest in self.active or len(self.active) < self.max_active


def affinity(view: EngineView, digest: str) -> float:
    held = digest in view.loaded
    if held and view.has_room() and not view.has_room(digest):
        return HELD_BATCH_FULL
    if view.has_room(digest):
        if held:
            return HELD_WITH_ROOM
        if view.free_slot and view.can_load:
            return SLOT_WITH_ROOM
        return EVICT_WITH_ROOM if view.can_load else NO_SLOT
    if held:
        return HELD_SATURATED
    return SLOT_SATURATED if view.can_load else NO_SLOT


def spread(digest: str, engine: str) -> bytes:
    """Rendezvous rank of `engine` for `digest`: the same on every gateway replica."""
    return hashlib.blake2b(f"{digest}/{engine}".encode(), digest_size=8).digest()


def choose(
    views: Sequence[EngineView],
    digest: str | None,
    exclude: Collection[str] = (),
    *,
    merged_only: bool = False,
) -> EngineView | None:
    """The engine for a request for `digest` (None: the base model), or None when no ready
    engine outside `exclude` can take it; with `merged_only` (an adapter no engine can
    hot-swap), only one serving it merged."""
    ready = [v for v in views if v.ready and v.name not in exclude]
    candidates = [v for v in ready if v.merged is None]
    if digest is None:
        return min(candidates, key=lambda v: (v.load, v.name), default=None)
    merged = [v for v in ready if v.merged == digest]
    roomy = [v for v in merged if v.has_room()]
    if roomy:
        return min(roomy, key=lambda v: (v.load, spread(digest, v.name)))
    if merged_only:
        return min(merged, key=lambda v: (v.load, v.name), default=None)
    best: EngineView | None = None
    best_key: tuple[float, float, bytes] | None = None
    for view in candidates:
        score = affinity(view, digest)
        if score == NO_SLOT:
            continue
        key = (-score, view.load, spread(digest, view.name))
        if best_key is None or key < best_key:
            best, best_key = view, key
    if best is None:
        # Every slot on every engine is busy: the least loaded engine waits for one (bounded),
        # a saturated merged engine first (it needs no slot).
        return min(merged or candidates, key=lambda v: (v.load, v.name), default=None)
    return best
