"""Check a config dataclass's values against its type annotations, naming the key.

YAML and the command line both hand a config loose values: ``num_drop: "two"``,
``generations: 2.7`` or ``baselines: shortgpt`` (a string where a list belongs, which Python
would otherwise split into letters). :func:`check_fields` rejects them when the config is
built, with one :class:`~evosearch.errors.UserError` naming the key; call it first in a config's
``__post_init__``.

Example:
    >>> @dataclass(frozen=True)
    ... class C:
    ...     n: int = 1
    ...     def __post_init__(self):
    ...         check_fields(self)
    >>> C(n=2.5)  # doctest: +SKIP
    UserError: invalid config value (n): expected int, got 2.5 (a float)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any

from evosearch.errors import UserError

__all__ = [
    "check_device",
    "check_fields",
    "check_loop",
    "check_range",
    "check_storage_url",
    "describe_type",
    "fitness_value",
    "matches",
]


def describe_type(tp: Any) -> str:
    """A short human name of an annotation: ``int | None``, ``list of int``..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(a) for a in args)
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {describe_type(args[0])}"
        return f"list [{', '.join(describe_type(a) for a in inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits annotation ``tp`` (a list is accepted for a tuple; an int for a
    float; a bool for nothing but bool; unknown annotations accept anything)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # numpy integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        )
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(map(matches, value, args)))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _got(value: Any) -> str:
    kind = type(value).__name__
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{value!r} (a {kind})"


def check_fields(obj: Any, *, where: str = "") -> None:
    """Raise a :class:`UserError` naming the first field of dataclass instance ``obj`` whose
    value does not fit its annotation. ``where`` prefixes the key (e.g. ``"width."``)."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        tp = hints.get(field.name, Any)
        value = getattr(obj, field.name)
        if not matches(value, tp):
            hint = ""
            if isinstance(value, str) and typing.get_origin(tp) in (tuple, list):
                hint = f"; write a list, e.g. [{value}]"
            raise UserError(
                "invalid config value",
                f"{where}{field.name}",
                f"expected {describe_type(tp)}, got {_got(value)}{hint}",
            )


def check_range(key: str, value: Any, ok: bool, expected: str) -> None:
    """Raise a :class:`UserError` for config key ``key`` unless ``ok``.

    Example: ``check_range("seed", seed, seed >= 0, ">= 0")``.
    """
    if not ok:
        raise UserError("invalid config value", key, f"expected {expected}, got {value!r}")


STORAGE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql")


def check_storage_url(url: str | None, key: str = "storage") -> None:
    """Reject an Optuna storage URL no backend can open, before anything is written."""
    if url is None or url.startswith("journal:"):
        if url is not None and not url.removeprefix("journal:"):
            raise UserError("invalid storage", key, "journal: needs a file path, journal:PATH")
        return
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.split("+")[0] not in STORAGE_SCHEMES:
        raise UserError(
            "invalid storage",
            key,
            f"{url!r} is not an Optuna storage URL; use sqlite:///FILE, postgresql://..., "
            "mysql://... or journal:PATH",
        )


def check_device(device: str, key: str = "device") -> None:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``, and CUDA only where it exists."""
    import torch

    name, _, index = device.partition(":")
    if name not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise UserError(
            "invalid device", key, f"expected auto, cpu, cuda or cuda:N, got {device!r}"
        )
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                "invalid device", key, f"{device!r} requested but CUDA is not available"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(
                "invalid device", key, f"{device!r}: only {torch.cuda.device_count()} CUDA devices"
            )


def resolve_device(device: str, key: str = "device"):
    """The ``torch.device`` of a checked device name: ``auto`` is CUDA when available, else
    the CPU (see :func:`check_device`)."""
    import torch

    check_device(device, key)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_loop(loop: Any, where: str = "strategy.loop.") -> None:
    """Orderings of an EvoPress loop (:class:`~evosearch.strategies.EvoPressConfig`) that its
    types alone do not catch: survivors within the offspring, token counts that grow and
    survivors that shrink from stage to stage."""
    stages = [(s.tokens, s.survivors) for s in loop.stages]
    key = f"{where}stages"
    for _, survivors in stages:
        check_range(
            key, stages, survivors <= loop.offspring, f"survivors <= offspring ({loop.offspring})"
        )
    tokens = [t for t, _ in stages]
    check_range(
        key, stages, tokens == sorted(tokens), "token counts that grow from stage to stage"
    )
    survivors = [s for _, s in stages]
    check_range(
        key,
        stages,
        survivors == sorted(survivors, reverse=True),
        "survivors that shrink from stage to stage",
    )


def fitness_value(value: Any, name: str) -> float:
    """The float a fitness returned; a :class:`UserError` naming the fitness for anything that
    is not a number (``None``, the string ``"0.5"``, a bool), so a bug in a user's fitness
    stops the search with one line instead of being read as a value."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(
            "bad fitness value",
            f"fitness {name}",
            f"expected a number, got {_got(value)}",
        )
    return float(value)
