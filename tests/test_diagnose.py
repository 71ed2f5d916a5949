"""Learning-curve diagnosis: synthetic curves of known behaviour get the right finding and
evidence (clean and noisy), and real in-memory Optuna studies get importance, range edges,
a model comparison, advice and JSON-safe output."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from hpo.analysis.diagnose import Finding, StudyDiagnosis, diagnose_curves, diagnose_study
from hpo.analysis.diagnose_thresholds import EARLY_OVERFIT_RISE, IMPORTANCE_MIN_TRIALS, OVERFIT_RISE
from hpo.priors import Prior

EVERY = 20
Shape = Callable[[float], tuple[float, float]]

# Each shape: x (share of the budget, 0..1] -> (train_loss, eval_loss).
SHAPES: dict[str, Shape] = {
    # falls fast, then settles: the curve of a good learning rate
    "healthy": lambda x: (0.25 + 0.45 * math.exp(-5 * x), 0.32 + 0.38 * math.exp(-5 * x)),
    # train keeps falling; eval bottoms out at 40% of the budget, then climbs
    "overfitting": lambda x: (0.05 + 0.65 * math.exp(-4 * x),
                              0.30 + 0.40 * math.exp(-8 * x) + max(0.0, 0.25 * (x - 0.4))),
    # a small early drop, then flat and high
    "underfitting": lambda x: (0.66 + 0.03 * math.exp(-8 * x), 0.68 + 0.02 * math.exp(-8 * x)),
    # a straight, shallow decline that has not levelled off
    "slow_convergence": lambda x: (0.69 - 0.15 * x, 0.70 - 0.13 * x),
    # falls, then climbs back above where it was
    "diverging": lambda x: (0.69 - 0.5 * x if x < 0.35 else 0.515 + 0.6 * (x - 0.35),
                            0.72 - 0.5 * x if x < 0.35 else 0.545 + 0.6 * (x - 0.35)),
}


def slow_with_decay(x: float) -> tuple[float, float]:
    """A too-low learning rate under a linear decay to 0: progress x - x^2/2 flattens by itself."""
    return 0.69 - 0.4 * (x - x * x / 2), 0.70 - 0.34 * (x - x * x / 2)


def make_curves(shape: Shape, n: int, noise: float = 0.0, seed: int = 0) -> dict[str, list[list[float]]]:
    """``n`` evaluations every EVERY steps, with multiplicative Gaussian noise (eval at 0.6x)."""
    rng = random.Random(seed)
    train, evals = [], []
    for i in range(n):
        step = EVERY * (i + 1)
        a, b = shape(step / (EVERY * n))
        train.append([step, a * (1 + rng.gauss(0, noise))])
        evals.append([step, b * (1 + rng.gauss(0, 0.6 * noise))])
    return {"train_loss": train, "eval_loss": evals}


def pairs(values: list[float], every: int = EVERY) -> list[list[float]]:
    return [[every * (i + 1), v] for i, v in enumerate(values)]


def kinds(findings: list[Finding]) -> list[str]:
    return [f.kind for f in findings]


# --- one trial's curves ----------------------------------------------------------------------

OVERFIT_TRAIN = [0.70, 0.55, 0.45, 0.38, 0.33, 0.28, 0.24, 0.20, 0.17, 0.14]
OVERFIT_EVAL = [0.70, 0.55, 0.45, 0.40, 0.38, 0.41, 0.45, 0.49, 0.53, 0.57]  # lowest at step 100

CASES = [
    # id, curves, expected kinds, expected evidence (exact, or a predicate)
    ("overfit", {"train_loss": pairs(OVERFIT_TRAIN), "eval_loss": pairs(OVERFIT_EVAL)}, ["overfitting"],
     {"best_eval_step": 100, "best_eval_loss": 0.38, "last_eval_step": 200, "last_eval_loss": 0.57,
      "train_loss_at_best": 0.33, "last_train_loss": 0.14, "train_loss_drop": lambda v: v > 0.4,
      "eval_rise": lambda v: 0.3 < v < 0.6}),
    ("overfit, 3 points", {"train_loss": pairs([0.7, 0.4, 0.3]), "eval_loss": pairs([0.7, 0.45, 0.55])},
     ["overfitting"], {"best_eval_step": 40, "best_eval_loss": 0.45, "last_eval_loss": 0.55}),
    ("overfit from the first evaluation", {"train_loss": pairs([0.5, 0.4, 0.3, 0.2, 0.1]),
                                           "eval_loss": pairs([0.5, 0.52, 0.56, 0.6, 0.66])},
     ["overfitting"], {"best_eval_step": 20}),
    ("diverging: climbs back up", {"train_loss": pairs([0.69, 0.6, 0.52, 0.48, 0.55, 0.62, 0.7, 0.8]),
                                   "eval_loss": pairs([0.70, 0.62, 0.55, 0.52, 0.58, 0.66, 0.74, 0.85])},
     ["diverging"], {"step": 80, "lowest_loss": 0.48, "last_loss": 0.8, "start_loss": 0.69,
                     "rise": lambda v: v > 0.3}),
    ("diverging: rises from the start", {"train_loss": pairs([0.69, 0.75, 0.9, 1.3, 2.5]),
                                         "eval_loss": pairs([0.7, 0.8, 1.0, 1.5, 3.0])},
     ["diverging"], {"step": 20, "start_loss": 0.69, "last_loss": 2.5}),
    ("diverging: NaN", {"train_loss": [[20, 0.69], [40, 0.6], [60, 0.9], [80, math.nan], [100, math.nan]],
                        "eval_loss": [[20, 0.7], [40, 0.62], [60, 0.95], [80, math.nan], [100, math.nan]],
                        "learning_rate": [[20, 0.01], [40, 0.02], [60, 0.02], [80, 0.02]]},
     ["diverging"], {"curve": "train_loss", "step": 80, "value": lambda v: math.isnan(v),
                     "last_finite_step": 60, "last_finite_value": 0.9, "learning_rate_at_step": 0.02}),
    ("diverging: inf in eval_loss first", {"train_loss": pairs([0.69, 0.6, 0.5, math.nan]),
                                           "eval_loss": pairs([0.7, 0.65, math.inf, math.inf])},
     ["diverging"], {"curve": "eval_loss", "step": 60, "value": math.inf}),
    ("diverging: NaN as JSON null, 2 points", {"train_loss": [[20, 0.7], [40, None]]},
     ["diverging"], {"step": 40, "last_finite_value": 0.7}),
    ("slow", {"train_loss": pairs([0.69 - 0.015 * i for i in range(10)]),
              "eval_loss": pairs([0.70 - 0.013 * i for i in range(10)])},
     ["slow_convergence"], {"total_drop": lambda v: 0.15 < v < 0.25, "last_half_drop": lambda v: v > 0.05}),
    ("slow under a linear decay", make_curves(slow_with_decay, 12), ["slow_convergence"],
     {"total_drop": lambda v: v < 0.35}),
    ("underfit", {"train_loss": pairs([0.69, 0.675, 0.67, 0.668, 0.669, 0.667, 0.668, 0.667]),
                  "eval_loss": pairs([0.70, 0.69, 0.688, 0.689, 0.687, 0.688, 0.688, 0.687])},
     ["underfitting"], {"total_drop": lambda v: 0 < v < 0.05, "eval_loss_drop": lambda v: 0 < v < 0.05}),
    ("healthy", make_curves(SHAPES["healthy"], 10), ["healthy"],
     {"total_drop": lambda v: v > 0.3, "best_eval_step": 200}),
    ("healthy, settled with a wobble", {"train_loss": pairs([0.7, 0.45, 0.35, 0.31, 0.3, 0.29, 0.3, 0.29]),
                                        "eval_loss": pairs([0.7, 0.48, 0.4, 0.36, 0.35, 0.36, 0.355, 0.36])},
     ["healthy"], {}),
    ("too few points", {"train_loss": pairs([0.7, 0.5]), "eval_loss": pairs([0.7, 0.55])}, [], {}),
    ("nothing", {}, [], {}),
]


@pytest.mark.parametrize(("curves", "expected", "evidence"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_curves_get_the_right_finding_and_evidence(curves: dict, expected: list[str], evidence: dict) -> None:
    findings = diagnose_curves(curves, max_steps=200)
    assert kinds(findings) == expected
    for key, want in evidence.items():
        got = findings[0].evidence[key]
        assert want(got) if callable(want) else got == pytest.approx(want), f"{key}={got!r}"
    for finding in findings:
        assert finding.message and "\n" not in finding.message


NOISY = [(kind, n) for kind in SHAPES for n in (5, 8, 12, 20, 30)] + [("slow with decay", n) for n in (12, 20, 30)]


@pytest.mark.parametrize(("kind", "n"), NOISY, ids=[f"{k}-{n}pts" for k, n in NOISY])
def test_noisy_curves_keep_their_kind(kind: str, n: int) -> None:
    """2% noise on every training-loss point (1.2% on eval): the kind holds in >= 90% of 50 draws."""
    shape, expected = (slow_with_decay, "slow_convergence") if kind == "slow with decay" else (SHAPES[kind], kind)
    assert kinds(diagnose_curves(make_curves(shape, n))) == [expected]  # the clean curve, always
    hits = sum(kinds(diagnose_curves(make_curves(shape, n, noise=0.02, seed=seed))) == [expected]
               for seed in range(50))
    assert hits >= 45, f"{kind} with {n} points: {hits}/50"


@pytest.mark.parametrize("seed", range(5))
def test_noisy_overfit_still_names_the_best_step(seed: int) -> None:
    rng = random.Random(seed)
    noisy = {"train_loss": pairs([v * (1 + rng.gauss(0, 0.02)) for v in OVERFIT_TRAIN]),
             "eval_loss": pairs([v * (1 + rng.gauss(0, 0.01)) for v in OVERFIT_EVAL])}
    [finding] = diagnose_curves(noisy)
    assert finding.kind == "overfitting"
    assert finding.evidence["best_eval_step"] in (80, 100, 120)
    evals = dict((int(s), v) for s, v in noisy["eval_loss"])
    assert finding.evidence["best_eval_loss"] == evals[finding.evidence["best_eval_step"]]


def test_a_settled_eval_loss_that_wobbles_by_5_percent_is_not_overfitting() -> None:
    curves = {"train_loss": pairs([0.7, 0.4, 0.3, 0.27, 0.25, 0.24, 0.23, 0.22, 0.21, 0.2]),
              "eval_loss": pairs([0.7, 0.45, 0.36, 0.34, 0.33, 0.345, 0.335, 0.345, 0.34, 0.345])}
    assert kinds(diagnose_curves(curves)) == ["healthy"]


def test_the_objective_stands_in_for_eval_loss_upside_down_when_maximised() -> None:
    accuracy = pairs([0.55, 0.7, 0.8, 0.85, 0.84, 0.8, 0.76, 0.72])
    [finding] = diagnose_curves({"eval_accuracy": accuracy}, metric="eval_accuracy", direction="maximize")
    assert finding.kind == "overfitting"
    assert finding.evidence["best_eval_step"] == 80
    assert finding.evidence["best_eval_accuracy"] == 0.85 and finding.evidence["last_eval_accuracy"] == 0.72
    assert finding.evidence["train_loss_drop"] is None and "no training loss" in finding.message
    rising = pairs([0.5, 0.6, 0.7, 0.75, 0.78, 0.8])
    assert kinds(diagnose_curves({"eval_accuracy": rising}, metric="eval_accuracy", direction="maximize")) == \
        ["healthy"]


def test_stopping_before_max_steps_is_in_the_evidence() -> None:
    [finding] = diagnose_curves(make_curves(SHAPES["slow_convergence"], 4), max_steps=200)
    assert finding.evidence["stopped_early"] is True and finding.evidence["last_step"] == 80
    assert "stopped at step 80 of 200" in finding.message


# --- findings that read true ------------------------------------------------------------------

# Trials 0, 7 and 8 of the shipped demo (`hpo search search_spaces/lora.py`, seed 0, 2-core CPU).
DEMO = {
    0: {"train_loss": pairs([0.653, 0.3917, 0.1927, 0.0767, 0.0438, 0.029]),
        "eval_loss": pairs([0.5369, 0.3909, 0.3931, 0.3328, 0.402, 0.4161])},
    7: {"train_loss": pairs([0.5995, 0.3522, 0.1465, 0.0714, 0.0256, 0.0262]),
        "eval_loss": pairs([0.5398, 0.2985, 0.3241, 0.3468, 0.4128, 0.4174])},
    8: {"train_loss": pairs([0.6849, 0.5336, 0.2675, 0.1817, 0.1442, 0.134]),
        "eval_loss": pairs([0.6601, 0.4262, 0.3539, 0.3818, 0.419, 0.3366])},
}


def test_an_eval_loss_that_ended_above_its_best_is_not_called_healthy() -> None:
    """The demo's trial 0 was "healthy ... no sign of trouble, and still improving at the end"
    while its eval_loss ended 25% above its best point (6% above its smoothed low)."""
    [finding] = diagnose_curves(DEMO[0], max_steps=120)
    assert finding.kind == "early_overfitting"
    assert finding.evidence["best_eval_step"] == 80 and finding.evidence["best_eval_loss"] == 0.3328
    assert finding.evidence["eval_low"] == pytest.approx(0.3909)  # the running median of 3 at step 60
    assert EARLY_OVERFIT_RISE <= finding.evidence["eval_rise"] < OVERFIT_RISE
    assert finding.evidence["eval_rise_from_best"] == pytest.approx(0.2503, abs=1e-3)
    assert finding.message == ("eval_loss was best at step 80 (0.333; 0.391 smoothed) and ended 6% worse than that "
                               "smoothed best (25% worse than the point): 0.416 at step 120 while train_loss kept "
                               "falling 0.0767 -> 0.029: early signs of overfitting (overfitting from 8%)")
    assert "still improving" not in finding.message


def test_overfitting_gives_the_numbers_its_share_compares() -> None:
    [finding] = diagnose_curves(DEMO[7], max_steps=120)
    assert finding.kind == "overfitting"
    # 29% is measured from the smoothed low (0.324), 40% from the lowest point (0.2985): both named
    assert "best at step 40 (0.298; 0.324 smoothed) and ended 29% worse than that smoothed best (40% worse than the " \
           "point): 0.417 at step 120" in finding.message
    assert finding.evidence["eval_rise"] == pytest.approx(0.288, abs=1e-3)


def test_healthy_says_which_curve_is_still_improving() -> None:
    [finding] = diagnose_curves(DEMO[8], max_steps=120)
    assert finding.kind == "healthy"
    assert finding.evidence["still_improving"] == ["train_loss"]
    assert finding.message == ("train_loss fell 80% (0.685 -> 0.134); eval_loss was best at its last evaluation (step "
                               "120, 0.337): no sign of trouble; train_loss still improving at the end")


@pytest.mark.parametrize(("rise", "kind"), [(0.02, "healthy"), (0.06, "early_overfitting"), (0.12, "overfitting")])
def test_a_rise_off_the_low_is_named_by_the_thresholds(rise: float, kind: str) -> None:
    """eval_loss settles at 0.40 and ends ``rise`` above it while train_loss keeps falling."""
    evals = [0.70, 0.52, 0.43, 0.40, 0.40, 0.40, 0.40 * (1 + rise / 2), 0.40 * (1 + rise), 0.40 * (1 + rise)]
    train = [0.70, 0.50, 0.40, 0.34, 0.30, 0.27, 0.25, 0.23, 0.21]
    [finding] = diagnose_curves({"train_loss": pairs(train), "eval_loss": pairs(evals)})
    assert finding.kind == kind
    assert finding.evidence["eval_rise"] == pytest.approx(rise, abs=0.005)
    shown = f"eval_loss was best at step 80 (0.4) and ended {round(100 * rise)}% worse than that best: " \
            f"{0.4 * (1 + rise):.3g} at step 180"
    assert shown in finding.message
    if kind == "healthy":
        assert "under the 4% that counts as an upturn: no sign of trouble" in finding.message


def test_a_healthy_label_never_sits_on_an_upturn() -> None:
    """Over noisy draws of good and overfitting runs: a curve called healthy ended under
    EARLY_OVERFIT_RISE above its smoothed low, and the curves it calls still improving are
    exactly those whose last half kept falling (``still_improving``)."""
    healthy = 0
    for kind in ("healthy", "overfitting"):
        for seed in range(20):
            for n in (5, 8, 12):
                [finding] = diagnose_curves(make_curves(SHAPES[kind], n, noise=0.02, seed=seed))
                if finding.kind != "healthy":
                    continue
                healthy += 1
                assert finding.evidence.get("eval_rise", 0.0) < EARLY_OVERFIT_RISE
                improving = finding.message.partition("no sign of trouble")[2]
                assert [name for name in ("train_loss", "eval_loss") if name in improving] == \
                    finding.evidence["still_improving"]
    assert healthy >= 50


def test_every_threshold_is_written_once_with_why() -> None:
    """diagnose_thresholds holds the thresholds, each with a docstring; the rule and advice
    modules define no numeric constant of their own (they import these)."""
    import ast
    import inspect

    from hpo.analysis import diagnose_advice, diagnose_curve, diagnose_rules, diagnose_sft, diagnose_thresholds

    body = ast.parse(inspect.getsource(diagnose_thresholds)).body
    constants = [(node, body[i + 1] if i + 1 < len(body) else None) for i, node in enumerate(body)
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)]
    assert len(constants) >= 13
    for node, after in constants:
        name = node.targets[0].id
        assert isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
            and len(after.value.value.split()) >= 8, f"{name} has no docstring saying why"
    for module in (diagnose_rules, diagnose_advice, diagnose_curve, diagnose_sft):
        own = [n.targets[0].id for n in ast.parse(inspect.getsource(module)).body if isinstance(n, ast.Assign)
               and isinstance(n.value, ast.Constant) and isinstance(n.value.value, (int, float))]
        assert own == [], f"{module.__name__} defines thresholds of its own: {own}"
    assert diagnose_rules.OVERFIT_RISE is diagnose_thresholds.OVERFIT_RISE
    assert diagnose_advice.IMPORTANCE_MIN_TRIALS is diagnose_thresholds.IMPORTANCE_MIN_TRIALS


# --- a study ---------------------------------------------------------------------------------

DISTRIBUTIONS = {
    "learning_rate": FloatDistribution(1e-5, 5e-3, log=True),
    "weight_decay": FloatDistribution(0.0, 0.1),
    "batch_size": CategoricalDistribution([8, 16, 32]),
}


def new_study(direction: str = "maximize", metric: str = "eval_accuracy") -> optuna.Study:
    study = optuna.create_study(direction=direction)
    study.set_user_attr("hpo", {"sweep": {"metric": metric, "direction": direction, "max_steps": 200,
                                          "eval_every": EVERY}})
    return study


def add(study: optuna.Study, params: dict, *, curves: dict | None = None, value: float | None = None,
        state: TrialState = TrialState.COMPLETE, reason: str | None = None,
        intermediate: dict[int, float] | None = None, distributions: dict | None = None) -> None:
    attrs: dict = {"config": dict(params)}
    if curves is not None:
        attrs["curves"] = curves
    if reason:
        attrs["reason"] = reason
    distributions = distributions or {k: v for k, v in DISTRIBUTIONS.items() if k in params}
    study.add_trial(optuna.trial.create_trial(
        params={k: v for k, v in params.items() if k in distributions}, distributions=distributions,
        value=value if state == TrialState.COMPLETE else None, intermediate_values=intermediate or {},
        user_attrs=attrs, state=state))


def mixed_study() -> optuna.Study:
    """One trial of each behaviour, plus trials that are not (or cannot be) diagnosed."""
    study = new_study()
    p = {"weight_decay": 0.01, "batch_size": 16}
    add(study, {**p, "learning_rate": 1e-3}, curves={"train_loss": pairs(OVERFIT_TRAIN),
                                                     "eval_loss": pairs(OVERFIT_EVAL)}, value=0.84)  # 0
    add(study, {**p, "learning_rate": 1e-5}, curves=make_curves(SHAPES["underfitting"], 10), value=0.55)  # 1
    add(study, {**p, "learning_rate": 4e-3}, curves=make_curves(SHAPES["diverging"], 10), value=0.6)  # 2
    nan_curves = {"train_loss": [[20, 0.69], [40, 2.0], [60, math.nan]], "eval_loss": [[20, 0.7], [40, 2.1]]}
    add(study, {**p, "learning_rate": 5e-3}, curves=nan_curves, state=TrialState.FAIL, reason="nan",
        intermediate={20: 0.5, 40: 0.5})  # 3
    add(study, {**p, "learning_rate": 3e-5}, curves=make_curves(SHAPES["slow_convergence"], 6),
        state=TrialState.PRUNED, reason="pruned", intermediate={20: 0.5})  # 4: pruned at step 120 of 200
    add(study, {**p, "learning_rate": 5e-4}, curves=make_curves(SHAPES["healthy"], 10), value=0.9)  # 5
    add(study, {**p, "learning_rate": 2e-4}, curves=make_curves(SHAPES["healthy"], 2),
        state=TrialState.PRUNED, reason="pruned")  # 6: two evaluations only
    add(study, {**p, "learning_rate": 6e-4}, intermediate={20: 0.6, 40: 0.75, 60: 0.82, 80: 0.85, 100: 0.87},
        value=0.87)  # 7: no curves, the objective's intermediate values stand in
    add(study, {**p, "learning_rate": 1e-4}, state=TrialState.FAIL, reason="error")  # 8: not diagnosed
    add(study, {**p, "learning_rate": 1e-4}, state=TrialState.FAIL, reason="oom")  # 9: not diagnosed
    return study


def test_each_trial_gets_its_finding_and_its_state() -> None:
    diagnosis = diagnose_study(mixed_study())
    assert isinstance(diagnosis, StudyDiagnosis)
    found = {t.number: (t.state, t.kinds) for t in diagnosis.trials}
    assert found == {
        0: ("COMPLETE", ["overfitting"]), 1: ("COMPLETE", ["underfitting"]), 2: ("COMPLETE", ["diverging"]),
        3: ("FAIL", ["diverging"]), 4: ("PRUNED", ["slow_convergence"]), 5: ("COMPLETE", ["healthy"]),
        6: ("PRUNED", []), 7: ("COMPLETE", ["healthy"]),
    }
    trials = {t.number: t for t in diagnosis.trials}
    assert trials[0].findings[0].evidence["best_eval_step"] == 100
    assert trials[3].findings[0].evidence["step"] == 60
    assert trials[4].findings[0].evidence["stopped_early"] is True
    assert trials[6].note == "only 2 evaluations (last at step 40): at least 3 are needed to judge the curves"
    assert trials[7].findings[0].evidence["curve"] == "eval_accuracy"
    assert diagnosis.skipped == {"FAIL (error)": 1, "FAIL (oom)": 1}
    assert diagnosis.edges == []  # the best (5e-4, 6e-4) sit inside the range; batch_size and weight_decay are fixed
    assert diagnosis.counts()["diverging"] == 2


def test_a_nan_failure_is_diverging_even_without_nan_in_its_curves() -> None:
    study = new_study()
    add(study, {"learning_rate": 5e-3}, curves=make_curves(SHAPES["healthy"], 4), state=TrialState.FAIL, reason="nan")
    [trial] = diagnose_study(study).trials
    assert trial.kinds == ["diverging"] and trial.findings[0].evidence["reason"] == "nan"


def test_advice_is_concrete_and_most_shared_problem_first() -> None:
    study = mixed_study()
    p = {"weight_decay": 0.01, "batch_size": 16}
    for lr in (8e-4, 9e-4):  # two more overfitting trials: overfitting is now the most shared problem
        add(study, {**p, "learning_rate": lr}, curves={"train_loss": pairs(OVERFIT_TRAIN),
                                                       "eval_loss": pairs(OVERFIT_EVAL)}, value=0.8)
    advice = diagnose_study(study).advice
    assert advice[0] == "3 of 10 trials overfit after ~100 steps: raise weight_decay or stop earlier (--set patience=2)"
    assert advice[1].startswith("2 of 10 trials diverged (NaN/inf or a rising training loss) at learning_rate >= 4e-03")
    assert "lower the learning_rate upper bound (e.g. to 1e-03)" in advice[1]
    assert any(a.startswith("1 of 10 trials was still improving when they ended (1 of them stopped early by the "
                            "pruner), at learning_rate <= 3e-05") and "--set max_steps=400" in a for a in advice)
    assert any(a.startswith("1 of 10 trials stayed high and flat (underfitting)") for a in advice)
    assert any(a.startswith("1 of 10 trials has fewer than 3 evaluations") and "--set eval_every=10" in a
               for a in advice)


def test_importance_on_few_trials_is_shown_with_its_count_but_names_no_parameter() -> None:
    """The shipped demo said "the objective depends most on weight_decay (74%)" from 5 COMPLETE
    trials; fANOVA ranks the right parameter first in under half of such studies."""
    diagnosis = diagnose_study(mixed_study())  # 5 COMPLETE trials
    assert set(diagnosis.importance) == {"learning_rate", "weight_decay", "batch_size"}
    assert all(0.0 <= share <= 1.0 for share in diagnosis.importance.values())
    assert (diagnosis.importance_trials, diagnosis.importance_trusted) == (5, False)
    assert not any("depends most on" in a for a in diagnosis.advice)
    [finding] = [f for f in diagnosis.study_findings if f.kind == "importance"]
    assert finding.message == (f"parameter importance rests on 5 COMPLETE trials, fewer than the {IMPORTANCE_MIN_TRIALS} "
                               "it takes to rank parameters reliably: no parameter is singled out yet (run more "
                               "trials to learn which matter)")
    assert finding.trials == [0, 1, 2, 5, 7] and finding.evidence["trusted"] is False
    result = diagnosis.to_dict()
    assert (result["importance_trials"], result["importance_trusted"]) == (5, False)


def test_importance_on_enough_trials_names_the_parameters_and_its_count() -> None:
    diagnosis = diagnose_study(edge_study())  # 12 COMPLETE trials; the objective grows with the learning rate
    assert (diagnosis.importance_trials, diagnosis.importance_trusted) == (12, True)
    assert max(diagnosis.importance, key=diagnosis.importance.__getitem__) == "learning_rate"
    assert any(a.startswith("over 12 COMPLETE trials, the objective depends most on learning_rate") for a in
               diagnosis.advice)
    assert diagnose_study(edge_study()).importance == diagnosis.importance, "seeded: the same study, the same shares"


def test_the_report_computes_a_studys_importance_once_and_a_new_trial_computes_it_again(tmp_path: Path) -> None:
    """The study report shows importance three times (the diagnosis, the interactive plot, the
    PNG): fANOVA runs once for them, and gives what a fresh fANOVA gives; one more trial is a new
    study to it."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    from hpo.analysis.diagnose_advice import RememberedImportance
    from hpo.analysis.study_report import write_report

    study = edge_study()
    study.set_user_attr("probe", 1)  # not a trial: no effect on the key
    computed, remembered = RememberedImportance.computed, RememberedImportance.remembered
    write_report(study, tmp_path / "report")
    assert (RememberedImportance.computed - computed, RememberedImportance.remembered - remembered) == (1, 2)
    shown = json.loads((tmp_path / "report" / "diagnosis.json").read_text())["importance"]
    fresh = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    assert shown == pytest.approx(fresh) and list(shown) == list(fresh)
    assert (tmp_path / "report" / "param_importances.png").is_file()

    add(study, {"learning_rate": 1e-5, "weight_decay": 0.05, "batch_size": 8},
        curves=make_curves(SHAPES["healthy"], 5), value=0.9)
    again = diagnose_study(study).importance
    assert RememberedImportance.computed - computed == 2, "a new trial: computed again"
    assert again == pytest.approx(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0)))


