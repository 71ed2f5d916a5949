"""The sweep's record on its study (:class:`hpo.record.sweep_record.SweepRecord`): it round-trips,
and a record written before it had a version (the plain dict layout) still loads."""

from __future__ import annotations

import optuna

from hpo.record.study import best_summary
from hpo.record.sweep_record import VERSION, SweepRecord

# What `hpo search` wrote on a study before the record had a version.
OLD_LAYOUT = {
    "module": "/work/search_spaces/lora.py",
    "sweep": {"metric": "eval_accuracy", "direction": "maximize", "max_steps": 200, "objective": "best"},
    "tracking_uri": "sqlite:///mlflow.db",
    "mlflow_experiment_id": "3",
    "mlflow_parent_run_id": "abc123",
    "custom_train": False,
}


def test_a_record_round_trips_through_the_study() -> None:
    study = optuna.create_study()
    record = SweepRecord(module="m.py", sweep={"metric": "score", "max_steps": 4}, tracking_uri="sqlite:///x.db",
                         mlflow_experiment_id="1", mlflow_parent_run_id="r", custom_train=True)
    record.save(study)
    assert SweepRecord.load(study) == record
    assert study.user_attrs["hpo"] == {**OLD_LAYOUT, "module": "m.py", "sweep": {"metric": "score", "max_steps": 4},
                                       "tracking_uri": "sqlite:///x.db", "mlflow_experiment_id": "1",
                                       "mlflow_parent_run_id": "r", "custom_train": True, "priors": {},
                                       "version": VERSION}, \
        "the same JSON keys as before, plus version and priors"


def test_a_record_in_the_old_layout_loads() -> None:
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("hpo", OLD_LAYOUT)
    record = SweepRecord.load(study)
    assert record is not None and record.version == 0
    assert (record.module, record.sweep, record.tracking_uri) == (OLD_LAYOUT["module"], OLD_LAYOUT["sweep"],
                                                                   OLD_LAYOUT["tracking_uri"])
    assert (record.mlflow_experiment_id, record.mlflow_parent_run_id, record.custom_train) == ("3", "abc123", False)
    assert record.metric == "eval_accuracy"
    study.add_trial(optuna.trial.create_trial(value=0.9, params={}, distributions={}))
    assert best_summary(study)["metric"] == "eval_accuracy"


def test_a_partial_record_loads_with_defaults_and_a_study_hpo_never_ran_has_none() -> None:
    study = optuna.create_study()
    assert SweepRecord.load(study) is None
    study.set_user_attr("hpo", {})
    assert SweepRecord.load(study) is None, "an empty record is no record"
    study.set_user_attr("hpo", {"sweep": {"metric": "score"}, "later_key": 1})
    record = SweepRecord.load(study)
    assert record == SweepRecord(sweep={"metric": "score"}, version=0)
    assert SweepRecord.load(optuna.create_study()) is None
