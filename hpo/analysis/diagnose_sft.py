"""What a trial's answers and training steps show: the chat-model (task sft) findings, and
loss spikes and gradient blow-ups (any task of the built-in recipe).

Read from the trial's ``curves`` (recorded at each evaluation: :mod:`hpo.train.answers`,
:func:`hpo.train.training._step_stats`), beside the curve rules of
:mod:`hpo.analysis.diagnose_rules`; a trial may have several of these findings. The answer
rules judge the last evaluation (the model the trial ended with), and give the first one
for the trend:

* ``never_stops``: >= 25% (``UNFINISHED_SHARE``) of the answers whose reference fits in
  ``max_new_tokens`` ran to that limit without the end-of-turn token. A model that learned its
  answers' end stops on nearly all of them; a quarter (8 of 32) is far beyond a one-off.
* ``repeats``: the answers' mean seq-rep-4 (the share of an answer's token 4-grams that repeat
  an earlier one) is >= 0.2 (``REPETITION_LEVEL``). Text people write scores about 0.01, greedy
  decoding of a language model stuck in loops about 0.4 (Welleck et al. 2019, "Neural Text
  Generation with Unlikelihood Training"); a short answer does not repeat at all.
* ``wrong_format``: >= 25% (``FORMAT_FAIL_SHARE``) of the answers fail the sweep's
  ``answer_format`` (the same bar as ``never_stops``).
* ``failing_score``: >= 50% (``SCORE_FAIL_SHARE``) of the answers score 0 or less by the
  module's ``score``: most answers earn nothing.
* ``forgetting`` (with ``retain_data``): ``retain_score`` ends >= 0.1 (``FORGET_DROP``) below the
  base model's: 4 of 32 general answers lost (one or two may flip on a small change). The retain
  loss is evidence, not a bar: fine-tuning moves it some way whether answers change or not.
* ``loss_spikes``: a step's loss (``train_loss_max``, the largest since the last evaluation) is
  >= 3x (``LOSS_SPIKE``) both the mean step loss of the evaluation interval before it and the
  first interval's (where the run started): the step threw away more than all the training had
  gained. The first interval itself is not judged.
* ``gradient_blowup``: a step's gradient norm before clipping (``grad_norm_max``) is >= 20x
  (``GRAD_SPIKE``) the median step's (``grad_norm``) of the intervals before it and larger than
  any step's before; or the median step's ends >= 10x (``GRAD_RISE``) its lowest, rising on the
  whole from there (Kendall's tau >= 0.3): a sign of divergence that often shows before the loss
  does.

Small batches make single steps heavy-tailed, hence bars this high. Measured on MiniLM and the
shipped reviews (120 steps, evaluations every 10) in six runs that learned or stalled normally
(learning rate 5e-4 to 5e-3, batch 8 to 32): the largest step loss reached 1.1-5.6x the
interval before's mean but only 1.07-1.95x the start; the largest gradient norm 2.6-12.7x the
median step's so far. A learning rate of 3e-2 that learned nothing (eval_loss 0.71 -> 0.69)
reached 29x; an injected 100x step is found (tests/test_diagnose_sft.py). The thresholds live
with the others in :mod:`hpo.analysis.diagnose_thresholds`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import TYPE_CHECKING, Any

from hpo.analysis.diagnose_advice import learning_rate_name
from hpo.analysis.diagnose_curve import kendall_tau, rounded, to_points
from hpo.analysis.diagnose_rules import Finding
from hpo.analysis.diagnose_thresholds import (
    FORGET_DROP,
    FORMAT_FAIL_SHARE,
    GRAD_RISE,
    GRAD_RISE_TAU,
    GRAD_SPIKE,
    LOSS_SPIKE,
    REPETITION_LEVEL,
    SCORE_FAIL_SHARE,
    UNFINISHED_SHARE,
)
from hpo.formatting import num, percent, sci

if TYPE_CHECKING:
    from hpo.analysis.diagnose import TrialDiagnosis

KINDS = ("never_stops", "repeats", "wrong_format", "failing_score", "forgetting", "loss_spikes", "gradient_blowup")
ADVICE = {
    "never_stops": "answers that ran to max_new_tokens without ending (never_stops): train longer, and check that "
                   "the chat template ends the assistant turn with the tokenizer's eos token",
    "repeats": "answers stuck in loops (repeats): an undertrained model, or a learning rate too high",
    "wrong_format": "answers that break answer_format (wrong_format): train longer or on more examples in that format",
    "failing_score": "answers that mostly score 0 by the module's score (failing_score): the other answer findings "
                     "say why where they can",
    "forgetting": "lost answers on the retain set (forgetting): a lower learning rate, fewer steps or a smaller "
                  "lora_r forget less, and so does mixing general examples into train_data",
    "loss_spikes": "steps whose loss spiked (loss_spikes): a lower learning rate, more warmup or max_grad_norm",
    "gradient_blowup": "steps whose gradient norm blew up (gradient_blowup): a lower learning rate",
}
"""The study-wide line for each kind (:func:`step_advice`)."""
RATE_KINDS = ("repeats", "forgetting", "loss_spikes", "gradient_blowup")
"""The kinds whose advice names the learning rates the trials ran at: it is the lever."""


def with_step_findings(findings: list[Finding], curves: dict[str, Any]) -> list[Finding]:
    """The curve rules' ``findings`` and this module's, from the same ``curves``. A ``healthy``
    finding gives way when there is one of these: its message says there is no sign of trouble.
    A gradient blow-up beside a loss that hardly fell says which way the learning rate is wrong."""
    found = step_findings(curves)
    if {"underfitting", "slow_convergence"} & {f.kind for f in findings}:
        found = [dataclasses.replace(f, message=f.message + _TOO_HIGH) if f.kind == "gradient_blowup" else f
                 for f in found]
    return [f for f in findings if not (found and f.kind == "healthy")] + found


def step_findings(curves: dict[str, Any]) -> list[Finding]:
    """This module's findings for one trial's ``curves`` (name -> ``[[step, value], ...]``)."""
    points = {name: [(s, v) for s, v in to_points(raw) if math.isfinite(v)] for name, raw in curves.items()}
    rules = (never_stops, repeats, wrong_format, failing_score, forgetting, loss_spikes, gradient_blowup)
    return [finding for rule in rules if (finding := rule(points))]


def step_advice(trials: list[TrialDiagnosis]) -> list[Finding]:
    """One study-wide finding per kind of this module's findings, the kind most trials share
    first: how many trials, what to do, and (where the learning rate is the lever) the rates
    they ran at; with the trials behind it."""
    rate = learning_rate_name(trials)
    found = []
    for kind in KINDS:
        group = [t for t in trials if kind in t.kinds]
        if not group:
            continue
        rates = sorted({t.params[rate] for t in group if rate in t.params}) if rate else []
        shown = f" ({rate} {', '.join(sci(r) for r in rates)})" if rates and kind in RATE_KINDS else ""
        found.append(Finding(kind, f"{len(group)} of {len(trials)} trials had {ADVICE[kind]}{shown}",
                             trials=[t.number for t in group], scope="study"))
    return sorted(found, key=lambda finding: -len(finding.trials))


# --- the answers ---------------------------------------------------------------------------

def _last_share(points: dict, name: str, bar: float) -> dict[str, Any] | None:
    """Evidence when the last value of curve ``name`` is at least ``bar``, else None."""
    curve = points.get(name)
    if not curve or curve[-1][1] < bar:
        return None
    (first_step, first), (step, last) = curve[0], curve[-1]
    return {"curve": name, "step": step, name: last, "first_step": first_step, f"first_{name}": first}


def _trend(evidence: dict[str, Any]) -> str:
    name = evidence["curve"]
    if evidence["first_step"] == evidence["step"]:
        return f"at step {evidence['step']}"
    return f"at step {evidence['step']} ({percent(evidence[f'first_{name}'])} at step {evidence['first_step']})"


def never_stops(points: dict) -> Finding | None:
    evidence = _last_share(points, "eval_unfinished", UNFINISHED_SHARE)
    if evidence is None:
        return None
    return Finding("never_stops", f"{percent(evidence['eval_unfinished'])} of the answers ran to max_new_tokens "
                                  f"without the end-of-turn token {_trend(evidence)}: the model has not learned to "
                                  "end its answers; train longer, and check that the chat template ends the "
                                  "assistant turn with the tokenizer's eos token", evidence)


def repeats(points: dict) -> Finding | None:
    evidence = _last_share(points, "eval_repetition", REPETITION_LEVEL)
    if evidence is None:
        return None
    return Finding("repeats", f"the answers repeat themselves: {percent(evidence['eval_repetition'])} of their "
                              f"4-grams repeat an earlier one {_trend(evidence)} (text people write: about 1%): "
                              "generation loops; an undertrained model or an over-high learning rate", evidence)


def wrong_format(points: dict) -> Finding | None:
    evidence = _last_share(points, "eval_format_fail", FORMAT_FAIL_SHARE)
    if evidence is None:
        return None
    return Finding("wrong_format", f"{percent(evidence['eval_format_fail'])} of the answers do not match the "
                                   f"sweep's answer_format {_trend(evidence)}", evidence)


def failing_score(points: dict) -> Finding | None:
    evidence = _last_share(points, "eval_score_fail", SCORE_FAIL_SHARE)
    if evidence is None:
        return None
    score = dict(points.get("eval_score", [])).get(evidence["step"])
    shown = f" (eval_score {num(score)})" if score is not None else ""
    evidence["eval_score"] = score
    return Finding("failing_score", f"{percent(evidence['eval_score_fail'])} of the answers scored 0 or less by the "
                                    f"module's score {_trend(evidence)}{shown}", evidence)


def forgetting(points: dict) -> Finding | None:
    """The retain set's score at the last evaluation against the base model's (with the losses)."""
    names = ("retain_score", "retain_score_before", "retain_loss", "retain_loss_before")
    if not all(points.get(name) for name in names):
        return None
    step = points["retain_score"][-1][0]
    score, before, loss, loss_before = (points[name][-1][1] for name in names)
    if before - score < FORGET_DROP:
        return None
    evidence = {"step": step, "retain_score_before": before, "retain_score": score,
                "score_drop": rounded(before - score), "retain_loss_before": loss_before, "retain_loss": loss}
    return Finding("forgetting", f"on the retain set, the share of answers right fell {num(before)} -> {num(score)} "
                                 f"(the answers' loss {num(loss_before)} -> {num(loss)}) between the base model and "
                                 f"step {step}: the model is forgetting what it knew; a lower learning rate, fewer "
                                 "steps or a smaller lora_r forget less, and so does mixing general examples into "
                                 "train_data", evidence)


# --- the steps -----------------------------------------------------------------------------

def loss_spikes(points: dict) -> Finding | None:
    """Intervals whose largest step loss is far above the interval before's mean step loss and
    the first interval's. Evidence: the worst one, and the ends of them all."""
    mean, peak = points.get("train_loss", []), dict(points.get("train_loss_max", []))
    spikes = [{"step": step, "after_step": before_step, "train_loss_max": peak[step], "train_loss_before": before,
               "ratio": rounded(peak[step] / before), "start_train_loss": mean[0][1]}
              for (before_step, before), (step, _) in zip(mean, mean[1:], strict=False)
              if step in peak and before > 0 and peak[step] >= LOSS_SPIKE * max(before, mean[0][1])]
    if not spikes:
        return None
    worst = max(spikes, key=lambda s: s["ratio"])
    more = f" ({len(spikes)} intervals in all)" if len(spikes) > 1 else ""
    return Finding("loss_spikes", f"the training loss spiked to {num(worst['train_loss_max'])} between steps "
                                  f"{worst['after_step']} and {worst['step']}, {num(worst['ratio'])}x the "
                                  f"{num(worst['train_loss_before'])} mean step loss before (it started at "
                                  f"{num(worst['start_train_loss'])}){more}: unstable steps; a lower "
                                  "learning rate, more warmup or gradient clipping (max_grad_norm) calm them",
                   {**worst, "spike_steps": [s["step"] for s in spikes]})