def test_importance_needs_three_complete_trials_and_says_so() -> None:
    study = new_study()
    add(study, {"learning_rate": 1e-3}, curves=make_curves(SHAPES["healthy"], 5), value=0.8)
    add(study, {"learning_rate": 2e-3}, curves=make_curves(SHAPES["healthy"], 5), value=0.85)
    diagnosis = diagnose_study(study)
    assert diagnosis.importance == {}
    assert "parameter importance needs at least 3 COMPLETE trials; the study has 2" in diagnosis.advice
    assert diagnosis.advice[0] == "all 2 diagnosed trials look healthy: no divergence, overfitting, underfitting " \
                                  "or slow convergence"


def edge_study(direction: str = "maximize") -> optuna.Study:
    """12 trials whose objective grows with the learning rate, best at the top of the range;
    the best also use weight_decay 0 and batch size 32."""
    study = new_study(direction)
    rng = random.Random(3)
    for i in range(12):
        lr = 5e-3 if i % 4 == 0 else 10 ** rng.uniform(-5, -3)
        best = lr == 5e-3
        params = {"learning_rate": lr, "weight_decay": 0.0 if best else rng.uniform(0.02, 0.1),
                  "batch_size": 32 if best else rng.choice([8, 16])}
        score = 0.6 + 0.05 * math.log10(lr / 1e-5) + 0.001 * i
        add(study, params, curves=make_curves(SHAPES["healthy"], 5),
            value=score if direction == "maximize" else 1 - score)
    return study


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_best_values_at_a_bound_give_edge_advice(direction: str) -> None:
    diagnosis = diagnose_study(edge_study(direction))
    edges = {e["param"]: e for e in diagnosis.edges}
    assert edges["learning_rate"]["bound"] == "upper" and edges["learning_rate"]["value"] == 5e-3
    assert edges["learning_rate"]["suggestion"] == pytest.approx(1.5e-2)
    assert edges["learning_rate"]["best_trials"] == [8, 4, 0]  # the best quarter, best first
    best = "(the best 3 of 12 COMPLETE trials)"
    assert f"best learning_rate values {best} lie at the upper bound 5e-03: widen the range (e.g. up to 1.5e-02)" \
        in diagnosis.advice
    assert edges["weight_decay"]["bound"] == "lower" and edges["weight_decay"]["suggestion"] is None
    assert f"best weight_decay values {best} lie at the lower bound 0, which cannot be widened: consider fixing " \
           "weight_decay at 0" in diagnosis.advice
    assert edges["batch_size"]["suggestion"] == 64
    assert f"best batch_size values {best} all use the largest choice 32 of [8, 16, 32]: add larger choices " \
           "(e.g. 64)" in diagnosis.advice
    [finding] = [f for f in diagnosis.study_findings if f.kind == "range_edge" and f.evidence["param"] == "batch_size"]
    assert finding.trials == [8, 4, 0]


