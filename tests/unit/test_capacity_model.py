"""The engine capacity model (`server/engine_servers/capacity.py`): steps that slow as the batch
grows, the batch and adapter bounds, loads that stall the engine, in virtual time."""

from __future__ import annotations

from collections.abc import Hashable

import pytest

from server.engine_servers.capacity import Capacity, Done, EngineModel

CAP = Capacity(token_s=0.01, batch_growth=0.5, max_batch=4, lora_slots=2, load_s=0.1)


def run(model: EngineModel, until: float = 1e9) -> list[Done]:
    """Every step and load up to `until`, one at a time, as a caller following
    `next_time` sees them."""
    done: list[Done] = []
    while (due := model.next_time()) is not None and due <= until:
        done.extend(model.advance(due))
    return done


def firsts(done: list[Done]) -> dict[Hashable, float]:
    return {s: d.end for d in done for s in d.first}


def finishes(done: list[Done]) -> dict[Hashable, float]:
    return {s: d.end for d in done for s in d.finished}


def test_a_step_grows_with_the_batch_and_the_prefill() -> None:
    cap = Capacity(token_s=0.02, batch_growth=0.1, prefill_token_s=0.001)
    assert cap.step_s(1) == pytest.approx(0.02)
    assert cap.step_s(11) == pytest.approx(0.04)
    assert cap.step_s(1, prefill_tokens=30) == pytest.approx(0.05)
    assert cap.step_s(0) == pytest.approx(0.02)


@pytest.mark.parametrize(
    "knobs",
    [{"token_s": -1}, {"batch_growth": -0.1}, {"max_batch": 0}, {"lora_slots": 0}, {"load_s": -1}],
)
def test_nonsense_knobs_are_refused(knobs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Capacity(**knobs)  # type: ignore[arg-type]


def test_one_sequence_gets_a_token_per_step_and_leaves() -> None:
    model = EngineModel(Capacity(token_s=0.01, prefill_token_s=0.001))
    assert model.next_time() is None
    model.submit(5.0, "a", None, prompt_tokens=20, output_tokens=3)
    done = run(model)
    assert [d.end for d in done] == pytest.approx([5.03, 5.04, 5.05])
    assert [d.tokens for d in done] == [("a",), ("a",), ("a",)]
    assert done[0].first == ("a",) and done[-1].finished == ("a",)
    assert model.next_time() is None and model.running == 0


def test_work_that_reaches_an_idle_engine_together_shares_its_first_step() -> None:
    model = EngineModel(CAP)
    model.submit(2.0, "a", None, 0, 1)
    model.load(2.0, "L")
    model.submit(2.0, "b", None, 0, 1)
    assert model.next_time() == 2.0  # due at once, nothing started yet
    assert model.advance(2.0) == []
    done = run(model)
    assert [d.loaded for d in done] == ["L", None]
    assert done[1].first == ("a", "b")
    assert done[1].end == pytest.approx(2.0 + CAP.load_s + CAP.step_s(2))


def test_a_sequence_joins_the_running_batch_at_the_next_step() -> None:
    model = EngineModel(CAP)
    model.submit(0.0, "a", None, 0, 3)
    model.advance(0.005)  # mid-step: nothing due yet
    model.submit(0.005, "b", None, 0, 1)
    done = run(model)
    # a's first step runs alone (0.01); b joins the second, which runs two (0.015).
    assert firsts(done) == pytest.approx({"a": 0.01, "b": 0.025})
    assert finishes(done) == pytest.approx({"b": 0.025, "a": 0.035})


def test_beyond_max_batch_sequences_wait_in_the_engine() -> None:
    model = EngineModel(CAP)
    for i in range(6):
        model.submit(0.0, i, None, 0, 2 if i < 4 else 1)
    model.advance(0.0)  # the idle engine starts on all that came at that instant
    assert (model.running, model.waiting) == (4, 2)
    done = run(model)
    step4 = CAP.step_s(4)
    assert finishes(done)[0] == pytest.approx(2 * step4)
    assert firsts(done)[4] == pytest.approx(2 * step4 + CAP.step_s(2))


def test_an_adapter_beyond_the_slots_waits_and_later_ones_that_fit_go_ahead() -> None:
    model = EngineModel(CAP)  # two adapters at once
    model.submit(0.0, "a", "A", 0, 3)
    model.submit(0.0, "b", "B", 0, 3)
    model.submit(0.0, "c", "C", 0, 1)  # a third adapter: skipped
    model.submit(0.0, "d", None, 0, 1)  # the base model takes no slot
    model.submit(0.0, "e", "A", 0, 1)  # an adapter already running fits
    model.advance(0.0)
    assert (model.running, model.waiting) == (4, 1)
    done = run(model)
    first = firsts(done)
    assert first["a"] == first["d"] == first["e"]
    # C runs once A or B has no sequence left: when a and b finish, at the third step.
    assert first["c"] > finishes(done)["a"]


def test_a_load_waits_for_the_step_under_way_and_stalls_the_next() -> None:
    model = EngineModel(CAP)
    model.submit(0.0, "a", None, 0, 2)
    model.advance(0.004)
    model.load(0.004, "L")
    done = run(model)
    assert [d.loaded for d in done] == [None, "L", None]
    assert [d.end for d in done] == pytest.approx([0.01, 0.11, 0.12])


def test_loads_on_an_idle_engine_run_one_after_another() -> None:
    model = EngineModel(CAP)
    model.load(1.0, "L1")
    model.load(1.0, "L2")
    done = run(model)
    assert [d.loaded for d in done] == ["L1", "L2"]
    assert [d.end for d in done] == pytest.approx([1.1, 1.2])
    assert model.next_time() is None


def test_aborted_sequences_get_no_more_tokens() -> None:
    model = EngineModel(CAP)
    model.submit(0.0, "a", None, 0, 5)
    model.submit(0.0, "b", None, 0, 5)
    for i in range(4):
        model.submit(0.0, f"w{i}", None, 0, 1)
    model.advance(0.0)
    model.abort("a")  # during its step
    model.abort("w3")  # still waiting
    done = run(model)
    assert all("a" not in d.tokens for d in done)
    assert set(finishes(done)) == {"b", "w0", "w1", "w2"}
    assert model.running == model.waiting == 0


def test_advancing_late_reports_every_step_due_at_its_own_time() -> None:
    model = EngineModel(CAP)
    model.submit(0.0, "a", None, 0, 3)
    done = model.advance(10.0)
    assert [d.end for d in done] == pytest.approx([0.01, 0.02, 0.03])