def gradient_blowup(points: dict) -> Finding | None:
    """A step's gradient norm far above the median step's so far (and every step's before), or
    the median step's climbing."""
    median, peak = points.get("grad_norm", []), dict(points.get("grad_norm_max", []))
    for index in range(1, len(median)):
        step = median[index][0]
        typical = statistics.median(value for _, value in median[:index])
        record = all(peak.get(earlier, 0.0) < peak.get(step, 0.0) for earlier, _ in median[:index])
        if step in peak and typical > 0 and peak[step] >= GRAD_SPIKE * typical and record:
            evidence = {"step": step, "after_step": median[index - 1][0], "grad_norm_max": peak[step],
                        "grad_norm_before": typical, "ratio": rounded(peak[step] / typical)}
            return Finding("gradient_blowup", f"a step's gradient norm reached {num(peak[step])} between steps "
                                              f"{evidence['after_step']} and {step}, {num(evidence['ratio'])}x the "
                                              f"median step's {num(typical)} until then: {_UNSTABLE}", evidence)
    values = [value for _, value in median]
    if len(values) < 3:
        return None
    low = min(range(len(values)), key=values.__getitem__)
    if values[low] <= 0 or values[-1] < GRAD_RISE * values[low] or kendall_tau(values[low:]) < GRAD_RISE_TAU:
        return None
    evidence = {"step": median[low][0], "last_step": median[-1][0], "lowest_grad_norm": values[low],
                "last_grad_norm": values[-1], "ratio": rounded(values[-1] / values[low])}
    return Finding("gradient_blowup", f"the median step's gradient norm climbed {num(values[low])} -> "
                                      f"{num(values[-1])} between steps {median[low][0]} and {median[-1][0]}: "
                                      f"{_UNSTABLE}", evidence)


_UNSTABLE = ("training is becoming unstable, often before the loss shows it; lower the learning rate "
             "(max_grad_norm clips each step, not the cause)")
_TOO_HIGH = "; with a loss that hardly fell, the learning rate is too high, not too low"