def record_priors(study: optuna.Study, **priors: Prior) -> None:
    """What `hpo search` records for a module that declares ``priors``."""
    study.set_user_attr("hpo", {**study.user_attrs["hpo"], "priors": {n: p.to_dict() for n, p in priors.items()}})


def test_edge_advice_keeps_to_the_module_priors() -> None:
    """The demo advised "add larger choices (e.g. 64)" for batch_size while its module's cited
    prior says nothing above 32; a suggestion past a prior's bound is cut back to it."""
    study = edge_study()
    record_priors(study, batch_size=Prior(high=32, why="LoRA pays more than full fine-tuning for large batches"),
                  learning_rate=Prior(high=1e-2, why="LoRA diverges above it here"))
    diagnosis = diagnose_study(study)
    edges = {e["param"]: e for e in diagnosis.edges}
    assert edges["batch_size"]["held_by_prior"] and edges["batch_size"]["suggestion"] is None
    assert "best batch_size values (the best 3 of 12 COMPLETE trials) all use the largest choice 32 of [8, 16, 32], " \
           "where the module's prior stops (nothing above 32: LoRA pays more than full fine-tuning for large " \
           "batches): keep the range" in diagnosis.advice
    assert not any("larger choices" in a for a in diagnosis.advice)
    assert edges["learning_rate"]["clipped_by_prior"] and edges["learning_rate"]["suggestion"] == 1e-2
    assert "best learning_rate values (the best 3 of 12 COMPLETE trials) lie at the upper bound 5e-03: widen the " \
           "range (e.g. up to 1e-02, the module's prior limit: LoRA diverges above it here)" in diagnosis.advice
    assert diagnosis.to_dict()["priors"]["batch_size"] == {"low": None, "high": 32, "why": "LoRA pays more than "
                                                           "full fine-tuning for large batches"}


