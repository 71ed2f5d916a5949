"""Warm start: begin a sweep with the best configs of an earlier study.

``hpo search MODULE --warm-start STUDY[@STORAGE] [--warm-start-top N]`` enqueues the N
best COMPLETE trials of the earlier study (best by its own direction) into this study
before any trial starts, so the first trials re-check known-good points under the new
space and the sampler learns from them at once.

Only what fits this sweep's space is kept: a parameter this space does not suggest (on
the path the enqueued values lead to), or whose value lies outside this space's
distribution (range, step, choices), is dropped and sampled afresh, and each drop is
reported with its reason. A config with nothing left is skipped. The study remembers
that it was warm-started (a study system attr), so a resumed sweep never enqueues twice.
Each enqueued trial carries its origin (the ``warm_start`` user attr, written with the trial
in one storage call), and a config whose origin is already in the study is not enqueued
again: a driver killed between two enqueues, before the study attr was written, is
resumed by enqueueing only the rest.
Call :func:`warm_start` in the driver, under the study lock, before trials start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError
from hpo.record import optuna_access

DONE_ATTR = "hpo:warm_start"


@dataclass
class WarmStart:
    """What :func:`warm_start` did: the configs enqueued and the parameters left out."""

    source: str
    enqueued: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    """(earlier trial number, the params enqueued)."""
    skipped: list[str] = field(default_factory=list)
    """One line per dropped parameter or config: which, and why."""
    already: bool = False
    """True when this study was warm-started before (a resume): nothing enqueued."""

    def lines(self) -> list[str]:
        if self.already:
            return [f"warm start from {self.source}: done when this study began; nothing enqueued again"]
        head = (f"warm start from {self.source}: enqueued {len(self.enqueued)} config(s) "
                f"(earlier trials {', '.join(str(n) for n, _ in self.enqueued) or '-'})")
        return [head, *(f"  skipped {line}" for line in self.skipped)]


def parse_source(text: str, default_storage: str | None) -> tuple[str, str | None]:
    """``STUDY[@STORAGE]`` -> (study name, storage URL); the study's name ends at the first
    ``@`` (a storage URL may hold ``user:password@host``). No storage: this sweep's."""
    name, at, storage = text.partition("@")
    if not name or (at and not storage):
        raise HpoError(f"--warm-start {text!r}: expected STUDY or STUDY@STORAGE, e.g. lora@sqlite:///hpo.db")
    return name, storage if at else default_storage


def best_configs(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` best COMPLETE trials with a finite value, best first."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and math.isfinite(t.values[0])]
    # A multi-objective study's trials are ranked by its first objective.
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: t.values[0], reverse=maximize)[:top]


def compatible_params(params: dict[str, Any], space: Callable[[optuna.Trial], Any]) -> tuple[dict[str, Any], list[str]]:
    """The part of ``params`` that this ``space`` would accept, and why the rest was not.

    ``space`` runs once on a throwaway in-memory study whose sampler answers each
    ``suggest_*`` with the earlier value when this space's distribution contains it (and
    samples otherwise), so conditional spaces are judged on the path these values lead to.
    """
    sampler = _ProbeSampler(params)
    probe = optuna.create_study(sampler=sampler)
    space(probe.ask())
    reasons = []
    for name, value in params.items():
        if name in sampler.rejected:
            reasons.append(f"{name}={value!r}: outside this space's {_describe(sampler.rejected[name])}")
        elif name not in sampler.kept:
            reasons.append(f"{name}={value!r}: this space has no parameter {name!r}")
    return dict(sampler.kept), reasons


class _ProbeSampler(optuna.samplers.RandomSampler):
    """Answers with the earlier trial's value where it fits; notes what did not."""

    def __init__(self, wanted: dict[str, Any]):
        super().__init__(seed=0)
        self.wanted = wanted
        self.kept: dict[str, Any] = {}
        self.rejected: dict[str, BaseDistribution] = {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str,
                           distribution: BaseDistribution) -> Any:
        if name in self.wanted:
            if _contains(distribution, self.wanted[name]):
                self.kept[name] = self.wanted[name]
                return self.wanted[name]
            self.rejected[name] = distribution
        return super().sample_independent(study, trial, name, distribution)


def warm_start(study: optuna.Study, source_study: optuna.Study, source_label: str, top: int,
               space: Callable[[optuna.Trial], Any], room: int) -> WarmStart:
    """Enqueue up to ``min(top, room)`` compatible best configs of ``source_study`` into
    ``study``, once per study (see the module docstring). ``room``: trials still to run."""
    result = WarmStart(source=source_label)
    storage, study_id = optuna_access.storage_of(study), optuna_access.study_id(study)
    if storage.get_study_system_attrs(study_id).get(DONE_ATTR):
        result.already = True
        return result
    # configs a run killed part-way through enqueued already (their origin is in the study)
    present = {t.user_attrs.get("warm_start") for t in study.get_trials(deepcopy=False)}
    best = best_configs(source_study, top)
    if not best:
        result.skipped.append(f"everything: study {source_study.study_name!r} has no COMPLETE trial")
    for trial in best:
        if len(result.enqueued) >= room:
            result.skipped.append(f"trial {trial.number}: only {room} trial(s) to run in this sweep")
            continue
        kept, reasons = compatible_params(trial.params, space)
        result.skipped.extend(f"trial {trial.number} {reason}" for reason in reasons)
        if not kept:
            result.skipped.append(f"trial {trial.number}: no parameter fits this space")
            continue
        origin = f"{source_label} trial {trial.number}"
        if origin not in present:
            study.enqueue_trial(kept, user_attrs={"warm_start": origin}, skip_if_exists=False)
        result.enqueued.append((trial.number, kept))
    storage.set_study_system_attr(study_id, DONE_ATTR, {"source": source_label,
                                                        "trials": [n for n, _ in result.enqueued]})
    return result


def _contains(distribution: BaseDistribution, value: Any) -> bool:
    try:
        return optuna_access.contains(distribution, value)
    except (ValueError, TypeError):
        return False


def _describe(distribution: BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return f"choices {list(distribution.choices)!r}"
    low, high = getattr(distribution, "low", None), getattr(distribution, "high", None)
    step = getattr(distribution, "step", None)
    return f"range [{low}, {high}]" + (f" step {step}" if step else "")
