"""What runs on the Ray workers: the built-in training loop and what it is built from.

The fine-tuning recipe (:mod:`hpo.train.recipe`, :mod:`hpo.train.training`), datasets
(:mod:`hpo.train.data`, :mod:`hpo.train.sft`, :mod:`hpo.train.augment`), base models
(:mod:`hpo.train.models`, :mod:`hpo.train.gguf_convert`), the worker's device
(:mod:`hpo.train.accelerator`), the memory-lean loss (:mod:`hpo.train.lean_loss`) and the one
channel back to the sweep (:mod:`hpo.train.reporter`).

Imports no Optuna, Ray or MLflow, nor anything of hpo that does (tests/test_boundaries.py):
the loop gets a config and ``report(step, metrics)`` and runs the same under Ray, in a
process or in a test.
"""
