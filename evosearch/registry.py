"""Registries: spaces, fitnesses, strategies and baselines by name, so a user's component goes
wherever the built-in ones go.

The built-in spaces (``search_spaces/``) and fitnesses (``fitness/``) register themselves from
their own packages; ``evosearch`` never imports them. They, and any third-party package, are
found through Python entry points (groups ``evosearch.spaces``, ``evosearch.fitness``,
``evosearch.strategies``, ``evosearch.baselines``): each entry point names a module, imported the
first time a registry is read, that calls the ``register_*`` functions below. A name of the form
``module:attribute`` (``my_fitness:score``) loads a user's object directly, without registering.

Example::

    from evosearch import register_fitness

    def score(model, batch):          # lower is better
        return float(model(batch.input_ids).logits.float().pow(2).mean())

    register_fitness("logit-energy", lambda: score)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "SpaceContext",
    "SpaceEntry",
    "baseline",
    "baselines_for",
    "fitness",
    "load_object",
    "register_baseline",
    "register_fitness",
    "register_space",
    "register_strategy",
    "space",
    "strategy",
]

GROUPS = ("evosearch.spaces", "evosearch.fitness", "evosearch.strategies", "evosearch.baselines")


@dataclass(frozen=True)
class SpaceContext:
    """What a space builder receives.

    Attributes:
        model: the dense model (builders must not change it).
        input_ids: ``(N, T)`` calibration tokens (level databases are keyed by them).
        config: the space's own settings (an instance of its registered config class).
        model_id: the model's name as the user gave it (for cache keys).
        db_dir: where level databases live (``None``: evosearch's cache).
        log: progress sink.
    """

    model: Any
    input_ids: Any
    config: Any = None
    model_id: str | None = None
    db_dir: str | None = None
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class SpaceEntry:
    """A registered space: ``build(ctx) -> SearchSpace`` plus what the engine needs to know.

    Attributes:
        build: called once per process (driver and each Ray worker) with a
            :class:`SpaceContext`.
        config: the frozen dataclass of the space's settings (``space:`` in a config file;
            validated when the run's config is built). ``None``: the space has none.
        objectives: metric names a multi-objective search may minimise beside the fitness.
        starts_uniform: EvoPress starts from ``space.uniform_genome()`` (level-switch spaces).
        check_model: ``check_model(config, model)`` raises for a budget the loaded model
            cannot meet, before the calibration data loads.
        needs_data: the builder reads the calibration tokens (level databases); ``False``
            lets ``export`` skip loading them.
        niches: ``niches(config, space) -> (budgets, labels) | None``: the budgets of a
            multi-budget search over a range the settings give (``None``: one budget).
        shrinks: the saved model is physically smaller (its size and speed are measured).
        range_starts: ``range_starts(problem, warm_start, log) -> (first, last, {name:
            genome})``: start genomes of a multi-budget search that go before and after the
            other warm-start heuristics, and the heuristics it computed per budget itself
            (named as baselines, ``None`` where it has none; the others are computed as usual).
    """

    build: Callable[[SpaceContext], Any]
    config: type | None = None
    objectives: tuple[str, ...] = ()
    starts_uniform: bool = False
    check_model: Callable[[Any, Any], None] | None = None
    needs_data: bool = True
    niches: Callable[[Any, Any], tuple[list, list[str]] | None] | None = None
    shrinks: bool = False
    range_starts: Callable[[Any, tuple[str, ...], Any], tuple[tuple, tuple, dict]] | None = None


_SPACES: dict[str, SpaceEntry] = {}
_FITNESS: dict[str, Callable[..., Any]] = {}
_STRATEGIES: dict[str, Callable[..., Any]] = {}
_BASELINES: dict[tuple[str, str], Callable[..., Any]] = {}
_loaded: set[str] = set()


def _load_plugins(group: str) -> None:
    """Import every module that an entry point of ``group`` names (once per process)."""
    if group in _loaded:
        return
    _loaded.add(group)
    for entry in metadata.entry_points(group=group):
        try:
            entry.load()
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not hide the others
            print(
                f"evosearch: warning: plugin {entry.name} ({entry.value}): {exc}", file=sys.stderr
            )


def register_space(name: str, build: Callable[[SpaceContext], Any], **options: Any) -> None:
    """Register a search space builder under ``name``; ``options`` are the other fields of
    :class:`SpaceEntry` (its config class, objectives, hooks)."""
    _SPACES[name] = SpaceEntry(build, **options)


def register_fitness(name: str, factory: Callable[..., Any]) -> None:
    """Register ``factory() -> fitness`` under ``name``; the fitness may be any object with
    ``name``/``direction``/``__call__(candidate, batch)`` or a plain ``fn(model, batch)``."""
    _FITNESS[name] = factory


def register_strategy(name: str, factory: Callable[..., Any]) -> None:
    """Register ``factory(problem, initial, objectives, budgets) -> strategy`` (an ask/tell
    :class:`~evosearch.strategy.Strategy`; ``budgets`` is ``(budgets, labels)`` over a budget
    range, else ``None``)."""
    _STRATEGIES[name] = factory


def register_baseline(space_name: str, name: str, compute: Callable[..., Any]) -> None:
    """Register ``compute(problem, settings, log) -> Genome``: a heuristic of one space."""
    _BASELINES[(space_name, name)] = compute


def _lookup(table: dict, group: str, name: str, what: str):
    _load_plugins(group)
    if name in table:
        return table[name]
    known = sorted(table) or ["none: is evosearch installed (pip install -e .)?"]
    raise ValueError(f"unknown {what} {name!r}; choose from {known} or give module:attribute")


def space(name: str) -> SpaceEntry:
    """The registered space ``name``, or a ``module:attribute`` naming a builder (a callable
    ``build(ctx)``, or a :class:`SpaceEntry`)."""
    if ":" in name:
        obj = load_object(name)
        return obj if isinstance(obj, SpaceEntry) else SpaceEntry(obj)
    return _lookup(_SPACES, "evosearch.spaces", name, "space")


def fitness(name: str, **kwargs: Any) -> Any:
    """A new fitness of the registered ``name`` (its factory called with ``kwargs``), or the
    object ``module:attribute`` names."""
    if ":" in name:
        return load_object(name)
    return _lookup(_FITNESS, "evosearch.fitness", name, "fitness")(**kwargs)


def strategy(name: str) -> Callable[..., Any]:
    """The registered strategy factory ``name`` (or ``module:attribute``)."""
    if ":" in name:
        return load_object(name)
    return _lookup(_STRATEGIES, "evosearch.strategies", name, "strategy")


def strategies() -> tuple[str, ...]:
    """Names of every registered strategy."""
    _load_plugins("evosearch.strategies")
    return tuple(_STRATEGIES)


def baseline(space_name: str, name: str) -> Callable[..., Any]:
    """The registered heuristic ``name`` of the space ``space_name``."""
    _load_plugins("evosearch.baselines")
    _load_plugins("evosearch.spaces")
    if (space_name, name) not in _BASELINES:
        raise ValueError(
            f"unknown baseline {name!r} for the {space_name} space; choose from "
            f"{baselines_for(space_name)}"
        )
    return _BASELINES[(space_name, name)]


def baselines_for(space_name: str) -> tuple[str, ...]:
    """Names of the baselines registered for ``space_name``, in registration order."""
    _load_plugins("evosearch.baselines")
    _load_plugins("evosearch.spaces")
    return tuple(n for s, n in _BASELINES if s == space_name)


def spaces() -> tuple[str, ...]:
    """Names of every registered space."""
    _load_plugins("evosearch.spaces")
    return tuple(_SPACES)


def load_object(spec: str) -> Any:
    """The object ``module:attribute`` names (``module`` may also be a ``.py`` file path).

    The module is looked up on ``sys.path`` and then in the working directory, where a user's
    own file usually sits.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected module:attribute, got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{module_name} not found (from {spec!r})")
        _add_path(str(path.parent))
        module_name = path.stem
    else:
        _add_path(str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} (from {spec!r}): {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def _add_path(folder: str) -> None:
    """Make ``folder`` importable here and in worker processes started after this call."""
    import os

    if folder not in sys.path:
        sys.path.append(folder)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([*parts, folder])
