"""The learning-rate range test (``lr_probe=true``): one short run on the base model with the
rate rising exponentially, and the learning-rate range it points to.

Leslie Smith's range test ("Cyclical Learning Rates for Training Neural Networks", WACV 2017,
section 3.3), read the way fastai's ``Learner.lr_find`` and PyTorch Lightning's ``Tuner.lr_find``
read it: up to :data:`STEPS` optimizer steps (one trial's worth when trials are shorter:
:func:`steps_for`) with the rate rising exponentially, the training loss
smoothed by a debiased moving average with ``beta`` :data:`SMOOTHING`, the test stopped once
the smoothed loss passes :data:`DIVERGED` times the best so far (both libraries' ``num_it`` /
``num_training``, smoothing and ``stop_div`` / ``early_stop_threshold``). Each step trains as a
trial does (the same batches, AdamW, clipping, precision and out-of-memory halving:
:func:`hpo.train.training.optimizer_step`), on a fresh adapter that is removed afterwards.

The span is Smith's, not the libraries' defaults: Smith runs the test between bounds expected to
hold the answer; here the module's own range, widened :data:`SPAN` times each way so that the
start of the fall and the divergence can show. fastai's 1e-7..10 (Lightning's 1e-8..1) gives
100 steps 12 per decade, too few for a fresh LoRA adapter to move the loss: on 2,000 SST-2 rows
(all-MiniLM-L6-v2, batch 16) the smoothed loss stayed within 0.686-0.696 up to a rate of 1
and the "steepest" point was noise, while 1e-5..1e-1 (25 steps per decade) showed a clear fall
from 0.688 to 0.662 between 3e-3 and 6e-3.

:func:`choose` reads the curve with fastai's ``steep`` rule (the steepest descent of the smoothed
loss against log10 of the rate, after dropping the first tenth of the points and the last five,
as ``lr_find`` does; Lightning's ``suggestion()`` takes the same argmin, of the gradient against
the rate itself, after dropping the first ten points and the last): the rate at which the loss
falls fastest. The range is the decade centred there (half a decade each side: room for the
noise of a 100-step test, and for the sampler to search), cut to the module's own range, which
stays the outer bound. The cut is not shifted back to a full decade: a centre near the module's
bound leaves the part of the decade inside it (at least :data:`MIN_WIDTH_DECADES`, taken at that
bound), because the rates more than half a decade from the centre are the ones the test saw
barely move the loss in about a trial's length of steps. On SST-2 and the reviews
(all-MiniLM-L6-v2, 60-step trials) the fall was fastest at 4-7e-3, the top of ``lora.py``'s
1e-4..5e-3; the decade shifted inside, 5e-4..5e-3, kept a half decade that learned nothing in 60
steps (every trial below 1e-3 ended at the majority share: docs/benchmarks.md). A centre outside
the module's range gives the half decade at its nearer end. A curve along which the loss never
falls (or a test that diverged too soon to read) keeps the module's range, and says so.

Runs on a worker (:func:`range_test`, torch); :func:`choose` is plain arithmetic, for the driver.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from hpo.train.recipe import TrainJob

STEPS = 100
"""The most optimizer steps of the test (fastai's ``num_it``, Lightning's ``num_training``); a sweep
whose trials are shorter tests for as many steps as one trial runs (:func:`steps_for`)."""
MIN_STEPS = 30
"""The fewest steps of a test, whatever the trials' length: what leaves 22 points once ``lr_find``'s
trims (the first tenth, the last five) are made."""
SPAN = 10.0
"""The test's rate runs from the module's low bound / SPAN to its high bound x SPAN."""
SMOOTHING = 0.98
"""``beta`` of the loss's debiased exponential moving average (fastai's ``AvgSmoothLoss``, Lightning's ``_LRCallback``)."""
DIVERGED = 4.0
"""The test stops once the smoothed loss exceeds this many times its lowest value."""
SKIP_START_SHARE, SKIP_END = 0.1, 5
"""``lr_find`` reads the curve without its first tenth of the points and its last five."""
WIDTH_DECADES = 1.0
"""The width of the chosen range, in powers of ten, centred on the steepest descent (before the module's range cuts it)."""
MIN_WIDTH_DECADES = 0.5
"""The narrowest range the cut may leave, in powers of ten: room for the sampler (all of a narrower module range)."""


@dataclass(frozen=True)
class Curve:
    """What a range test recorded: the rate and the smoothed training loss of each step."""

    lrs: list[float]
    losses: list[float]
    stopped: str
    """``diverged`` (the smoothed loss passed :data:`DIVERGED` x its best) or ``end`` (all its ``steps``)."""
    seconds: float = 0.0
    steps: int = STEPS
    """The steps the test was to run (:func:`steps_for`; a probe recorded before it varied ran :data:`STEPS`)."""