def test_overfitting_advice_raises_no_regulariser_past_its_prior() -> None:
    study = new_study()
    regularisers = {"weight_decay": FloatDistribution(0.0, 0.1), "lora_dropout": FloatDistribution(0.0, 0.15)}
    for i, decay in enumerate((0.095, 0.098, 0.1)):
        add(study, {"weight_decay": decay, "lora_dropout": 0.02 * (i + 1)}, value=0.8, distributions=regularisers,
            curves={"train_loss": pairs(OVERFIT_TRAIN), "eval_loss": pairs(OVERFIT_EVAL)})
    record_priors(study, weight_decay=Prior(high=0.1, why="a light regulariser for LoRA"),
                  lora_dropout=Prior(high=0.15, why="a light regulariser for LoRA"))
    [overfit] = [f for f in diagnose_study(study).study_findings if f.kind == "overfitting"]
    assert overfit.message == ("3 of 3 trials overfit after ~100 steps: raise lora_dropout (within the module's "
                               "priors: lora_dropout up to 0.15) or stop earlier (--set patience=2); weight_decay "
                               "already near the module's prior limit (0.1): not raised")
    assert overfit.trials == [0, 1, 2] and overfit.evidence["at_prior_limit"] == ["weight_decay"]


def test_best_values_inside_the_range_give_no_edge() -> None:
    study = new_study()
    for i, lr in enumerate([1e-5, 3e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 5e-3]):
        near = abs(math.log10(lr) - math.log10(2.5e-4))
        add(study, {"learning_rate": lr, "batch_size": [8, 16, 32][i % 3]},
            curves=make_curves(SHAPES["healthy"], 5), value=0.9 - 0.1 * near)
    assert diagnose_study(study).edges == []


