"""The sweep's record on its Optuna study: how ``hpo search`` ran it, for the commands after.

``hpo search`` saves a :class:`SweepRecord` on the study (the study user attr ``"hpo"``,
plain JSON, so optuna-dashboard shows it and a study needs nothing else to be read);
``hpo promote``, ``report``, ``diagnose`` and ``best`` load it. Records written before
there was a ``version`` (the same keys, without it) load as version 0. Knows neither Ray
nor MLflow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import optuna

VERSION = 2
"""1: the layout of version 0 (module, sweep, tracking_uri, mlflow_experiment_id,
mlflow_parent_run_id, custom_train) with ``version`` added; 2: version 1 with ``priors``
(a record without them loads with none)."""


@dataclass
class SweepRecord:
    """What ``hpo search`` records on its study (see the module's docstring)."""

    KEY: ClassVar[str] = "hpo"
    """The study user attr that holds the record."""

    module: str | None = None
    """The search-space module's path."""
    sweep: dict[str, Any] = field(default_factory=dict)
    """The sweep's settings as it ran (``Sweep.to_dict()``, after ``--set``, without ``extra``)."""
    tracking_uri: str | None = None
    """The MLflow tracking URI, password hidden."""
    mlflow_experiment_id: str | None = None
    mlflow_parent_run_id: str | None = None
    """The sweep's parent MLflow run (its trials' runs are its children)."""
    custom_train: bool = False
    """The module trained with its own ``train(params, report)`` rather than the built-in recipe."""
    priors: dict[str, dict] = field(default_factory=dict)
    """The module's priors (:class:`hpo.priors.Prior` as dicts: low, high, why), by parameter;
    empty when it declared none (and in records written before there were priors)."""
    version: int = VERSION
    """The layout the record was written in; 0 for records written before this field."""

    @property
    def metric(self) -> str | None:
        """The sweep's metric (``"a,b"`` for a multi-objective sweep), or None if not recorded."""
        return self.sweep.get("metric")

    def save(self, study: optuna.Study) -> None:
        """Write the record to the study (replacing the one there)."""
        study.set_user_attr(self.KEY, dataclasses.asdict(self))

    @classmethod
    def load(cls, study: optuna.Study) -> SweepRecord | None:
        """The study's record, or None for a study ``hpo search`` never ran."""
        return cls.from_dict(study.user_attrs.get(cls.KEY))

    @classmethod
    def from_dict(cls, stored: Any) -> SweepRecord | None:
        """A record from its stored JSON (any version; keys this version does not know are
        ignored), or None when there is none."""
        if not stored or not isinstance(stored, dict):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in stored.items() if key in known}
        values["sweep"] = dict(values.get("sweep") or {})
        values["version"] = int(values.get("version", 0))
        return cls(**values)
