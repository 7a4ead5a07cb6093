"""The router's choice of engine (`server.engines.routing.choose`), a pure function: an adapter
request prefers an engine holding the adapter with room, then a free slot with room, then a
saturated holder, then a saturated engine that could load it; never an engine with no slot to
have, nor one that is not ready or excluded; ties go to the least loaded, then by name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import pytest

from server.engines.routing import (
    EVICT_WITH_ROOM,
    HELD_BATCH_FULL,
    HELD_SATURATED,
    HELD_WITH_ROOM,
    NO_SLOT,
    SLOT_SATURATED,
    SLOT_WITH_ROOM,
    EngineView,
    affinity,
    choose,
    spread,
)


def view(
    name: str,
    *,
    running: int = 0,
    queued: int = 0,
    max_running: int = 4,
    loaded: Iterable[str] = (),
    can_load: bool = True,
    ready: bool = True,
) -> EngineView:
    return EngineView(name, ready, running, queued, max_running, frozenset(loaded), can_load)


SATURATED = 4  # `running` that fills an engine of the default max_running


@dataclass(frozen=True)
class Case:
    id: str
    views: list[EngineView]
    expected: str | None  # the chosen engine's name; None: no engine
    digest: str | None = "A"
    exclude: frozenset[str] = field(default_factory=frozenset)


CASES = [
    Case(
        "held with room beats a free slot, even more loaded",
        [view("e1", running=3, loaded={"A"}), view("e2")],
        "e1",
    ),
    Case(
        "loading counts as held",
        [view("e1", running=1, loaded={"A"}, can_load=False), view("e2")],
        "e1",
    ),
    Case(
        "a free slot with room beats a saturated holder",
        [view("e1", running=SATURATED, loaded={"A"}), view("e2", running=3, loaded={"B"})],
        "e2",
    ),
    Case(
        "a saturated holder beats a saturated engine that could load it",
        [view("e1", running=SATURATED, queued=3, loaded={"A"}), view("e2", running=SATURATED)],
        "e1",
    ),
    Case(
        "a saturated engine that could load it beats one with room but no slot",
        [view("e1", can_load=False, loaded={"B"}), view("e2", running=SATURATED, queued=1)],
        "e2",
    ),
    Case(
        "an engine with no slot to have is skipped, however idle",
        [view("e1", can_load=False), view("e2", running=3)],
        "e2",
    ),
    Case(
        "ties go to the least loaded",
        [view("e1", running=2), view("e2", running=1)],
        "e2",
    ),
    Case(
        "load counts the gateway's queue too",
        [view("e1", running=3, queued=3, max_running=8), view("e2", running=2, max_running=8)],
        "e2",
    ),
    Case(
        "load is relative to each engine's max_running",
        [view("e1", running=2, max_running=8), view("e2", running=1, max_running=2)],
        "e1",
    ),
    Case(
        "equal load: by name",
        [view("e2", running=1), view("e1", running=1)],
        "e1",
    ),
    Case(
        "an excluded holder is not chosen",
        [view("e1", loaded={"A"}), view("e2", running=3)],
        "e2",
        exclude=frozenset({"e1"}),
    ),
    Case(
        "every engine excluded: none",
        [view("e1"), view("e2")],
        None,
        exclude=frozenset({"e1", "e2"}),
    ),
    Case(
        "a holder that is not ready is never chosen",
        [view("e1", loaded={"A"}, ready=False), view("e2", running=SATURATED, queued=9)],
        "e2",
    ),
    Case(
        "no engine ready: none",
        [view("e1", ready=False), view("e2", ready=False, loaded={"A"})],
        None,
    ),
    Case("no engine at all: none", [], None),
    Case(
        "base request: the least loaded, slots and adapters aside",
        [view("e1", running=1, loaded={"A"}), view("e2", can_load=False)],
        "e2",
        digest=None,
    ),
    Case(
        "base request: equal load, by name",
        [view("e2", running=1), view("e1", running=1)],
        "e1",
        digest=None,
    ),
    Case(
        "base request: not ready or excluded engines are skipped",
        [view("e1", ready=False), view("e2", running=3), view("e3")],
        "e2",
        digest=None,
        exclude=frozenset({"e3"}),
    ),
    Case(
        "base request: no engine ready, none",
        [view("e1", ready=False)],
        None,
        digest=None,
    ),
    Case(
        "every engine busy: the least loaded holder, though others are idler",
        [
            view("e1", running=SATURATED, queued=5, loaded={"A"}, can_load=False),
            view("e2", running=SATURATED, queued=2, loaded={"A"}, can_load=False),
            view("e3", can_load=False, loaded={"B"}),
        ],
        "e2",
    ),
    Case(
        "every slot everywhere busy, no holder: the least loaded engine waits for one",
        [
            view("e1", running=3, can_load=False),
            view("e2", running=1, can_load=False),
            view("e3", running=2, can_load=False),
        ],
        "e2",
    ),
    Case(
        "every slot busy, the least loaded not ready or excluded: the next",
        [
            view("e1", running=3, can_load=False),
            view("e2", can_load=False, ready=False),
            view("e3", running=1, can_load=False),
        ],
        "e1",
        exclude=frozenset({"e3"}),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_choose(case: Case) -> None:
    chosen = choose(case.views, case.digest, case.exclude)
    assert (chosen.name if chosen is not None else None) == case.expected


@pytest.mark.parametrize(
    ("engine", "score"),
    [
        (view("e", running=3, loaded={"A"}), HELD_WITH_ROOM),
        (view("e", running=3, loaded={"A"}, can_load=False), HELD_WITH_ROOM),
        (view("e", running=3), SLOT_WITH_ROOM),
        (view("e", running=2, queued=2, loaded={"A"}), HELD_SATURATED),
        (view("e", running=SATURATED, loaded={"A"}, can_load=False), HELD_SATURATED),
        (view("e", running=SATURATED), SLOT_SATURATED),
        (view("e", running=3, can_load=False), NO_SLOT),
        (view("e", running=SATURATED, can_load=False), NO_SLOT),
    ],
)
def test_affinity_scores(engine: EngineView, score: float) -> None:
    assert affinity(engine, "A") == score


def test_the_order_of_the_scores() -> None:
    assert HELD_WITH_ROOM > SLOT_WITH_ROOM > HELD_SATURATED > SLOT_SATURATED > NO_SLOT


def test_a_hot_adapter_spreads_to_a_second_engine_once_its_holder_is_saturated() -> None:
    """Requests for A arrive one after another and stay running; each lands where the router
    says, and loads A there if needed."""
    views = {
        "e1": view("e1", max_running=2, loaded={"A"}),
        "e2": view("e2", max_running=2),
        "e3": view("e3", max_running=2, running=1, loaded={"B"}),
    }
    placed = []
    for _ in range(6):
        chosen = choose(list(views.values()), "A")
        assert chosen is not None
        placed.append(chosen.name)
        full = chosen.running == chosen.max_running
        views[chosen.name] = replace(
            chosen,
            running=chosen.running + (not full),
            queued=chosen.queued + full,  # beyond max_running, requests queue in the gateway
            loaded=chosen.loaded | {"A"},
        )
    # e1 until it is full; then the idle e2 loads A (not e3, busier); e2 until it is full; then
    # e3 loads it, room beating a queue at a holder; then every holder is full at equal load:
    # the one the (digest, engine) hash ranks first, and after that the least loaded holder.
    first = min(("e1", "e2", "e3"), key=lambda name: spread("A", name))
    assert placed == ["e1", "e1", "e2", "e2", "e3", first]
    others = sorted((n for n in ("e1", "e2", "e3") if n != first), key=lambda n: spread("A", n))
    assert choose(list(views.values()), "A") == views[others[0]]


def test_a_free_slot_beats_evicting_an_idle_adapter() -> None:
    evicting = replace(view("e1", loaded={"B"}), free_slot=False)
    free = view("e2", running=2)  # busier, but nothing popular is evicted for A there
    assert affinity(evicting, "A") == EVICT_WITH_ROOM < affinity(free, "A") == SLOT_WITH_ROOM
    assert choose([evicting, free], "A") == free


def test_an_engine_batching_its_limit_of_adapters_has_no_room_for_another() -> None:
    """vLLM runs at most --max-loras adapters at once: a fifth would wait inside the engine."""
    full = replace(view("e1", running=2, loaded={"A", "B"}), active=frozenset("BCDE"), max_active=4)
    assert affinity(full, "B") == HELD_WITH_ROOM  # batched with its own kind at once
    assert affinity(full, "A") == HELD_BATCH_FULL  # waits there rather than evict elsewhere
    idle = view("e2", running=3)  # a free slot and room: loads it at once
    assert choose([full, idle], "A") == idle and choose([full, idle], "B") == full


def test_equally_idle_engines_share_new_adapters_the_same_way_every_time() -> None:
    views = [view(f"e{i}") for i in range(4)]
    digests = [f"{i:064x}" for i in range(40)]
    placed = [choose(views, d) for d in digests]
    assert placed == [choose(list(reversed(views)), d) for d in digests]  # order-independent
    assert {v.name for v in placed if v is not None} == {"e0", "e1", "e2", "e3"}


# --- merged engines ------------------------------------------------------------------------------


def merged_view(name: str, digest: str, *, running: int = 0, ready: bool = True) -> EngineView:
    return replace(view(name, running=running, ready=ready), merged=digest, can_load=False)


def test_a_merged_version_goes_to_its_least_loaded_merged_engine_with_room() -> None:
    views = [
        view("base", loaded=["d"]),
        merged_view("m1", "d", running=2),
        merged_view("m2", "d", running=1),
        merged_view("other", "e"),
    ]
    chosen = choose(views, "d")
    assert chosen is not None and chosen.name == "m2"


def test_with_no_merged_engine_up_or_with_room_the_version_hot_swaps() -> None:
    base = view("base")
    for merged in (merged_view("m", "d", ready=False), merged_view("m", "d", running=4)):
        chosen = choose([base, merged], "d")
        assert chosen is not None and chosen.name == "base"
    # No hot-swap engine can take it either: the saturated merged engine waits for it.
    full_base = view("base", running=4, can_load=False)
    chosen = choose([full_base, merged_view("m", "d", running=4)], "d")
    assert chosen is not None and chosen.name == "m"


def test_merged_engines_take_no_other_request() -> None:
    views = [view("base", running=3), merged_view("m", "d")]
    for digest in (None, "e"):
        chosen = choose(views, digest)
        assert chosen is not None and chosen.name == "base"
    assert choose([merged_view("m", "d")], None) is None
    assert choose([merged_view("m", "d")], "e") is None