@pytest.mark.parametrize(("direction", "best"), [("maximize", "roberta-base"), ("minimize", "bert-base")])
def test_models_are_compared_in_the_study_direction(direction: str, best: str) -> None:
    study = new_study(direction, "eval_accuracy" if direction == "maximize" else "eval_loss")
    scores = {"bert-base": [0.70, 0.74, 0.72], "roberta-base": [0.78, 0.81, 0.76, 0.79]}
    for model, values in scores.items():
        for value in values:
            add(study, {"learning_rate": 1e-3, "model": model}, curves=make_curves(SHAPES["healthy"], 5),
                value=value, distributions={"learning_rate": DISTRIBUTIONS["learning_rate"],
                                            "model": CategoricalDistribution(list(scores))})
    models = diagnose_study(study).models
    assert list(models)[0] == best
    pick = max if direction == "maximize" else min
    assert models["roberta-base"] == {"count": 4, "complete": 4, "best": pick(scores["roberta-base"]),
                                      "median": pytest.approx(0.785), "best_trial": 4 if pick is max else 5}
    assert models["bert-base"]["median"] == pytest.approx(0.72)
    assert any(a.startswith("base models by best") and f"{best} starts closer" in a
               for a in diagnose_study(study).advice)


def test_a_model_in_the_config_only_is_compared_too() -> None:
    study = new_study()
    for model, value in (("a", 0.7), ("b", 0.8), ("a", 0.75)):
        attrs = {"config": {"learning_rate": 1e-3, "model": model}, "curves": make_curves(SHAPES["healthy"], 5)}
        study.add_trial(optuna.trial.create_trial(params={"learning_rate": 1e-3},
                                                  distributions={"learning_rate": DISTRIBUTIONS["learning_rate"]},
                                                  value=value, user_attrs=attrs))
    assert {name: m["count"] for name, m in diagnose_study(study).models.items()} == {"b": 1, "a": 2}


