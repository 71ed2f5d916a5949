"""Import boundaries: which parts of ``hpo`` may import Optuna, Ray and MLflow.

Reads every module of ``hpo/`` with :mod:`ast` (no imports run, so this is fast): imports at
the top level, inside functions and under ``if TYPE_CHECKING``, ``import x``, ``from x import
y``, relative imports resolved, and ``importlib.import_module("x")`` / ``__import__("x")``
with a literal name. An import of another ``hpo`` module counts as everything that module
imports, transitively (and importing ``hpo.x`` runs ``hpo/__init__.py`` too): a worker module
that imports ``hpo.record.study``, which imports optuna, imports optuna. A failure names the file,
the line and the import, and the chain of ``hpo`` modules that led to it.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from pathlib import Path

HPO = Path(__file__).resolve().parents[1] / "hpo"

# The code that runs on Ray workers: the training loop and what it is built from.
WORKER = ("hpo.train.training", "hpo.train.recipe", "hpo.train.data", "hpo.train.sft", "hpo.train.accelerator",
          "hpo.train.models", "hpo.train.reporter",
          "hpo.train.augment", "hpo.train.gguf_convert")
# The Optuna side: the study and its storage, the trial ledger and what it is built from.
OPTUNA_SIDE = ("hpo.record.study", "hpo.record.ledger", "hpo.record.locks", "hpo.record.liveness", "hpo.names",
               "hpo.record.warmstart", "hpo.record.optuna_access")
OPTUNA_ACCESS = "hpo.record.optuna_access"
"""The one module that may read Optuna's private attributes and import its private modules."""
DIAGNOSIS = ("hpo.analysis.diagnose", "hpo.analysis.diagnose_rules", "hpo.analysis.diagnose_curve",
             "hpo.analysis.diagnose_advice", "hpo.formatting")

# modules -> the libraries they must not import (directly or through other hpo modules), and why.
RULES: list[tuple[tuple[str, ...], frozenset[str], str]] = [
    (WORKER, frozenset({"optuna", "ray", "mlflow"}),
     "the training loop gets a config and report(); it runs the same under Ray, in a process or a test"),
    (OPTUNA_SIDE, frozenset({"ray"}), "Optuna owns trial state; Ray only executes"),
    (("hpo.record.recorder",), frozenset({"ray"}), "the driver's one writer takes plain events from the scheduler"),
    (("hpo.record.tracking", "hpo.record.sweep_tracker"), frozenset({"ray"}), "MLflow mirrors the study; Ray only executes"),
    (("hpo.record.tracking", "hpo.record.sweep_tracker", "hpo.record.writer"), frozenset({"optuna"}),
     "the MLflow side mirrors what the driver hands it and never opens the Optuna side, hpo.record.study"),
    (("hpo.record.stores", "hpo.record.sqlite"), frozenset({"optuna", "mlflow", "ray"}),
     "pre-flight checks and retries shared by both stores belong to neither"),
    (("hpo.config", "hpo.overrides", "hpo.space"), frozenset({"ray", "mlflow"}),
     "loading and checking a sweep runs nothing"),
    (("hpo.errors", "hpo.secrets"), frozenset({"optuna", "ray", "mlflow", "torch", "transformers"}),
     "leaves that every side imports, the command line before anything else: errors and secrets load nothing heavy"),
    (DIAGNOSIS, frozenset({"ray", "mlflow"}), "the diagnosis reads the study and writes nothing"),
    (("hpo.run.promote", "hpo.run.model_card", "hpo.run.atomic_folder"), frozenset({"ray"}),
     "hpo promote trains the final run in this process: it needs no Ray"),
]


# The layout (docs/concepts/architecture.md, "Layout"): each subpackage keeps to one side of the boundaries, whatever
# modules it holds (the rules above name the modules that were there when they were written).
def _subpackage(name: str) -> tuple[str, ...]:
    """Every module of one subpackage of hpo/, by dotted name, its ``__init__`` included (the
    subpackage alone when it is not there, so that the rule reports it missing)."""
    return tuple(f"hpo.{name}" + ("" if p.stem == "__init__" else f".{p.stem}")
                 for p in sorted((HPO / name).glob("*.py"))) or (f"hpo.{name}",)


RULES += [
    (_subpackage("train"), frozenset({"optuna", "ray", "mlflow"}),
     "hpo/train/ runs on the workers: a config and report() in, nothing else"),
    (_subpackage("record"), frozenset({"ray"}),
     "hpo/record/ keeps the records: Optuna owns trial state, MLflow mirrors it, Ray only executes"),
    (_subpackage("analysis"), frozenset({"ray", "mlflow"}),
     "hpo/analysis/ reads the data and the study and runs nothing"),
]


