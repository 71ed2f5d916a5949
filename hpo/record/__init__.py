"""The sweep's records: the Optuna study and its MLflow mirror.

The Optuna side: the study, its storage and samplers (:mod:`hpo.record.study`,
:mod:`hpo.record.samplers`), the trial ledger (:mod:`hpo.record.ledger`) with its lock and
liveness, warm start, and :mod:`hpo.record.optuna_access`, the one module that reads Optuna's
private attributes. The MLflow side: the store and experiment (:mod:`hpo.record.tracking`), the
sweep's mirror (:mod:`hpo.record.sweep_tracker`) and its background :mod:`hpo.record.writer`.
Between them the driver's one writer (:mod:`hpo.record.recorder`), which turns trial events
into both.

Imports no Ray (tests/test_boundaries.py): Optuna owns the trial state, MLflow mirrors it,
Ray only executes.
"""
