"""Trials that span two workers: Ray Train (gloo, CPU) inside the Tune trial, running the
built-in recipe on a tiny BERT with DistributedDataParallel. One trial completes, one is
pruned, and the completed trial's curve is a one-worker run's."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo import HpoError, Sweep
from hpo.train import training
from tests.conftest import SEARCH_SPACES, run_hpo

REVIEWS = SEARCH_SPACES / "data" / "reviews"
# No dropout anywhere (tiny_bert has none; lora_dropout=0): the ranks' shards then compute
# exactly what one worker computes on the whole batch, up to float rounding.
LEARNING_RATES = [1e-2, 1e-7]  # trial 0 learns; trial 1 barely moves and is pruned at the first rung

MODULE = '''
import hpo

sweep = hpo.Sweep(model="{model}", train_data="{train}", eval_data="{eval}", max_length=32, metric="eval_loss",
                  trials=2, max_steps=12, eval_every=4, reduction_factor=2, seed=3, concurrency=1,
                  workers_per_trial=2, cpus_per_worker=0.5)
RATES = {rates}


def space(trial):
    trial.suggest_float("x", 0.0, 1.0)  # unused: the learning rate is fixed per trial
    return {{"learning_rate": RATES[trial.number], "batch_size": 8, "lora_dropout": 0.0}}
'''


def test_resources_per_worker_and_per_trial_agree() -> None:
    assert Sweep(workers_per_trial=2, gpus_per_trial=2).worker_resources == {"CPU": 0.5, "GPU": 1.0}
    with pytest.raises(HpoError, match=r"gpus_per_trial=1 gives each of the workers_per_trial=2 workers 0.5 GPU"):
        Sweep(workers_per_trial=2, gpus_per_trial=1)  # two ranks on one GPU: NCCL refuses
    assert Sweep(workers_per_trial=4, gpus_per_worker=1, cpus_per_worker=2).trial_resources == {"CPU": 8, "GPU": 4}
    assert Sweep(gpus_per_trial=0.5).trial_resources == {"CPU": 1.0, "GPU": 0.5}
    for fields, field in [({"workers_per_trial": 0}, "workers_per_trial"),
                          ({"workers_per_trial": 2, "gpus_per_worker": 1, "gpus_per_trial": 3}, "gpus_per_trial"),
                          ({"workers_per_trial": 2, "gpus_per_trial": 3}, "gpus_per_trial"),
                          ({"gpus_per_worker": 1.5}, "gpus_per_worker"), ({"cpus_per_worker": 0}, "cpus_per_worker")]:
        with pytest.raises(HpoError, match=f"sweep field {field}=.*--set {field}="):
            Sweep(**fields)


def test_each_rank_takes_its_shard_of_the_batch() -> None:
    import torch

    batch = {"input_ids": torch.arange(18).view(9, 2), "labels": torch.arange(9)}
    shards = [training._shard(batch, rank, 2)["labels"].tolist() for rank in (0, 1)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7, 8]], "together exactly the batch, in order"
    assert training._shard(batch, 0, 1) is batch
    with pytest.raises(ValueError, match="batch_size=9 is smaller than the 16 workers"):
        training._shard(batch, 0, 16)


# What differs between a two-worker and a one-worker trial by what they measure, not by what they
# record: timings, memory, the ranks held, the curves (compared apart, within float rounding).
MEASURED = {"resources", "curves", "trial_setup_seconds", "tokens_per_second", "mfu", "peak_memory_mb",
            "peak_reserved_memory_mb", "resident_memory_mb"}


@pytest.mark.slow
def test_two_worker_trials_complete_prune_and_record_like_one_worker_trials(tmp_path: Path, tiny_bert: Path) -> None:
    """Two trials on two workers each: one completes, one is pruned at the first rung. Then the
    first config on one worker (``--set workers_per_trial=1``, a study of its own): its curve is
    the two-worker curve, and the study and the MLflow run hold exactly what they hold for the
    two-worker trial (one trial body, hpo.run.trial, for both: the ranks' first result carries
    what the worker resolved -- device, precision, target_modules, trainable_params -- and
    trial_setup_seconds)."""
    module = tmp_path / "ddp.py"
    module.write_text(MODULE.format(model=tiny_bert, train=REVIEWS / "train.tsv", eval=REVIEWS / "eval.tsv",
                                    rates=LEARNING_RATES))
    for extra in ([], ["--set", "workers_per_trial=1", "--set", "trials=1", "--study", "one"]):
        result = run_hpo(["search", str(module), *extra], cwd=tmp_path, timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr

    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    complete, pruned = optuna.load_study(study_name="ddp", storage=storage).trials
    [one] = optuna.load_study(study_name="one", storage=storage).trials
    assert complete.state == TrialState.COMPLETE and sorted(complete.intermediate_values) == [4, 8, 12]
    assert pruned.state == TrialState.PRUNED and sorted(pruned.intermediate_values) == [4]
    assert pruned.user_attrs["reason"] == "pruned"
    for trial in (complete, pruned):
        ranks = trial.user_attrs["resources"]["workers"]
        assert len(ranks) == 2 and all(rank["assigned"] == {"CPU": 0.5} for rank in ranks), ranks
        assert len({rank["pid"] for rank in ranks}) == 2, "two worker processes"

    # The same config on one worker, with the same effective batch (8).
    assert one.state == TrialState.COMPLETE and len(one.user_attrs["resources"]["workers"]) == 1
    assert one.params == complete.params, "the same seed samples the same config"
    # Float32 sums in another order (each rank's half batch, then the all-reduce) are the only
    # difference; after 12 AdamW steps that moves the losses by ~1e-6 relative, 1e-4 is ample
    # and still far below what a wrong shard or a wrong effective batch changes (~1e-2). Each
    # step's batch loss and gradient norm (the ranks' averaged gradients) agree the same way.
    for name in ("train_loss", "eval_loss", "train_loss_max", "grad_norm", "grad_norm_max"):
        two_curve, one_curve = complete.user_attrs["curves"][name], one.user_attrs["curves"][name]
        assert [step for step, _ in two_curve] == [step for step, _ in one_curve] == [4, 8, 12]
        for (step, value), (_, alone) in zip(two_curve, one_curve, strict=True):
            assert value == pytest.approx(alone, rel=1e-4), (name, step)
    assert complete.value == pytest.approx(one.value, rel=1e-4)
    assert set(complete.user_attrs) == set(one.user_attrs), set(complete.user_attrs) ^ set(one.user_attrs)
    for key in ("device", "precision", "target_modules", "trainable_params", "trial_setup_seconds"):
        assert key in complete.user_attrs, key
    assert {k: v for k, v in complete.user_attrs.items() if k not in MEASURED} == \
        {k: v for k, v in one.user_attrs.items() if k not in MEASURED}

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    states = {int(r.data.tags["hpo.trial_number"]): r.info.status for r in runs if r.data.tags["hpo.role"] == "trial"}
    assert states == {0: "FINISHED", 1: "KILLED"}
    params = {}
    for study in ("ddp", "one"):
        [run] = [r for r in client.search_runs([client.get_experiment_by_name(study).experiment_id])
                 if r.data.tags["hpo.role"] == "trial" and r.data.tags["hpo.trial_number"] == "0"]
        assert run.info.status == "FINISHED"
        params[study] = run.data.params
    assert params["ddp"] == params["one"], set(params["ddp"].items()) ^ set(params["one"].items())
    assert {"device", "precision", "target_modules", "trainable_params"} <= set(params["ddp"])