def test_to_dict_has_the_documented_shape_and_is_strict_json() -> None:
    result = diagnose_study(mixed_study()).to_dict()
    text = json.dumps(result, allow_nan=False)
    assert set(result) >= {"trials", "importance", "advice", "edges", "models"}
    entry = result["trials"][0]
    assert set(entry) >= {"number", "state", "findings"} and entry["state"] == "COMPLETE"
    assert set(entry["findings"][0]) == {"kind", "message", "evidence", "trials", "rows", "scope"}
    assert entry["findings"][0]["trials"] == [entry["number"]] and entry["findings"][0]["scope"] == "trial"
    assert [f["message"] for f in result["study_findings"]] == result["advice"]
    assert all(f["scope"] == "study" for f in result["study_findings"])
    nan_trial = next(t for t in result["trials"] if t["number"] == 3)
    assert nan_trial["findings"][0]["evidence"]["value"] == "nan"
    assert json.loads(text) == result


def test_an_empty_study_says_there_is_nothing_yet() -> None:
    diagnosis = diagnose_study(new_study())
    assert diagnosis.trials == [] and diagnosis.importance == {} and diagnosis.edges == []
    assert diagnosis.advice[0].startswith("no finished trials to diagnose yet")
    json.dumps(diagnosis.to_dict(), allow_nan=False)


