"""Frozen config dataclasses from plain dicts (YAML, JSON, flags) and back, checked by type.

``build(cls, values, where)`` names the offending key by its dotted path (``strategy.loop
.generations``) for an unknown key or a value of the wrong type, before the dataclass's own
``__post_init__`` checks ranges. ``to_plain`` turns a config back into JSON-able dicts and
lists, as saved in ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

__all__ = ["build", "check_types", "to_plain"]

_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def to_plain(obj: Any) -> Any:
    """A JSON-able copy of ``obj`` (dataclasses become dicts, tuples lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj))


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (scalars, optionals, tuples, dicts)."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_kind_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        return isinstance(value, (tuple, list))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # nested dataclasses and other types are checked by their own builders


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return text.replace("<class '", "").replace("'>", "")


def check_types(obj: Any, where: str = "") -> None:
    """Raise ``ValueError`` naming the first field of dataclass ``obj`` whose value does not
    fit its annotation (e.g. ``num_drop: "two"`` or ``generations: 2.7``)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _kind_ok(value, hints[f.name]):
            raise ValueError(
                f"{where}{f.name} must be {_describe(hints[f.name])}, got {value!r} "
                f"({type(value).__name__})"
            )
        if isinstance(value, (tuple, list)) and not isinstance(value, str):
            _check_items(f.name, value, hints[f.name], where)


def _check_items(name: str, value, hint, where: str) -> None:
    """Items of a ``tuple[int, ...]``-like field have the item type (not a string's letters)."""
    for h in typing.get_args(hint) or (hint,):
        args = [a for a in typing.get_args(h) if a is not Ellipsis]
        if typing.get_origin(h) is tuple and len(args) == 1 and args[0] in (int, float, str):
            if bad := [v for v in value if not _kind_ok(v, args[0])]:
                raise ValueError(
                    f"{where}{name} must hold {args[0].__name__} values, got {bad[0]!r}"
                )


def build(cls, values: Any, where: str = "") -> Any:
    """``cls(**values)`` for a frozen config dataclass, naming unknown keys and wrong types
    by their path (``where`` is the prefix, e.g. ``"space."``)."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"{where.rstrip('.') or cls.__name__} must be a mapping, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    if unknown := sorted(set(values) - fields):
        raise ValueError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(where + k for k in unknown)}; valid: {sorted(fields)}"
        )
    hints = _hints(cls)
    for key, value in values.items():
        if not _kind_ok(value, hints[key]):
            raise ValueError(
                f"{where}{key} must be {_describe(hints[key])}, got {value!r} "
                f"({type(value).__name__})"
            )
    obj = cls(**values)
    check_types(obj, where)
    return obj
