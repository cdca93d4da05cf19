"""Frozen config dataclasses from plain dicts (YAML, JSON, flags) and back.

``build(cls, values, where)`` names the offending key by its dotted path (``strategy.loop
.generations``) for an unknown key or a value of the wrong type (checked with
:func:`evosearch.validate.matches`), before the dataclass's own ``__post_init__`` checks ranges.
``to_plain`` turns a config back into JSON-able dicts and lists, as saved in ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from evosearch.errors import UserError
from evosearch.validate import _got as shown
from evosearch.validate import check_fields, describe_type, matches

__all__ = ["build", "to_plain"]


def to_plain(obj: Any) -> Any:
    """A JSON-able copy of ``obj`` (dataclasses become dicts, tuples lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj))


def build(cls, values: Any, where: str = "") -> Any:
    """``cls(**values)`` for a frozen config dataclass, naming unknown keys and wrong types
    by their path (``where`` is the prefix, e.g. ``"space."``)."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise UserError(
            "invalid config value", where.rstrip(".") or cls.__name__, "expected a mapping"
        )
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    if unknown := sorted(set(values) - fields):
        raise UserError(
            "unknown config key" + ("s" if len(unknown) > 1 else ""),
            ", ".join(where + k for k in unknown),
            f"valid keys here: {', '.join(sorted(fields))}",
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not matches(value, hints[key]):
            hint = ""
            if isinstance(value, str) and typing.get_origin(hints[key]) in (tuple, list):
                hint = f"; write a list, e.g. [{value}]"
            raise UserError(
                "invalid config value",
                where + key,
                f"expected {describe_type(hints[key])}, got {shown(value)}{hint}",
            )
    obj = cls(**values)
    check_fields(obj, where=where)
    return obj