@dataclass(frozen=True)
class Import:
    """One import statement: where it is, what it says, and the modules it names."""

    path: Path
    line: int
    text: str
    targets: tuple[str, ...]
    """Dotted module names: ``from a import b`` names ``a`` and ``a.b`` (kept when ``a.b`` is a module)."""

    def where(self) -> str:
        return f"{self.path.as_posix()}:{self.line} `{self.text}`"


def module_index(package: Path) -> dict[str, Path]:
    """Every module of a package folder, by dotted name (``hpo.record.study`` -> hpo/record/study.py)."""
    index = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        index[".".join(parts)] = path
    return index


def imports_in(source: str, module: str, path: Path) -> list[Import]:
    """Every import in a module's source, wherever it stands, relative ones made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            targets = tuple(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = (base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*"))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _dynamic_import(node.func)):
            targets = (node.args[0].value,)
        else:
            continue
        segment = lines[node.lineno - 1:node.end_lineno]
        segment[-1] = segment[-1][:node.end_col_offset]
        segment[0] = segment[0][node.col_offset:]
        found.append(Import(path, node.lineno, " ".join(" ".join(segment).split()), targets))
    return sorted(found, key=lambda i: i.line)


def _dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def violations(index: dict[str, Path], rules: list[tuple[tuple[str, ...], frozenset[str], str]]) -> list[str]:
    """One line per forbidden import reachable from a module a rule names, with the chain to it."""
    top = min(index, key=len)  # the package itself; paths are shown from the folder that holds it
    base = index[top].parent.parent
    graph = {name: imports_in(path.read_text(encoding="utf-8"), name, path.relative_to(base))
             for name, path in index.items()}
    problems = []
    for modules, forbidden, why in rules:
        for module in modules:
            if module not in index:
                problems.append(f"{module}: named by a rule but not found under {base / top}: update the table")
                continue
            for chain, statement, library in _reachable(module, graph, index, forbidden):
                via = "".join(f"{step.where()} -> " for step in chain)
                problems.append(f"{via}{statement.where()}: {module} must not import {library} ({why})")
    return problems


def _reachable(module: str, graph: dict[str, list[Import]], index: dict[str, Path],
               forbidden: frozenset[str]) -> list[tuple[list[Import], Import, str]]:
    """Forbidden imports anywhere in ``module``'s import closure, each with the first chain that reaches it."""
    found, seen = [], {module}
    stack: list[tuple[str, list[Import]]] = [(module, [])]
    for ancestor in _packages(module, index):  # importing hpo.x runs hpo/__init__.py first
        stack.append((ancestor, []))
        seen.add(ancestor)
    while stack:
        current, chain = stack.pop()
        for statement in graph[current]:
            for target in statement.targets:
                root = target.split(".")[0]
                if root in forbidden:
                    found.append((chain, statement, root))
                    break
                for internal in (target, *_packages(target, index)):
                    if internal in index and internal not in seen:
                        seen.add(internal)
                        stack.append((internal, [*chain, statement]))
    return found


def _packages(module: str, index: dict[str, Path]) -> list[str]:
    parts = module.split(".")
    return [name for i in range(1, len(parts)) if (name := ".".join(parts[:i])) in index]


def test_hpo_modules_keep_their_import_boundaries():
    problems = violations(module_index(HPO), RULES)
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


def test_the_checker_reads_the_whole_package():
    index = module_index(HPO)
    assert {"hpo", "hpo.train.training", "hpo.record.study", "hpo.record.tracking", "hpo.run.scheduling"} <= set(index)


