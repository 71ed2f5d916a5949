"""hpo: hyperparameter search for fine-tuning language models.

A search-space module imports only this package's light surface::

    import hpo
    sweep = hpo.Sweep(model=..., train_data=..., metric="eval_accuracy")

    def space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True)}
"""

from hpo.config import Sweep
from hpo.errors import HpoError
from hpo.priors import Prior
from hpo.train.reporter import Report, ReportError

__all__ = ["HpoError", "Prior", "Report", "ReportError", "Sweep"]
__version__ = "0.1.0"
