"""``--set KEY=VALUE`` on the command line: typed values for the :class:`~hpo.config.Sweep` fields.

``hpo search``, ``hpo check-data`` and ``hpo promote`` take ``--set`` pairs;
:func:`parse_overrides` reads each value by its field's type (a ``Literal`` field's choices, ``bool``,
``int``, ``float``, ``str``, ``None`` for an optional one) and :class:`~hpo.config.Sweep` then checks the
values in context. ``--set extra.KEY=VALUE`` sets one key of a module's own settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Literal

from hpo.config import KNOWN_DIRECTIONS, Sweep, split_commas
from hpo.errors import HpoError


def field_names() -> list[str]:
    """The fields ``--set FIELD=VALUE`` sets (``extra`` takes ``--set extra.KEY=VALUE``)."""
    return [f.name for f in dataclasses.fields(Sweep) if f.name != "extra"]


def direction_follows_metric(sweep: Sweep, values: dict[str, Any]) -> dict[str, Any]:
    """``--set`` values, with ``direction`` added when ``metric`` changes and ``direction`` is not
    given: a module's ``direction`` was chosen for its own metric (``--set metric=eval_loss`` on
    a sweep maximizing accuracy must not maximize the loss). A new metric of unknown direction
    needs ``--set direction=...``."""
    metric = values.get("metric")
    if metric is None or "direction" in values or metric == sweep.metric:
        return values
    if metric in KNOWN_DIRECTIONS:
        return {**values, "direction": KNOWN_DIRECTIONS[metric]}
    names = split_commas(metric)
    if len(names) > 1 and all(name in KNOWN_DIRECTIONS for name in names):
        return {**values, "direction": ",".join(KNOWN_DIRECTIONS[name] for name in names)}
    raise HpoError(f"--set metric={metric}: the sweep's direction ({sweep.direction}) was chosen for "
                   f"{sweep.metric}; say which way {metric} is better with --set direction=maximize or minimize")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["max_steps=30", "eval_data=none"]`` into typed values, by the fields' types.

    ``extra.KEY=VALUE`` gives ``{"extra": {KEY: VALUE read as JSON, else as text}}`` (merged into
    the module's own by :func:`hpo.space.load`).

    Raises HpoError for a malformed pair, an unknown key (with the closest valid one) or a
    value of the wrong type. Values are checked again, in context, by :class:`Sweep`.
    """
    hints = typing.get_type_hints(Sweep)
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HpoError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set max_steps=30")
        if key.startswith("extra."):
            name = key.removeprefix("extra.").strip()
            if not name:
                raise HpoError(f"--set {pair!r}: expected extra.KEY=VALUE, e.g. --set extra.bonus=0.5")
            values.setdefault("extra", {})[name] = _extra_value(raw.strip())
            continue
        if key not in hints or key == "extra":
            close = difflib.get_close_matches(key, field_names(), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            if key == "extra":
                hint = "set one key of a module's own settings with --set extra.KEY=VALUE; "
            raise HpoError(
                f"--set {pair!r}: unknown sweep field {key!r}; {hint}"
                f"valid fields: {', '.join(field_names())}"
            )
        values[key] = _coerce(key, raw.strip(), hints[key])
    return values


def _extra_value(raw: str) -> Any:
    """An ``extra.KEY=VALUE`` value: JSON when it parses as JSON, else the text itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _coerce(key: str, raw: str, hint: Any) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and raw.lower() in ("none", "null", ""):
        return None
    kinds = [a for a in args if a is not type(None)] if _is_union(hint) else [hint]
    for kind in kinds:
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            if raw in choices:
                return raw
            raise HpoError(f"--set {key}={raw}: must be one of {', '.join(choices)}")
        if kind is bool:
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise HpoError(f"--set {key}={raw}: must be true or false (also 1/0, yes/no)")
        if kind is int:
            try:
                return int(raw)
            except ValueError:
                raise HpoError(f"--set {key}={raw}: must be a whole number") from None
        if kind is float:
            try:
                return float(raw)
            except ValueError:
                raise HpoError(f"--set {key}={raw}: must be a number") from None
        if kind is str:
            return raw
    raise HpoError(f"--set {key}={raw}: this field cannot be set from the command line")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