def optuna_private_names(folder: Path) -> frozenset[str]:
    """Every private attribute name (``_x``, not ``__x__``) of Optuna's study, its cached and RDB
    storages, an asked trial, a frozen trial, the distributions and a sampler: read from the
    live objects (class and instance attributes), so a name hpo could reach for is in it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{folder / 'names.db'}"
    with warnings.catch_warnings():  # heartbeat_interval is "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.create_study(storage=optuna.storages.RDBStorage(url, heartbeat_interval=60), study_name="names")
    study = optuna.load_study(study_name="names", storage=url)
    asked = study.ask()
    asked.suggest_float("x", 0, 1)
    asked.suggest_int("n", 0, 3)
    asked.suggest_categorical("c", ["a", "b"])
    study.tell(asked, 1.0)
    frozen = study.trials[0]
    objects = [study, study._storage, study._storage._backend, asked, frozen, *frozen.distributions.values(),
               optuna.samplers.TPESampler()]
    return frozenset(name for thing in objects for name in {*dir(thing), *getattr(thing, "__dict__", {})}
                     if name.startswith("_") and not name.startswith("__"))


def optuna_internals(index: dict[str, Path], private: frozenset[str]) -> list[str]:
    """One line per use of Optuna's internals outside :data:`OPTUNA_ACCESS`: ``x._name`` where
    ``_name`` is one of ``private`` (``self._name``, an hpo object's own, is not), and an import of
    a private Optuna module (``optuna.study._tell``)."""
    base = index[min(index, key=len)].parent.parent
    problems = []
    for module, path in index.items():
        if module == OPTUNA_ACCESS:
            continue
        shown = path.relative_to(base).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                problems.append(f"{shown}:{node.lineno} `.{node.attr}`")
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{shown}:{node.lineno} `import {name}`" for name in names
                         if name.split(".")[0] == "optuna" and any(part.startswith("_") for part in name.split("."))]
    return problems


def test_only_one_module_knows_optunas_internals(tmp_path):
    """Optuna's private attributes (``study._storage``, ``trial._trial_id``, ...) and modules are
    read in hpo/record/optuna_access.py only: an Optuna upgrade that renames one breaks one file."""
    index = module_index(HPO)
    assert OPTUNA_ACCESS in index
    problems = optuna_internals(index, optuna_private_names(tmp_path))
    assert not problems, f"Optuna internals outside {OPTUNA_ACCESS} (add a function there):\n" + "\n".join(problems)


def test_the_internals_check_finds_attributes_and_private_modules(tmp_path):
    index = _package(tmp_path, {"ledger.py": "def f(study, trial):\n    return study._storage, trial._trial_id\n",
                                "tell.py": "from optuna.study._tell import _tell_with_warning\n",
                                "own.py": "class A:\n    def f(self):\n        return self._storage\n"})
    problems = optuna_internals(index, frozenset({"_storage", "_trial_id"}))
    assert problems == ["pkg/ledger.py:2 `._storage`", "pkg/ledger.py:2 `._trial_id`",
                        "pkg/tell.py:1 `import optuna.study._tell`"], problems


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    root = tmp_path / "pkg"
    root.mkdir()
    for name, source in {"__init__.py": "", **files}.items():
        (root / name).write_text(source)
    return module_index(root)


def test_checker_catches_a_direct_import_inside_a_function(tmp_path):
    index = _package(tmp_path, {"worker.py": "import math\n\n\ndef train():\n    import ray.tune\n    return math\n"})
    [problem] = violations(index, [(("pkg.worker",), frozenset({"ray", "optuna"}), "runs on workers")])
    assert "pkg/worker.py:5 `import ray.tune`" in problem
    assert "pkg.worker must not import ray (runs on workers)" in problem


def test_checker_follows_relative_and_transitive_imports(tmp_path):
    index = _package(tmp_path, {
        "worker.py": "def train():\n    from . import record\n",
        "record.py": "from pkg.storage import open_study\n",
        "storage.py": "import json\n\nfrom optuna.trial import TrialState\n",
        "clean.py": "from .storage import open_study  # noqa\n",
    })
    rules = [(("pkg.worker",), frozenset({"optuna"}), "runs on workers"),
             (("pkg.clean",), frozenset({"ray"}), "no Ray")]
    [problem] = violations(index, rules)
    assert problem.startswith("pkg/worker.py:2 `from . import record` -> pkg/record.py:1 `from pkg.storage import "
                              "open_study` -> pkg/storage.py:3 `from optuna.trial import TrialState`: pkg.worker must "
                              "not import optuna")


def test_checker_counts_the_package_init_and_dynamic_imports(tmp_path):
    index = _package(tmp_path, {"__init__.py": "import mlflow\n", "plain.py": "x = 1\n",
                                "late.py": "import importlib\n\n\ndef f():\n    return importlib.import_module('ray')\n"})
    problems = violations(index, [(("pkg.plain", "pkg.late"), frozenset({"mlflow", "ray"}), "why")])
    assert any(p.startswith("pkg/__init__.py:1 `import mlflow`: pkg.plain must not import mlflow") for p in problems)
    assert any("pkg/late.py:5 `importlib.import_module('ray')`: pkg.late must not import ray" in p for p in problems)


def test_checker_reports_a_rule_for_a_missing_module(tmp_path):
    index = _package(tmp_path, {"a.py": ""})
    [problem] = violations(index, [(("pkg.gone",), frozenset({"ray"}), "why")])
    assert problem.startswith("pkg.gone: named by a rule but not found")

