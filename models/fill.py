"""`fill`: a config dataclass from a plain dict (TOML table, launcher dict, Python kwargs).

The one place that turns dicts into config dataclasses, for the model and train configs here
and for the launcher's job sections. Unknown keys and values of the wrong type raise
ValueError naming the key (with its likely spelling, or its new name where a key was renamed),
so a typo never reaches a worker.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any


def suggest(word: str, choices, fmt: str = "{}") -> str:
    """' (did you mean X?)' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


def check_type(where: str, value: Any, default: Any) -> Any:
    """`value` checked against the type of the field's `default`: int -> float where a float
    is expected, anything else of the wrong type is a ValueError naming `where`. Fields whose
    default is None or a container are not checked here (their __post_init__ does)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ValueError(f"config key {where} = {value!r}: expected {type(default).__name__}, "
                         f"got {type(value).__name__}")
    return value


def _hint(key: str, cls, names, prefix: str) -> str:
    """Why `key` is unknown: its new name where it was renamed, else its likely spelling."""
    renamed = getattr(cls, "RENAMED_KEYS", {})
    if key in renamed:
        return f" (renamed: {renamed[key]})"
    return suggest(key, names, prefix + "{}")


def fill(cls, values, section: str | None = None):
    """Dataclass `cls` built from the dict `values` (an instance of `cls` passes through).

    section: where the dict came from, e.g. 'model' for a TOML table; errors then name keys
    as model.<key>. A class may map old key names to a hint in a `RENAMED_KEYS` dict.

    >>> from seqshard.models.config import TrainConfig
    >>> fill(TrainConfig, {"steps": 3}).steps
    3
    """
    if isinstance(values, cls):
        return values
    where = f"[{section}]" if section else cls.__name__
    if not isinstance(values, dict):
        raise ValueError(f"config {where} must be a table (dict) or a {cls.__name__}, "
                         f"got {values!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    prefix = f"{section}." if section else ""
    unknown = sorted(set(values) - set(names))
    if unknown:
        named = ", ".join(prefix + key + _hint(key, cls, names, prefix) for key in unknown)
        raise ValueError(f"unknown config key(s) {named}; {where} accepts "
                         f"{', '.join(sorted(names))}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}
    checked = {key: check_type(prefix + key, value, defaults.get(key))
               for key, value in values.items()}
    return cls(**checked)
