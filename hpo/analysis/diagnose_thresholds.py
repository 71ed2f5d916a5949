"""Every threshold the diagnosis judges by, in one place, each with why.

:mod:`hpo.analysis.diagnose_rules` (one trial's curves) and :mod:`hpo.analysis.diagnose_advice`
(the study) read these, and so may anything that acts on a diagnosis (``hpo refine``): import
them from here. Curve thresholds are shares of the curve's own scale (its start level, or its
lowest level), so they hold for a classification loss of 0.7 and a language-model loss of 10.
A *level* is the median of a few points (see :mod:`hpo.analysis.diagnose_curve`), a *low* the
lowest point of a running median of 3: single noisy points do not decide.

How they hold: on the synthetic shapes of tests/test_diagnose.py with 2% noise on every point,
200 draws per shape and length, the intended kind comes out in >= 94% of draws for 5-30 points
(>= 98% from 12), except a too-low learning rate under a linear decay, which needs 8+ points
(80% at 5, 96% at 8); at 3% noise, >= 89% from 5 points for every other shape. Adding
``early_overfitting`` changed none of these. The tests check >= 90% of 50 draws per shape and length.
"""

from __future__ import annotations

# --- one trial's curves ---------------------------------------------------------------------

MIN_POINTS = 3
"""Finite evaluations needed to judge a curve's shape: two points make a line, not a shape.
With fewer, only NaN/inf is claimed."""

DIVERGE_RISE = 0.10
"""Diverging: the training loss ends this share of its start above its start, or climbs back
this far from its lowest level. A tenth of the whole loss is far above the noise of a settled
training loss, far below a real blow-up."""

DIVERGE_STEADY_TAU = 0.3
"""... and, climbing back, rises on the whole from its lowest point (Kendall's tau at least
this): one bad evaluation is not a trend."""

OVERFIT_RISE = 0.08
"""Overfitting: the validation loss ends this share above its low (reached before the end)
while the training loss keeps falling. 8% is clear of the 2-3% wobble of a settled
validation loss."""

EARLY_OVERFIT_RISE = 0.04
"""Early signs of overfitting: the same pattern with a rise of at least this share but under
``OVERFIT_RISE``. Twice the 2% wobble of a settled validation loss: a real upturn, not yet a
clear one (the settled curves of tests/test_diagnose.py rise 1-2% from their low and stay healthy)."""

SLOW_TAIL_DROP = 0.03
"""Still falling: the curve's last half removes at least this share of its start ..."""

SLOW_TAIL_RATIO = 0.25
"""... and at least this share of what its first half removed. A converged curve removes
almost nothing in its second half (ratio < 0.1); a linearly decaying learning rate makes even
a steadily learning run's ratio about 1/3, hence 0.25 ..."""

SLOW_NOISE_FACTOR = 2.0
"""... and at least this many times the curve's own point noise (median absolute second
difference): a tail inside the noise is not a trend."""

SLOW_MAX_DROP = 0.35
"""Slow convergence (learning rate too low): still falling, and less than this share of the
start dropped in all. A run with a good learning rate drops more than a third early."""

UNDERFIT_MAX_DROP = 0.10
"""Underfitting: training and validation loss both end less than this share below their start,
without a steady tail: stuck high and flat."""

# --- the study --------------------------------------------------------------------------------

MIN_TRIALS = 3
"""COMPLETE trials needed to compute parameter importance and range edges at all."""

IMPORTANCE_MIN_TRIALS = 12
"""COMPLETE trials a parameter importance needs before advice names the parameters it ranks
first. Measured by ``python bench/importance.py --seeds 40`` (trials sampled from
search_spaces/lora.py's five parameters with its sampler, scored by a LoRA-like surface on
which the learning rate dominates): Optuna's fANOVA ranks the learning rate first in 45% of
studies of 5 COMPLETE trials, 60% at 8, 80% at 10, 90% at 12, 95% at 15, 97% at 20; below 12 the
ranking is close to a coin toss. A space with more parameters needs more trials. Even above
it, pure noise gets one parameter half of the importance in about a fifth of studies (the
shares are normalised): importance ranks, it does not prove a parameter matters."""

BEST_SHARE = 0.25
"""Range edges look at the best quarter of the COMPLETE trials (at least 2)."""

EDGE_SHARE = 0.10
"""A value within a tenth of the range (in log space for log ranges) of a bound sits at it."""

PRIOR_NEAR = 0.9
"""A regulariser whose trials already reach this share of its prior's upper bound has no
room left to raise within it."""


# --- a trial's answers and steps (hpo.analysis.diagnose_sft; its docstring has the measurements) ---

UNFINISHED_SHARE = 0.25
"""never_stops: this share of the answers (whose reference fits in max_new_tokens) ran to the
limit without the end-of-turn token. A model that learned its answers' end stops on nearly all;
a quarter (8 of 32) is far beyond a one-off."""

REPETITION_LEVEL = 0.2
"""repeats: the answers' mean seq-rep-4 (share of 4-grams repeating an earlier one). People's text
scores about 0.01, greedy decoding stuck in loops about 0.4 (Welleck et al. 2019)."""

FORMAT_FAIL_SHARE = 0.25
"""wrong_format: this share of the answers fail the sweep's answer_format, the same bar as
never_stops."""

SCORE_FAIL_SHARE = 0.5
"""failing_score: this share of the answers score 0 or less by the module's score: most
answers earn nothing."""

FORGET_DROP = 0.1
"""forgetting: the retain set's score ends this far below the base model's: 4 of 32 general
answers lost (one or two may flip on any small change)."""

LOSS_SPIKE = 3.0
"""loss_spikes: a step's loss this many times both the interval before's mean and the first
interval's. MiniLM on the reviews at good learning rates reached 1.1-5.6x the interval's mean
but only 1.07-1.95x the start."""

GRAD_SPIKE = 20.0
"""gradient_blowup: a step's gradient norm before clipping this many times the median step's
before it (and a record). Small-batch heavy tails reached 12.7x in healthy runs, 29x at a
learning rate that learned nothing."""

GRAD_RISE = 10.0
"""gradient_blowup: the median step's gradient norm ends this many times its lowest, rising on
the whole from there: divergence that often shows before the loss does."""

GRAD_RISE_TAU = 0.3
"""gradient_blowup: Kendall's tau of the median step's gradient norm from its lowest point, so a
single late jump does not count as a steady rise (the same bar as the curve rules' trends)."""
