"""Writing the refined search-space module: the module the study ran, with its ranges, sweep and docstring rewritten.

``hpo refine`` keeps everything of the module the study ran (imports, helpers, its own
``train`` and ``score``, the logic of ``space``) and rewrites three things in its source,
found with :mod:`ast`:

* each ``trial.suggest_*("name", ...)`` call whose parameter the
  :class:`~hpo.analysis.refine.Plan` changes: the new range, or the fixed value in its
  place, with the reason as a comment on the line above;
* ``sweep = hpo.Sweep(...)``, one field a line: the settings the study ran with (its
  ``--set`` overrides included, each said so; local paths relative to the new file;
  ``trials``, ``timeout`` and ``concurrency`` are the module's, not the run's, and so is
  ``extra``, which the study does not record), and the plan's ``max_steps`` or ``patience``
  with their reasons (comments inside the old call are not kept);
* the docstring: the study it came from and the command that continues it, what changed
  and why, then the original docstring, whose priors stay in view.

The file is written beside its destination, loaded and sampled once as ``hpo search``
would, and only then moved into place: a module that does not load is never left behind.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import json
import os
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.analysis.refine import Plan, plan_refinement
from hpo.analysis.refine_ranges import Fixed, describe
from hpo.analysis.refine_rules import Change
from hpo.config import Sweep
from hpo.errors import HpoError

if TYPE_CHECKING:
    import optuna

SUGGESTS = ("suggest_float", "suggest_int", "suggest_categorical", "suggest_uniform", "suggest_loguniform",
            "suggest_discrete_uniform")
PATH_FIELDS = ("train_data", "eval_data", "test_data", "synonyms", "model", "chat_template")
"""The fields ``hpo.config.resolve_paths`` makes absolute: written relative to the new file."""
RUN_FIELDS = ("trials", "timeout", "concurrency")
"""How long and how wide one run went, not what it searched: the module's own values stay."""
UP = 2
"""Parent folders a relative data path may climb (``../../data/x.tsv``) before it is written absolute."""
WIDTH = 100


@dataclass(frozen=True)
class Refined:
    """What :func:`refine_study` wrote."""

    path: Path
    plan: Plan
    module: Path
    """The module it was written from."""
    command: str
    """The command that runs it, warm-started from the study."""
    unapplied: list[str]
    """Parameters the plan changes whose ``suggest_*`` call has no literal name: left to the user."""


def refine_study(study: optuna.Study, output: str | None, *, module: str | None = None, force: bool = False,
                 storage_flag: str = "") -> Refined:
    """Plan the next sweep of ``study`` and write it as a module at ``output`` (default
    ``STUDY_refined.py`` here). Raises HpoError, writing nothing, for a study ``hpo search``
    did not make, a module that is gone, an output that exists (without ``force``), or a
    study with no COMPLETE trial."""
    from hpo import space as spaces
    from hpo.record.sweep_record import SweepRecord

    name = study.study_name
    record = SweepRecord.load(study)
    if record is None or not (module or record.module):
        raise HpoError(f"study {name!r} was not made by `hpo search`: it records no search-space module to refine")
    source_path = Path(module or record.module or "").expanduser().resolve()
    if not source_path.is_file():
        raise HpoError(f"study {name!r} ran {source_path}, which is not there now; give the module to refine with "
                       "--module PATH")
    path = Path(output or f"{name}_refined.py").expanduser().resolve()
    if path.suffix != ".py":
        raise HpoError(f"--output {output}: a search-space module is a Python file; name one ending in .py")
    if path == source_path:
        raise HpoError(f"--output {output}: that is the module the study ran; write the refined one beside it")
    if path.exists() and not force:
        raise HpoError(f"--output {path}: the file exists; choose another name or add --force to replace it")
    if not path.parent.is_dir():
        raise HpoError(f"--output {output}: the folder {path.parent} does not exist")
    plan = plan_refinement(study, record.sweep)
    original = spaces.load(source_path)
    command = f"hpo search {shown_path(path)}{storage_flag} --warm-start {name}"
    text, unapplied = refined_source(source_path.read_text(encoding="utf-8"), source_path, plan, record.sweep,
                                     original.sweep, path, command)
    write_checked(path, text)
    return Refined(path, plan, source_path, command, unapplied)


