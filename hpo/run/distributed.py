"""Trials that span several workers: one trial is one Ray Train (V2) data-parallel job.

With ``workers_per_trial > 1`` the Tune trial runs :func:`run_distributed_trial`, a light
driver that starts a ``TorchTrainer`` with that many workers, each reserving the sweep's
``worker_resources``. Ray Train initialises ``torch.distributed`` (gloo on CPUs, NCCL on
GPUs) and every rank runs the trial's one body (:func:`hpo.run.trial.run_body`, as a
one-worker trial does): the built-in recipe (or the module's ``train``). The recipe sees the
process group, wraps the adapter in DistributedDataParallel and trains on its shard of every
batch, so the ranks together train on exactly the batches one worker would; rank 0's first
result carries what it resolved (device, precision, target_modules, ...), as a one-worker
trial's does.

How a result travels: every rank calls ``ray.train.report`` at each evaluation (a barrier
in Ray Train); ``TuneReportCallback`` forwards rank 0's metrics into the Tune trial, and from
there on it is an ordinary trial result: ASHA, :class:`~hpo.run.scheduling.OptunaBridge`, the
study and MLflow treat it exactly as a one-worker trial's.

How it ends:

* pruned: ASHA stops the Tune trial and Tune ends the trial's actor (these trials do not
  reuse actors); the Train controller and its workers are owned by that actor, so Ray ends
  them with it -- every rank stops;
* a non-finite loss: the metrics are the same on every rank (the training loss is
  all-reduced, each rank evaluates the same weights), so all ranks report it and return;
* an exception on any rank fails the worker group; the driver reports the lowest rank's
  error (reason ``oom`` or ``error``), as a one-worker trial would.

Known limit: Ray Train frees a killed run's placement group through a helper that finds the
cluster by Ray's address autodetection, which fails on a host running several Ray clusters
("Found multiple active Ray instances"); there a pruned trial's reservation is only freed when
the sweep ends. One cluster per host (the normal case) is not affected.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from ray import train, tune

from hpo.run.cluster import held_resources
from hpo.run.trial import HELD_KEY, TrialSpec, failure, run_body


def run_distributed_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """Tune function trainable (the trial's driver): one Ray Train run, rank 0 reporting."""
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    sweep = spec.sweep
    per_worker = sweep.worker_resources
    context = tune.get_context()
    trainer = TorchTrainer(
        functools.partial(_rank_loop, spec=spec),
        train_loop_config={"params": config["params"]},
        torch_config=TorchConfig(backend="nccl" if per_worker["GPU"] else "gloo"),
        scaling_config=train.ScalingConfig(
            num_workers=sweep.workers_per_trial, use_gpu=per_worker["GPU"] > 0,
            resources_per_worker={k: v for k, v in per_worker.items() if v}),
        run_config=train.RunConfig(
            name=f"trial-{config.get('number', 0)}-{context.get_trial_id()}",
            storage_path=_storage_path(context),
            # ray.train binds RunConfig at import (Train v2's takes this UserCallback); mypy reads the v1 one
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            failure_config=train.FailureConfig(max_failures=0),
        ),
    )
    try:
        trainer.fit()
    except Exception as error:  # noqa: BLE001 - a rank's error fails the trial with its reason
        failures = getattr(error, "worker_failures", None) or {}
        tune.report(failure(_cause(failures[min(failures)]) if failures else error))


class ReleaseWorkerGroups(tune.Callback):
    """In the driver: when a multi-worker trial ends, free its workers' placement group.

    Ray Train removes it itself when a run ends normally, but a trial that Tune stops (pruned,
    or ASHA's stop at ``max_steps``) ends by losing its actor, and with it the Train controller;
    Ray Train's own cleaner for that case finds the cluster through the dashboard's state API,
    which a local Ray without dashboard (hpo's default) or a host with several clusters lacks.
    The ranks report their group's id (``hpo_held``); removing it twice is harmless.
    """

    def __init__(self) -> None:
        self.groups: dict[str, set[str]] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if HELD_KEY in result:
            self.groups.setdefault(trial.trial_id, set()).update(
                worker["placement_group"] for worker in json.loads(result[HELD_KEY]) if worker.get("placement_group"))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial.trial_id)

    def _release(self, trial_id: str) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup

        for group in self.groups.pop(trial_id, ()):
            try:
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))
            except Exception:  # noqa: BLE001 - already gone
                pass


def _storage_path(context: Any) -> str:
    """Train runs live beside the Tune experiment (``.hpo/ray_results/<experiment>/``)."""
    from pathlib import Path

    return str(Path(context.get_trial_dir()).parent)


def _cause(error: BaseException) -> BaseException:
    """The user's exception inside Ray's wrapper, when Ray kept it."""
    return getattr(error, "cause", None) or error


def _rank_loop(config: dict[str, Any], spec: TrialSpec) -> None:
    """On every rank: the trial's one body (:func:`hpo.run.trial.run_body`), its results going to
    ``ray.train.report`` (rank 0's reach Tune) with what every rank holds; an exception is raised,
    failing the worker group (see :func:`run_distributed_trial`)."""
    import torch.distributed as dist

    started = time.perf_counter()  # the trial's start on this rank: trial_setup_seconds counts from here
    held: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(held, held_resources())
    run_body(config["params"], spec, train.report, held, started=started, errors_as_results=False)