# --- what hpo check-data recorded ---------------------------------------------------------------

def test_recorded_data_checks_become_findings_with_the_rows_behind_them(tmp_path: Path) -> None:
    """checks.json as hpo check-data writes it (its plain checks, --labels, --paraphrases) comes back
    as data findings, each with its rows, in the diagnosis and its JSON."""
    from hpo.analysis.checks_report import DataReport
    from hpo.analysis.checks_report import Finding as DataFinding
    from hpo.analysis.data_findings import with_data_checks, write_checks
    from hpo.analysis.label_issues import LabelIssues, Suspect
    from hpo.analysis.near_duplicates import Pair, Pairs

    report = DataReport([DataFinding("warning", "duplicate", "train.tsv", "1 of 40 rows repeat an earlier one", 1,
                                     [10])], {})
    labels = LabelIssues("quick", 80, 0.9, [Suspect("train.tsv", 4, "a fine, moving film", 0, 1, 0.91, 0.09)], 1.0)
    pairs = Pairs([Pair("paraphrase", "train-eval", 0.95, 7, 3, "the food was good", "good food it was")],
                  eval_rows=20, eval_source="eval.tsv", seconds=0.5, leaked=[3])
    write_checks(tmp_path / "planted", {**report.to_dict(), "labels": labels.to_dict(),
                                        "paraphrases": pairs.to_dict(), "files": []}, "train.tsv", "eval.tsv")
    sweep = {"train_data": "train.tsv", "eval_data": "eval.tsv"}
    plain = diagnose_study(mixed_study())
    diagnosis = with_data_checks(plain, tmp_path / "planted", sweep)
    found = {f.kind: f for f in diagnosis.data_findings}
    assert list(found) == ["duplicate", "label_issues", "near_duplicates", "eval_leakage"]
    assert found["duplicate"].rows == [{"row": 10, "source": "train.tsv"}]
    assert found["label_issues"].message == "1 rows may be mislabelled (quick probe over 80 rows, out-of-fold " \
                                            "accuracy 90.0%)"
    assert found["label_issues"].rows[0]["row"] == 4 and found["label_issues"].rows[0]["suggested_label"] == 1
    assert found["near_duplicates"].rows[0]["second_row"] == 3
    assert found["eval_leakage"].message == pairs.warning() and found["eval_leakage"].rows == [{"row": 3,
                                                                                                  "split": "eval"}]
    result = json.loads(json.dumps(diagnosis.to_dict(), allow_nan=False))
    assert result["data_checks"]["found"] and "note" not in result["data_checks"]
    assert [f["kind"] for f in result["data_findings"]] == list(found)
    assert result["data_findings"][1]["rows"][0]["text"] == "a fine, moving film"
    assert [f.scope for f in diagnosis.all_findings()][:len(result["study_findings"]) + 4] == \
        ["study"] * len(result["study_findings"]) + ["data"] * 4

    elsewhere = with_data_checks(plain, tmp_path / "planted", {"train_data": "other.tsv"})
    assert "these checks read train.tsv / eval.tsv, but the study trained on other.tsv / None: they may not describe " \
           "its data" == elsewhere.data_checks["note"]
    missing = with_data_checks(plain, tmp_path / "nowhere")
    assert missing.data_findings == [] and not missing.data_checks["found"]
    assert missing.data_checks["note"].startswith(f"no `hpo check-data` results for study {missing.study} (looked for "
                                                  f"{tmp_path / 'nowhere' / 'checks.json'})")