def refined_source(source: str, source_path: Path, plan: Plan, recorded: dict, module_sweep: Sweep, path: Path,
                   command: str) -> tuple[str, list[str]]:
    """The new module's text, and the changed parameters it found no ``suggest_*`` call for."""
    text = Text(source)
    tree = ast.parse(source)
    edits: list[tuple[int, int, str]] = []
    calls = suggest_calls(tree)
    unapplied = []
    reasons: dict[int, tuple[ast.Call, list[str]]] = {}  # by line: the comments that go above it
    for change in plan.params:
        if not change.changed:
            continue
        if not calls.get(change.name):
            unapplied.append(change.name)
        for call in calls.get(change.name, []):
            edits.append((*text.span(call), call_text(text, call, change.after)))
            reasons.setdefault(call.lineno, (call, []))[1].append(
                comment(f"{describe(change.before)} -> {describe(change.after)}: {change.reason}", text.indent(call)))
    for call, lines in reasons.values():  # an earlier round's comment there is about the range replaced
        edits.append((text.earlier_comment(call), text.line_start(call), "\n".join(lines) + "\n"))
    call = sweep_call(tree, source_path)
    start, end = text.span(call)
    edits.append((start, end, sweep_text(text, call, recorded, module_sweep, plan.sweep, path,
                                         source_path.parent)))
    doc = docstring(plan, source_path, command, ast.get_docstring(tree), unapplied)
    body = tree.body[0] if tree.body else None
    if isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant) and isinstance(body.value.value, str):
        edits.append((*text.span(body), doc))
    else:
        edits.append((0, 0, doc + "\n\n"))
    result = source
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        result = result[:start] + replacement + result[end:]
    return result, unapplied