@dataclass(frozen=True)
class Choice:
    """The learning-rate range a range test chose, and why (what the study records)."""

    low: float
    high: float
    outer: tuple[float, float]
    """The module's own range, the outer bound."""
    steepest: float | None
    """The rate where the smoothed loss fell fastest, or None when it never fell."""
    reason: str
    """One line: what the probe chose and why."""
    curve: Curve | None = field(default=None, compare=False)

    @property
    def narrowed(self) -> bool:
        return (self.low, self.high) != tuple(self.outer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Choice:
        values = dict(stored)
        values["outer"] = tuple(values["outer"])
        values["curve"] = Curve(**values["curve"]) if values.get("curve") else None
        return cls(**values)


def steps_for(max_steps: int) -> int:
    """The optimizer steps of a test for trials of ``max_steps`` steps: one trial's worth, at most
    :data:`STEPS` and at least :data:`MIN_STEPS`. The test is a cost paid before the first trial, out
    of the same budget: a sweep of 60-step trials paid 100 (five thirds of a trial) for it, while on
    SST-2 and the reviews a 60-step test chose the same range as a 100-step one (docs/benchmarks.md)."""
    return max(MIN_STEPS, min(STEPS, max_steps))


def schedule(step: int, outer: tuple[float, float], steps: int = STEPS) -> float:
    """The rate of step ``step`` (0-based) of a test of ``steps`` steps around the module's ``outer``
    (low, high) range: exponential from low / :data:`SPAN` to high x :data:`SPAN`."""
    start, end = outer[0] / SPAN, outer[1] * SPAN
    return start * (end / start) ** (step / (steps - 1))


def range_test(job: TrainJob, outer: tuple[float, float]) -> Curve:
    """Train a fresh adapter on ``job`` for at most :func:`steps_for` steps (one trial's worth) with the
    rate rising as :func:`schedule` says around the module's ``outer`` range (``job.params.learning_rate`` is not
    used; LoRA+'s ratio is kept), recording the smoothed loss; stop when it diverges or turns
    non-finite. Runs where a trial runs (a worker)."""
    import torch

    from hpo.train import training, worker_cache
    from hpo.train.batches import is_padding_free, training_batches

    started = time.perf_counter()
    lrs: list[float] = []
    losses: list[float] = []
    stopped = "end"
    average, best = 0.0, math.inf
    p = job.params
    steps = steps_for(job.sweep.max_steps)
    with worker_cache.adapter(job) as fresh:
        trainable = [w for w in fresh.model.parameters() if w.requires_grad]
        first = schedule(0, outer, steps)
        optimizer = training.make_optimizer(fresh.model, trainable, dataclasses.replace(p, learning_rate=first),
                                            fused=job.sweep.fused_optimizer)
        ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, outer, steps) / first)
        batches = training_batches(job, fresh.train_set, fresh.tokenizer)
        micro = p.batch_size
        fresh.model.train()
        for step in range(steps):
            lr = schedule(step, outer, steps)
            loss, micro, _ = training.optimizer_step(fresh.model, next(batches), micro, optimizer, trainable,
                                                     p.max_grad_norm, fresh.run, job.sweep.task,
                                                     padding_free=is_padding_free(job))
            ramp.step()
            if not math.isfinite(loss):
                stopped = "diverged"
                break
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > DIVERGED * best:
                stopped = "diverged"
                break
    return Curve(lrs, losses, stopped, round(time.perf_counter() - started, 1), steps)


def steepest(curve: Curve) -> float | None:
    """fastai's ``steep`` on the curve ``lr_find`` reads (first tenth and last five points dropped):
    the rate at which the smoothed loss falls fastest against log10 of the rate; None when it
    never falls there (or too few points are left)."""
    skip = int(curve.steps * SKIP_START_SHARE)
    lrs, losses = curve.lrs[skip : len(curve.lrs) - SKIP_END], curve.losses[skip : len(curve.losses) - SKIP_END]
    slopes = [(losses[i + 1] - losses[i]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i])) for i in range(len(lrs) - 1)]
    if not slopes or min(slopes) >= 0:
        return None
    return lrs[min(range(len(slopes)), key=slopes.__getitem__)]


def choose(curve: Curve, outer: tuple[float, float]) -> Choice:
    """The range a range test points to within the module's ``outer`` (low, high) range: see the
    module's docstring."""
    low, high = outer
    centre = steepest(curve)
    tested = (f"a range test of {len(curve.lrs)} steps, {curve.lrs[0]:.2g} to {curve.lrs[-1]:.2g}" if curve.lrs
              else "a range test that recorded no step")
    tested += ", stopped where the loss diverged" if curve.stopped == "diverged" else ""
    if centre is None:
        return Choice(low, high, (low, high), None, f"no fall of the smoothed loss to read in {tested}: the "
                      f"module's range {low:.2g}..{high:.2g} is kept", curve)
    half = math.sqrt(10**WIDTH_DECADES)  # as a ratio
    chosen_low, chosen_high = max(low, centre / half), min(high, centre * half)
    least = min(10**MIN_WIDTH_DECADES, high / low)
    if chosen_high < chosen_low * least:  # too little (or nothing) of the decade inside: the nearer end's least
        chosen_low, chosen_high = (low, low * least) if centre < math.sqrt(low * high) else (high / least, high)
    where = "within" if low <= centre <= high else ("below" if centre < low else "above")
    reason = (f"the smoothed loss fell fastest at {centre:.2g} in {tested}, {where} the module's range "
              f"{low:.2g}..{high:.2g}: learning_rate {chosen_low:.2g}..{chosen_high:.2g}")
    return Choice(chosen_low, chosen_high, (low, high), centre, reason, curve)
