"""Study names, checked before one becomes part of a path.

A study name names the Optuna study and the MLflow experiment, and becomes a folder:
``.hpo/reports/<study>``, ``promoted/<study>-trialN``, Ray's run folder. So ``..``, a
path separator or a control character would write outside the folder meant; this is the
one check, used by every command that takes ``--study`` and wherever a name becomes a path.
"""

from __future__ import annotations

from pathlib import Path

from hpo.errors import HpoError

MAX_LENGTH = 128


def check_study_name(name: str, flag: str = "--study") -> str:
    """``name`` if it is safe as a folder name; otherwise an HpoError naming ``flag``."""
    problem = _problem(name)
    if problem:
        shown = repr(name if len(name) <= 40 else name[:40] + "...")
        raise HpoError(f"{flag} {shown}: {problem}; a study name becomes a folder name: use letters, digits, "
                       f"'-', '_' and '.' (at most {MAX_LENGTH} characters; no slash, backslash, control "
                       "character or leading '..')")
    return name


def folder_for(parent: Path, name: str, suffix: str = "") -> Path:
    """``parent / (name + suffix)``, the name checked first: a path that stays inside ``parent``."""
    check_study_name(name)
    return parent / f"{name}{suffix}"


def _problem(name: str) -> str | None:
    if not name or not name.strip():
        return "is empty"
    if len(name) > MAX_LENGTH:
        return f"is {len(name)} characters long"
    if name in (".", "..") or name.startswith(".."):
        return "is a parent-folder reference"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if name != name.strip():
        return "starts or ends with a space"
    return None