class Text:
    """A module's source with ast positions (lines from 1, columns in UTF-8 bytes) as string offsets."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines = source.split("\n")
        self.starts = [0]
        for line in self.lines[:-1]:
            self.starts.append(self.starts[-1] + len(line) + 1)

    def offset(self, line: int, column: int) -> int:
        return self.starts[line - 1] + len(self.lines[line - 1].encode("utf-8")[:column].decode("utf-8", "ignore"))

    def span(self, node: Any) -> tuple[int, int]:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def segment(self, node: Any) -> str:
        start, end = self.span(node)
        return self.source[start:end]

    def line_start(self, node: Any) -> int:
        return self.starts[node.lineno - 1]

    def earlier_comment(self, node: Any) -> int:
        """Where the comment ``hpo refine`` wrote above ``node``'s line in an earlier round starts
        (``# refine: ...`` and its ``#   ...`` lines); the line's own start when there is none."""
        first = node.lineno - 1
        while first > 0 and self.lines[first - 1].strip().startswith(("# refine: ", "#   ")):
            first -= 1
        while first < node.lineno - 1 and not self.lines[first].strip().startswith("# refine: "):
            first += 1
        return self.starts[first]

    def indent(self, node: Any) -> str:
        line = self.lines[node.lineno - 1]
        return line[:len(line) - len(line.lstrip())]


def suggest_calls(tree: ast.AST) -> dict[str, list[ast.Call]]:
    """Each ``<trial>.suggest_*("name", ...)`` call with a literal name, by name."""
    calls: dict[str, list[ast.Call]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SUGGESTS:
            named = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            if isinstance(named, ast.Constant) and isinstance(named.value, str):
                calls.setdefault(named.value, []).append(node)
    return calls


def call_text(text: Text, call: ast.Call, after: Any) -> str:
    """The call that samples ``after`` (or the fixed value itself), on the same trial object."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(after, Fixed):
        return literal(after.value)
    assert isinstance(call.func, ast.Attribute)
    head = f"{text.segment(call.func.value)}.suggest_"
    named = call.args[0] if call.args else next(k.value for k in call.keywords if k.arg == "name")
    name = text.segment(named)
    if isinstance(after, CategoricalDistribution):
        return f"{head}categorical({name}, {literal(list(after.choices))})"
    kind = "int" if isinstance(after, IntDistribution) else "float"
    extra = (f", step={literal(after.step)}" if after.step not in (None, 1) else "") + (", log=True" if after.log else "")
    return f"{head}{kind}({name}, {literal(after.low)}, {literal(after.high)}{extra})"


def sweep_call(tree: ast.Module, source_path: Path) -> ast.Call:
    """The call of the module's one top-level ``sweep = <call>(...)``."""
    found = [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
             and any(isinstance(t, ast.Name) and t.id == "sweep"
                     for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    if len(found) != 1 or not isinstance(found[0].value, ast.Call):
        raise HpoError(f"{source_path}: hpo refine rewrites the module's one top-level `sweep = hpo.Sweep(...)`; "
                       f"it has {len(found)} assignments to sweep{'' if len(found) != 1 else ' and not a call'}: "
                       "write it as one hpo.Sweep(...) call, or refine the module by hand from `hpo diagnose`")
    return found[0].value


def sweep_text(text: Text, call: ast.Call, recorded: dict, module_sweep: Sweep, changes: list[Change], path: Path,
               source_folder: Path) -> str:
    """``hpo.Sweep(...)`` with one field a line: the module's own, the study's ``--set`` ones
    and the plan's changes, each of the last two with its reason above it."""
    fields = [f.name for f in dataclasses.fields(Sweep)]
    module_values = module_sweep.to_dict()
    changed = {change.name: change for change in changes}
    moved = path.parent != source_folder

    def entry(name: str, original: str | None) -> list[str]:
        if name in changed:
            change = changed[name]
            return [comment(f"{literal(change.before)} -> {literal(change.after)}: {change.reason}", "    "),
                    f"    {name}={literal(change.after)},"]
        if name in RUN_FIELDS or name not in recorded or name not in fields:
            return [f"    {name}={original},"] if original is not None else []
        value = relative(recorded[name], path.parent) if name in PATH_FIELDS else literal(recorded[name])
        if recorded[name] != module_values.get(name):
            return [comment(f"the study ran with --set {name}={recorded[name]} (the module says "
                            f"{literal(module_values.get(name))})", "    "), f"    {name}={value},"]
        if original is None:
            return []
        return [f"    {name}={value if name in PATH_FIELDS and moved else original},"]

    lines = [f"    {text.segment(arg)}," for arg in call.args]
    named = {keyword.arg for keyword in call.keywords}
    for keyword in call.keywords:
        lines += [f"    **{text.segment(keyword.value)},"] if keyword.arg is None else \
            entry(keyword.arg, text.segment(keyword.value))
    for name in fields:
        if name not in named and (name in changed or (name in recorded and name not in RUN_FIELDS
                                                      and recorded[name] != module_values.get(name))):
            lines += entry(name, None)
    return f"{text.segment(call.func)}(\n" + "\n".join(lines) + "\n)"


def docstring(plan: Plan, source_path: Path, command: str, original: str | None, unapplied: list[str]) -> str:
    """The new module's docstring: where it came from, how to run it, what changed and why, the old docstring."""
    counts = ", ".join(f"{count} {state.lower()}" for state, count in sorted(plan.counts.items()))
    number, value = plan.best
    paragraphs = [
        wrap(f"Refined from study {plan.study!r} by `hpo refine {plan.study}` on {datetime.date.today().isoformat()}, "
             f"from {shown_path(source_path)}."),
        f"    {command}",
        wrap(f"The study: {sum(plan.counts.values())} trials ({counts}); the best, trial {number}, has "
             f"{plan.metric or 'objective'} {value:.4g} ({plan.direction})."),
    ]
    changes = [c for c in [*plan.params, *plan.sweep] if c.changed]
    if changes:
        paragraphs.append("What changed, and why (each change is also commented where it is made):")
        paragraphs.append(bullets(f"{c.name}: {describe_any(c.before)} -> {describe_any(c.after)}: {c.reason}"
                                  + (" (NOT applied: no suggest call with this literal name; change it by hand)"
                                     if c.name in unapplied else "") for c in changes))
    else:
        paragraphs.append("Nothing changed: the study gives no reason to (see below).")
    kept = [c for c in plan.params if not c.changed]
    if kept:
        paragraphs += ["Left as they were:", bullets(f"{c.name}: {c.reason}" for c in kept)]
    if plan.notes:
        paragraphs += ["Seen, not acted on:", bullets(plan.notes)]
    said = ", said:" if original else " (it has no docstring)."
    paragraphs.append(wrap(f"An ordinary search-space module: edit it before you run it. The module it was written "
                           f"from, {shown_path(source_path)}{said}"))
    if original:
        paragraphs.append(textwrap.indent(original, "    "))
    body = "\n\n".join(paragraphs)
    return '"""' + body.replace("\\", "\\\\").replace('"""', '\\"\\"\\"') + '\n"""'


def describe_any(value: Any) -> str:
    """A distribution, a fixed value, or a sweep field's value, for the docstring."""
    from optuna.distributions import BaseDistribution

    if isinstance(value, (Fixed, BaseDistribution)):
        return describe(value)
    return literal(value)


def bullets(lines: Any) -> str:
    return "\n".join(textwrap.fill(line, WIDTH, initial_indent="* ", subsequent_indent="  ", break_on_hyphens=False)
                     for line in lines)


def wrap(line: str) -> str:
    return textwrap.fill(line, WIDTH, break_on_hyphens=False)


def comment(line: str, indent: str) -> str:
    """``line`` as comment lines at ``indent`` (no newline after the last): ``# refine: ...``,
    then ``#   ...`` (so that the next round finds it, and replaces it when it changes the line again)."""
    parts = textwrap.wrap(f"refine: {line}", max(40, WIDTH - len(indent) - 4), break_on_hyphens=False)
    return "\n".join(f"{indent}# {part}" if i == 0 else f"{indent}#   {part}" for i, part in enumerate(parts))


def literal(value: Any) -> str:
    """``value`` as Python source in the project's style (double-quoted strings)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def relative(value: Any, folder: Path) -> str:
    """A recorded absolute path as a literal relative to ``folder`` (what the module is loaded
    against) when it is at most ``UP`` folders up: the module moved with its data still finds
    it; from further up an absolute path reads clearer."""
    if isinstance(value, str) and os.path.isabs(value):
        try:
            shorter = os.path.relpath(value, folder)
        except ValueError:  # another drive
            return literal(value)
        return literal(shorter if Path(shorter).parts[:UP + 1].count("..") <= UP else value)
    return literal(value)


def shown_path(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_checked(path: Path, text: str) -> None:
    """Write ``text`` beside ``path``, load and sample it as ``hpo search`` would, then move it into place."""
    from hpo import space as spaces

    temporary = path.parent / f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.py"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        try:
            spaces.sample_check(spaces.load(temporary))
        except HpoError as error:
            raise HpoError(f"hpo refine: the module it would write does not load ({error}); nothing was written") \
                from None
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
