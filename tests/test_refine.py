"""hpo refine through the real CLI on planted studies: the trials are written into a real
SQLite study one by one (no training, so seconds), with the curves and values that should
make refine narrow, widen, fix, raise max_steps, or raise regularisation; then the written
module is loaded as ``hpo search`` loads it, and once run by ``hpo search --warm-start``."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from hpo import space as spaces
from hpo.analysis.diagnose import diagnose_study
from hpo.analysis.diagnose_thresholds import IMPORTANCE_MIN_TRIALS
from hpo.analysis.refine import plan_refinement
from hpo.analysis.refine_module import refine_study
from hpo.analysis.refine_rules import FIX_BELOW
from hpo.errors import HpoError
from hpo.priors import Prior
from hpo.record.sweep_record import SweepRecord
from tests.conftest import SEARCH_SPACES, run_hpo

MODULE = '''"""A planted module: the loss falls as lr rises, is lowest at x = 0.3 and ignores noise."""

import math

import hpo

sweep = hpo.Sweep(metric="eval_loss", direction="minimize", train_data="data/train.tsv", trials=3, max_steps=60,
                  eval_every=20, pruner="none", sampler="random", seed=0, concurrency=2)


def space(trial):
    return {
        "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "x": trial.suggest_float("x", 0.0, 1.0),  # the user's own comment stays
        "noise": trial.suggest_float("noise", 0.0, 1.0),
        "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
        "batch_size": trial.suggest_categorical("batch_size", [8, 16, 32]),
        "target_modules": "all-linear",
    }


priors = {"weight_decay": hpo.Prior(low=0.0, high=0.15, why="a planted prior")}


def loss(params):
    return 1.0 - 0.3 * (math.log10(params["lr"]) + 4) + 2 * (params["x"] - 0.3) ** 2


def train(params, report, sweep):
    for step in range(sweep.eval_every, sweep.max_steps + 1, sweep.eval_every):
        report(step, {"eval_loss": loss(params) + 1.0 / step, "train_loss": loss(params)})
'''
DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "x": FloatDistribution(0.0, 1.0),
                 "noise": FloatDistribution(0.0, 1.0), "weight_decay": FloatDistribution(0.0, 0.1),
                 "batch_size": CategoricalDistribution([8, 16, 32])}


def loss(params: dict) -> float:
    return 1.0 - 0.3 * (math.log10(params["lr"]) + 4) + 2 * (params["x"] - 0.3) ** 2


def van_der_corput(index: int, base: int) -> float:
    """The index-th point of the van der Corput sequence in [0, 1) (base 3: 0, 1/3, 2/3, 1/9, 4/9, ...):
    every run of it from the start spreads evenly over [0, 1)."""
    value, scale = 0.0, 1.0
    while index:
        index, digit = divmod(index, base)
        scale /= base
        value += digit * scale
    return value


# The 4 best trials (a quarter of 16): lr at the top of its range, x near 0.3, weight_decay 0.03..0.05, batch size 32.
BEST = [{"lr": 1e-2, "x": 0.3, "weight_decay": 0.03, "batch_size": 32},
        {"lr": 9e-3, "x": 0.28, "weight_decay": 0.045, "batch_size": 32},
        {"lr": 8e-3, "x": 0.32, "weight_decay": 0.04, "batch_size": 32},
        {"lr": 7e-3, "x": 0.35, "weight_decay": 0.05, "batch_size": 32}]
# 12 more: lower learning rates, x spread out; batch size 8 on the 4 slowest learners.
REST = [{"lr": 10 ** (-4 + 1.4 * k / 11), "x": ((k * 5) % 12 + 0.5) / 12, "batch_size": 8 if k < 4 else 16}
        for k in range(12)]
# noise and the rest's weight_decay are truly irrelevant: along the trials ranked by loss they take
# van der Corput sequences, so a split on either parts the good and the bad trials alike, at 11 trials
# as at 16, and fANOVA gives each 1-4% (a random permutation of 16 got noise 12%: 16 draws do not
# make a parameter look irrelevant). The best trials' noise spans 60% of its range, their
# weight_decay 20% (they agree on it: refine keeps it searched whatever its importance).
for rank, params in enumerate(sorted(BEST + REST, key=loss)):
    params["noise"] = round(0.05 + 0.9 * van_der_corput(rank, 3), 4)
    if rank >= len(BEST):
        params["weight_decay"] = round(0.005 + 0.09 * van_der_corput(rank - len(BEST), 2), 4)


def curves(value: float, shape: str) -> dict:
    """Three evaluations (steps 20, 40, 60) ending at ``value``: still falling, or overfitting."""
    if shape == "improving":
        return {"eval_loss": [[20, value + 0.3], [40, value + 0.15], [60, value]],
                "train_loss": [[20, value + 0.25], [40, value + 0.1], [60, value - 0.05]]}
    return {"eval_loss": [[20, value + 0.3], [40, value - 0.1], [60, value]],
            "train_loss": [[20, value + 0.2], [40, value - 0.1], [60, value - 0.2]]}


def planted(tmp_path: Path, shape: str = "improving", state: TrialState = TrialState.COMPLETE,
            count: int = len(BEST) + len(REST)) -> str:
    """A study 'planted' as `hpo search spaces/planted.py --set seed=7` would leave it (the first
    ``count`` trials of BEST + REST); its storage URL."""
    folder = tmp_path / "spaces"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.tsv").write_text("text\tlabel\ngood\t1\nbad\t0\n")
    module = folder / "planted.py"
    module.write_text(MODULE)
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(study_name="planted", storage=storage, direction="minimize")
    loaded = spaces.load(module, ["seed=7"])
    SweepRecord(module=str(module), sweep={k: v for k, v in loaded.sweep.to_dict().items() if k != "extra"},
                custom_train=True, priors={name: prior.to_dict() for name, prior in loaded.priors.items()}).save(study)
    for params in (BEST + REST)[:count]:
        value = loss(params)
        study.add_trial(create_trial(
            state=state, value=value if state == TrialState.COMPLETE else None, params=params,
            distributions=DISTRIBUTIONS, intermediate_values={20: value + 0.3},
            user_attrs={"config": {**params, "target_modules": "all-linear"}, "curves": curves(value, shape)}))
    return storage


def comments(text: str) -> list[str]:
    """Each comment hpo refine wrote (``# refine: ...`` and its ``#   ...`` lines), as one line."""
    blocks: list[str] = []
    for line in text.splitlines():
        body = line.strip()
        if body.startswith("# refine: "):
            blocks.append(body.removeprefix("# refine: "))
        elif body.startswith("#   ") and blocks:
            blocks[-1] += " " + body[4:]
    return blocks


def sampled(path: Path) -> tuple[dict, dict]:
    """One trial of the module's space: what it returns, and the distributions it searched."""
    trial = optuna.create_study().ask()
    return spaces.load(path).space(trial), trial.distributions


def test_refine_widens_narrows_fixes_and_raises_max_steps_with_reasons(tmp_path: Path) -> None:
    storage = planted(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    result = run_hpo(["refine", "planted", "--storage", storage], cwd=work)
    assert result.returncode == 0, result.stderr
    assert f"next: hpo search planted_refined.py --storage '{storage}' --warm-start planted" in result.stdout
    path = work / "planted_refined.py"
    text = path.read_text()

    params, distributions = sampled(path)
    lr = distributions["lr"]
    assert lr.log and lr.high == pytest.approx(3e-2), "widened past the upper bound the best trials sat at (x3)"
    assert 1e-4 < lr.low <= 7e-3, "and narrowed below them"
    x = distributions["x"]
    assert 0.0 < x.low <= 0.28 and 0.35 <= x.high < 1.0, "narrowed around the best trials' 0.28..0.35"
    assert "noise" not in distributions and params["noise"] == 0.05, "fixed at the best trial's value"
    weight_decay = distributions["weight_decay"]
    assert (weight_decay.low, weight_decay.high) == (0.01, 0.07), "the best trials agree on it: narrowed, not fixed"
    assert distributions["batch_size"].choices == (16, 32), "8: tried 4 times, never in the better half"
    assert params["target_modules"] == "all-linear", "the module's constant stays"

    sweep = spaces.load(path).sweep
    assert sweep.max_steps == 120, "the best trials were still improving at step 60"
    assert (sweep.seed, sweep.trials, sweep.metric) == (7, 3, "eval_loss"), "the run's --set kept, trials the module's"
    assert sweep.train_data == str(tmp_path / "spaces" / "data" / "train.tsv"), "the same data, from the new folder"
    assert 'train_data="../spaces/data/train.tsv"' in text

    assert text.startswith('"""Refined from study \'planted\' by `hpo refine planted`')
    assert "A planted module: the loss falls as lr rises" in text, "the original docstring is kept"
    reasons = comments(text)
    assert "1e-04..1e-02 (log) -> 2.7e-03..3e-02 (log): the best trials (0, 1, 2, 3: 7e-03..1e-02) all sat at its " \
           "upper bound 1e-02: widened past it to 3e-02, the other side narrowed around them" in reasons
    assert "0..1 -> 0.08..0.55: narrowed around the best trials (0, 1, 2, 3: 0.28..0.35), with 20% of the old " \
           "width to spare on each side" in reasons
    assert "0..1 -> fixed at 0.05: its importance is 1% over 16 complete trials (below 5%) and the best trials " \
           "(0, 1, 2, 3) spread over 60% of its range: it barely moves eval_loss, so it is fixed at best trial 0's " \
           "0.05, one dimension less to search" in reasons
    assert "0..0.1 -> 0.01..0.07: narrowed around the best trials (0, 1, 2, 3: 0.03..0.05), with 20% of the old " \
           "width to spare on each side" in reasons
    diagnosis = diagnose_study(optuna.load_study(study_name="planted", storage=storage))
    assert diagnosis.importance_trusted and diagnosis.importance_trials == 16
    assert diagnosis.importance["weight_decay"] < FIX_BELOW, "as low as noise's: the best trials' agreement kept it"
    assert min(diagnosis.importance[name] for name in ("lr", "x")) > 0.3, "the two that matter"
    assert "[8, 16, 32] -> [16, 32]: dropped 8 (4 tries): none of those trials was in the better half of the 16 " \
           "finished ones" in reasons
    assert "the study ran with --set seed=7 (the module says 0)" in reasons
    assert "60 -> 120: 4 of the 4 best trials were still improving when they ended at step 60 (eval_loss still " \
           "falling: trials 0, 1, 2, 3): 2x the steps" in reasons
    assert "# the user's own comment stays" in text and "def train(params, report, sweep):" in text
    assert "no larger choice (e.g. 64) is added, the choices are the module's own" in " ".join(text.split())


def test_overfitting_raises_regularisation_and_turns_early_stopping_on(tmp_path: Path) -> None:
    storage = planted(tmp_path, shape="overfit")
    result = run_hpo(["refine", "planted", "--storage", storage, "--output", "next.py"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _, distributions = sampled(tmp_path / "next.py")
    assert (distributions["weight_decay"].low, distributions["weight_decay"].high) == (0.05, 0.15), \
        "from the most the best trials used to the module's prior (twice the old upper bound would be 0.2)"
    sweep = spaces.load(tmp_path / "next.py").sweep
    assert (sweep.patience, sweep.max_steps) == (2, 60)
    reasons = comments((tmp_path / "next.py").read_text())
    overfit = "4 of the 4 best trials overfit (their validation loss ended 28%-33% above its lowest: trials 0, 1, 2, 3)"
    assert f"0..0.1 -> 0.05..0.15: {overfit}: more regularisation, from the most the best trials used (0.05) to " \
           "0.15, the module's prior limit (only 0 to 0.15: a planted prior)" in reasons
    assert f"None -> 2: {overfit}: early stopping ends a trial after 2 evaluations without a lower eval_loss" in reasons


def test_the_shipped_lora_module_keeps_its_priors_and_loads_with_the_recipe(tmp_path: Path) -> None:
    """search_spaces/lora.py, its best trials at the top learning rate and the largest batch
    size: the learning rate is widened, no batch size above 32 is invented (its docstring's
    prior), and the module written passes the built-in recipe's parameter check."""
    module = SEARCH_SPACES / "lora.py"
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(study_name="lora", storage=storage, direction="maximize")
    loaded = spaces.load(module)
    SweepRecord(module=str(module), sweep={k: v for k, v in loaded.sweep.to_dict().items() if k != "extra"},
                priors={name: prior.to_dict() for name, prior in loaded.priors.items()}).save(study)
    distributions = {"learning_rate": FloatDistribution(1e-4, 5e-3, log=True), "batch_size": CategoricalDistribution([8, 16, 32]),
                     "weight_decay": FloatDistribution(0.0, 0.1), "lora_r": CategoricalDistribution([4, 8, 16]),
                     "lora_dropout": FloatDistribution(0.0, 0.15)}
    for k in range(8):
        rate = 5e-3 if k < 2 else 10 ** (-4 + 1.2 * k / 7)
        params = {"learning_rate": rate, "batch_size": 32 if k < 2 else [8, 16][k % 2], "weight_decay": 0.01 * k,
                  "lora_r": [4, 8, 16][k % 3], "lora_dropout": 0.015 * k}
        study.add_trial(create_trial(value=0.9 - 0.01 * k if k < 2 else 0.5 + 0.01 * k, params=params,
                                     distributions=distributions, user_attrs={"config": params}))
    result = run_hpo(["refine", "lora", "--storage", storage], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "lora_refined.py"
    _, searched = sampled(path)
    assert searched["learning_rate"].high == pytest.approx(1.5e-2)
    assert searched["batch_size"].choices == (8, 16, 32)
    assert "batch_size: kept [8, 16, 32]" in result.stdout
    assert "note: the best trials (0, 1) all used the largest batch_size, 32, where the module's prior (nothing " \
           "above 32: LoRA pays more than full fine-tuning for large batches (Schulman et al., LoRA Without Regret, " \
           "2025)) stops: no larger choice is added" in result.stdout
    text = path.read_text()
    assert "LoRA pays more than full fine-tuning for large batches" in text, "lora.py's priors stay in view"
    assert spaces.load(path).sweep.train_data == str(SEARCH_SPACES / "data" / "reviews" / "train.tsv")


def test_below_the_trusted_trial_count_nothing_is_fixed_for_its_importance_and_the_module_says_so(
        tmp_path: Path) -> None:
    """The planted study cut to one trial fewer than `hpo diagnose` trusts an importance from:
    noise's importance is under 5% and the best trials disagree on it, yet it stays searched, and
    the module written says why; one trial more and it is fixed."""
    few, enough = tmp_path / "few", tmp_path / "enough"
    study = optuna.load_study(study_name="planted", storage=planted(few, count=IMPORTANCE_MIN_TRIALS - 1))
    diagnosis = diagnose_study(study)
    assert not diagnosis.importance_trusted and diagnosis.importance["noise"] < FIX_BELOW
    written = refine_study(study, str(few / "next.py"))
    _, distributions = sampled(written.path)
    assert "noise" in distributions and not any(change.action == "fix" for change in written.plan.params)
    untrusted = (f"parameter importance rests on {IMPORTANCE_MIN_TRIALS - 1} COMPLETE trials, fewer than the "
                 f"{IMPORTANCE_MIN_TRIALS} `hpo diagnose` trusts it from: no parameter is fixed for a low importance "
                 "(below 5% now: noise 4%, weight_decay 4%); run more trials to learn which do not matter")
    assert untrusted in " ".join(written.path.read_text().split())

    study = optuna.load_study(study_name="planted", storage=planted(enough, count=IMPORTANCE_MIN_TRIALS))
    plan = plan_refinement(study, SweepRecord.load(study).sweep)
    fixed = [change for change in plan.params if change.action == "fix"]
    assert [change.name for change in fixed] == ["noise"]
    assert fixed[0].reason.startswith(f"its importance is 0% over {IMPORTANCE_MIN_TRIALS} complete trials (below 5%)")
    assert not any(note.startswith("parameter importance rests on") for note in plan.notes)


def test_raised_regularisation_stops_at_the_module_priors_and_the_parameters_outer_bound() -> None:
    """The best trials overfit: weight_decay and lora_dropout under search_spaces/lora.py's priors
    (at most 0.1 and 0.15, where its ranges already end) and a dropout with no prior (at most 0.5);
    a learning rate pressed against its upper bound is widened only as far as its prior."""
    priors = {**spaces.load(SEARCH_SPACES / "lora.py").priors,
              "learning_rate": Prior(high=1e-2, why="a planted limit")}
    study = optuna.create_study(direction="minimize")
    SweepRecord(module="lora.py", sweep={"metric": "eval_loss", "direction": "minimize", "max_steps": 60},
                priors={name: prior.to_dict() for name, prior in priors.items()}).save(study)
    distributions = {"weight_decay": FloatDistribution(0.0, 0.1), "lora_dropout": FloatDistribution(0.0, 0.15),
                     "dropout": FloatDistribution(0.0, 0.4), "learning_rate": FloatDistribution(1e-4, 5e-3, log=True)}
    for k in range(8):  # the best two overfit at weight_decay 0.08 and 0.06, lora_dropout 0.15, dropout 0.3-0.35
        params = {"weight_decay": 0.08 - 0.02 * k if k < 2 else 0.01 * k, "lora_dropout": 0.15 if k < 2 else 0.02 * k,
                  "dropout": 0.3 + 0.05 * k if k < 2 else 0.04 * k, "learning_rate": 5e-3 if k < 2 else 1e-4 * (k + 1)}
        value = 0.4 + 0.1 * k
        study.add_trial(create_trial(value=value, params=params, distributions=distributions,
                                     user_attrs={"curves": curves(value, "overfit")}))
    plan = plan_refinement(study, {"max_steps": 60})
    changes = {change.name: change for change in plan.params}
    overfit = "2 of the 2 best trials overfit (their validation loss ended 25%-33% above its lowest: trials 0, 1)"
    weight_decay = changes["weight_decay"]
    assert (weight_decay.action, weight_decay.after.low, weight_decay.after.high) == ("regularise", 0.08, 0.1)
    assert weight_decay.reason == (
        f"{overfit}: more regularisation, from the most the best trials used (0.08) to 0.1, the module's prior limit "
        f"(only 0 to 0.1: {priors['weight_decay'].why})")
    dropout = changes["dropout"]
    assert (dropout.action, dropout.after.low, dropout.after.high) == ("regularise", 0.35, 0.5)
    assert dropout.reason.endswith("to 0.5, the most a dropout is raised to (0.5: past it most of the signal is "
                                   "dropped)"), "0.8 (twice the old upper bound) without the outer bound"
    assert changes["lora_dropout"].action != "regularise" and changes["lora_dropout"].after.high == 0.15
    rate = changes["learning_rate"]
    assert (rate.action, rate.after.high) == ("widen", 1e-2), "x3 past the bound would be 1.5e-2"
    assert "widened past it to 1e-02, the module's prior (nothing above 0.01: a planted limit)" in rate.reason
    assert "lora_dropout not raised although the best trials overfit: its range already reaches the module's prior " \
           f"limit (only 0 to 0.15: {priors['lora_dropout'].why})" in plan.notes


def test_bad_input_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    storage = planted(tmp_path)
    unknown = run_hpo(["refine", "nope", "--storage", storage], cwd=tmp_path)
    assert unknown.returncode == 2 and "no study 'nope'" in unknown.stderr
    existing = tmp_path / "planted_refined.py"
    existing.write_text("keep me\n")
    refused = run_hpo(["refine", "planted", "--storage", storage], cwd=tmp_path)
    assert refused.returncode == 2
    assert f"--output {existing}: the file exists; choose another name or add --force to replace it" in refused.stderr
    assert existing.read_text() == "keep me\n"

    study = optuna.load_study(study_name="planted", storage=storage)
    refine_study(study, str(existing), force=True)
    assert existing.read_text().startswith('"""Refined from study')
    with pytest.raises(HpoError, match="a search-space module is a Python file; name one ending in .py"):
        refine_study(study, str(tmp_path / "next.txt"))
    with pytest.raises(HpoError, match="that is the module the study ran"):
        refine_study(study, str(tmp_path / "spaces" / "planted.py"), force=True)
    with pytest.raises(HpoError, match="which is not there now; give the module to refine with --module PATH"):
        refine_study(study, str(tmp_path / "other.py"), module=str(tmp_path / "gone.py"))

    (tmp_path / "pruned").mkdir()
    pruned = optuna.load_study(study_name="planted", storage=planted(tmp_path / "pruned", state=TrialState.PRUNED))
    with pytest.raises(HpoError, match="study 'planted' has no COMPLETE trial to learn from; run more trials first"):
        refine_study(pruned, str(tmp_path / "pruned" / "next.py"))
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["planted_refined.py"], "no half-written module left"
    assert not list((tmp_path / "pruned").glob("*.py"))


@pytest.mark.slow
def test_the_refined_module_runs_warm_started_from_the_study(tmp_path: Path) -> None:
    """`hpo search planted_refined.py --warm-start planted`: the best earlier configs run first,
    within the new ranges (the fixed parameters dropped from them, said so), for the new max_steps."""
    storage = planted(tmp_path)
    assert run_hpo(["refine", "planted", "--storage", storage], cwd=tmp_path).returncode == 0
    search = run_hpo(["search", "planted_refined.py", "--storage", storage, "--warm-start", "planted"], cwd=tmp_path)
    assert search.returncode == 0, search.stdout + search.stderr
    assert f"warm start from planted@{storage}: enqueued 3 config(s) (earlier trials 0, 1, 2)" in search.stdout
    assert "skipped trial 0 noise=0.05: this space has no parameter 'noise'" in search.stdout
    study = optuna.load_study(study_name="planted_refined", storage=storage)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert [t.user_attrs.get("warm_start") for t in trials] == [f"planted@{storage} trial {n}" for n in range(3)]
    for trial, earlier in zip(trials, BEST, strict=False):
        assert trial.params == {k: earlier[k] for k in ("lr", "x", "weight_decay", "batch_size")}
        assert trial.user_attrs["config"]["noise"] == 0.05
        assert max(trial.intermediate_values) == 120


def test_pruned_trials_are_evidence_ranked_below_the_complete_ones() -> None:
    """3 COMPLETE trials are too few to narrow on their own; with 6 PRUNED ones (ASHA's usual
    share) the 9 finished trials are enough, and a batch size only the pruned ones used goes."""
    study = optuna.create_study(direction="minimize")
    study.set_user_attr("hpo", {"sweep": {"metric": "eval_loss", "direction": "minimize", "max_steps": 60}})
    for params in BEST[:3]:
        study.add_trial(create_trial(value=loss(params), params=params, distributions=DISTRIBUTIONS,
                                     user_attrs={"curves": curves(loss(params), "overfit")}))
    for params in (REST[k] for k in (5, 6, 8, 0, 1, 2)):  # batch size 8 on the three worst
        study.add_trial(create_trial(state=TrialState.PRUNED, params=params, distributions=DISTRIBUTIONS,
                                     intermediate_values={20: loss(params) + 0.3}))
    changes = {change.name: change for change in plan_refinement(study, {"max_steps": 60}).params}
    assert changes["x"].action == "narrow" and changes["x"].after.low > 0.0
    assert changes["batch_size"].after.choices == (16, 32)
    assert "none of those trials was in the better half of the 9 finished ones" in changes["batch_size"].reason


def test_refining_a_refined_module_replaces_its_comments_instead_of_stacking_them(tmp_path: Path) -> None:
    storage = planted(tmp_path)
    study = optuna.load_study(study_name="planted", storage=storage)
    first = refine_study(study, str(tmp_path / "round2.py")).path
    second = refine_study(study, str(tmp_path / "round3.py"), module=str(first)).path
    text = second.read_text()
    before = [c for c in comments(first.read_text()) if not c.startswith("the study ran with --set seed")]
    assert sorted(comments(text)) == sorted(before), "each comment once: the rewritten lines' replaced, the rest kept"
    assert "# seed=7" not in text and "seed=7," in text, "round2.py says seed=7 itself: no --set to explain"
    assert "# the user's own comment stays" in text and spaces.load(second).sweep.max_steps == 120
    assert "The module it was written from, round2.py, said:" in " ".join(text.split()).replace(str(tmp_path) + "/", "")


def test_a_complete_trial_that_learned_nothing_is_not_among_the_best() -> None:
    """Seen on SST-2: ASHA lets the first trials through for want of rivals, so one that
    learned nothing in its whole budget is COMPLETE; it ended worse than the median finished
    trial, so the trust region is drawn around the one that learned, alone."""
    study = optuna.create_study(direction="minimize")
    study.set_user_attr("hpo", {"sweep": {"metric": "eval_loss", "direction": "minimize", "max_steps": 60}})
    for params in (BEST[0], REST[2]):  # losses 0.4 and 1.585 (x 0.3 and 0.875)
        study.add_trial(create_trial(value=loss(params), params=params, distributions=DISTRIBUTIONS))
    for params in (REST[k] for k in (5, 6, 8, 0, 1, 3)):
        study.add_trial(create_trial(state=TrialState.PRUNED, params=params, distributions=DISTRIBUTIONS,
                                     intermediate_values={20: loss(params) + 0.3}))
    x = next(change for change in plan_refinement(study, {"max_steps": 60}).params if change.name == "x")
    assert (x.action, x.after.low, x.after.high) == ("narrow", 0.1, 0.5)
    assert x.reason.startswith("narrowed around the best trials (0: 0.3)")
