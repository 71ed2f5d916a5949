"""The sweep's pruner as Ray's scheduler: ASHA's first rung near a fifth of the steps, Hyperband's
brackets where the budget has room for them, no early stop for ``none``."""

from __future__ import annotations

import pytest

from hpo import HpoError, Sweep
from hpo.overrides import parse_overrides
from hpo.run.ranking import pruned_on
from hpo.run.scheduling import _ASHA, _NoStop, make_scheduler


def rungs(sweep: Sweep) -> list[list[float]]:
    """Each bracket's rungs (steps), lowest first, of the scheduler the sweep builds."""
    scheduler = make_scheduler(sweep)
    assert isinstance(scheduler, _ASHA)
    assert (scheduler._metric, scheduler._max_t, scheduler._reduction_factor) == (
        pruned_on(sweep), sweep.max_steps, sweep.reduction_factor)
    return [[milestone for milestone, _ in reversed(bracket._rungs)] for bracket in scheduler._brackets]


@pytest.mark.parametrize(("fields", "first", "expected"), [
    ({"max_steps": 120, "eval_every": 20}, 20, [[20, 60]]),  # lora.py: the first evaluation
    ({"max_steps": 120, "eval_every": 5}, 25, [[25, 75]]),  # not step 5: the evaluation nearest 24
    ({"max_steps": 60, "eval_every": 20}, 20, [[20, 60]]),  # at least one evaluation
    ({"max_steps": 120, "eval_every": 5, "grace_period": 10}, 10, [[10, 30, 90]]),  # as given
])
def test_asha_first_judges_trials_near_a_fifth_of_their_steps(fields: dict, first: int, expected: list) -> None:
    sweep = Sweep(**fields)
    assert sweep.first_rung == first and sweep.brackets == 1
    assert rungs(sweep) == expected


@pytest.mark.parametrize(("fields", "expected"), [
    # 120 steps, first rung 25, factor 3: rungs 25 and 75, so two brackets, the second judging at 75 only
    ({"max_steps": 120, "eval_every": 5}, [[25, 75], [75]]),
    ({"max_steps": 300, "eval_every": 10, "grace_period": 10, "reduction_factor": 2}, [
        [10, 20, 40, 80, 160], [20, 40, 80, 160], [40, 80, 160], [80, 160], [160]]),
    ({"max_steps": 40, "eval_every": 20}, [[20]]),  # no room for a second rung: one bracket, as asha
])
def test_hyperband_has_a_bracket_per_rung_the_budget_holds(fields: dict, expected: list) -> None:
    sweep = Sweep(pruner="hyperband", **fields)
    assert sweep.brackets == len(expected)
    assert rungs(sweep) == expected


def test_no_pruner_stops_nothing() -> None:
    scheduler = make_scheduler(Sweep(pruner="none"))
    assert isinstance(scheduler, _NoStop) and not isinstance(scheduler, _ASHA)


def test_the_pruner_fields_are_checked() -> None:
    assert parse_overrides(["pruner=hyperband", "grace_period=none"]) == {"pruner": "hyperband", "grace_period": None}
    with pytest.raises(HpoError, match="must be one of asha, hyperband, none"):
        parse_overrides(["pruner=median"])
    for bad in (0, 121, 2.5):
        with pytest.raises(HpoError, match=f"sweep field grace_period={bad!r} must be a whole number of steps from 1 "
                                           "to max_steps=120"):
            Sweep(grace_period=bad)  # type: ignore[arg-type]
