"""``evosearch.run``: the whole search pipeline from Python, with a user's own fitness or space.

Example::

    import evosearch

    def score(model, batch):  # any fn(model, batch) -> float, lower is better
        out = model(input_ids=batch.input_ids, labels=batch.input_ids)
        return float(out.loss)

    results = evosearch.run(
        {"model": "smollm2-135m", "num_drop": 7, "generations": 4, "runner": "ray",
         "workers": 2},
        out="runs/mine",
        fitness=score,
    )
    print(results["best"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from evosearch.config import SearchConfig

__all__ = ["run"]


def _object_name(fitness: Any) -> str:
    """The name a user's fitness or space is recorded under in ``config.json``: its importable
    ``module:qualname`` when it has one (so the CLI can resume it), else ``custom:<name>``."""
    module = getattr(fitness, "__module__", None)
    qualname = getattr(fitness, "__qualname__", None) or type(fitness).__qualname__
    if module and module != "__main__" and "<" not in qualname:
        return f"{module}:{qualname}"
    return f"custom:{getattr(fitness, 'name', None) or getattr(fitness, '__name__', 'fitness')}"


def _config(config: SearchConfig | Mapping[str, Any] | str | Path) -> SearchConfig:
    if isinstance(config, SearchConfig):
        return config
    if isinstance(config, (str, Path)):
        import yaml

        config = yaml.safe_load(Path(config).read_text()) or {}
    return SearchConfig.from_dict(dict(config))


def run(
    config: SearchConfig | Mapping[str, Any] | str | Path,
    *,
    out: str | Path,
    fitness: Callable[..., float] | str | None = None,
    space: Callable[..., Any] | str | None = None,
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a search (run directory, resume, Optuna record, baselines, Pareto front, report,
    Ray workers) and return its results, as ``evosearch search`` does.

    Args:
        config: a :class:`SearchConfig`, a dict of its fields, or a YAML file of them.
        out: the run directory; a killed run there resumes (``resume=False``: fail instead).
        fitness: a registered name, ``module:attribute``, a fitness object (``name``,
            ``direction``, ``__call__(candidate, batch)``) or a plain ``fn(model, batch)``;
            objects travel to Ray workers pickled.
        space: a registered name or ``module:attribute`` of a space builder, or the builder
            (``build(ctx) -> SearchSpace``) itself.
        log: progress sink.
    """
    from evosearch.jobs.search import run_search

    config = _config(config)
    names = {}
    if isinstance(fitness, str):
        names["fitness"], fitness = fitness, None
    elif fitness is not None:
        names["fitness"] = _object_name(fitness)
    if isinstance(space, str):
        names["space"], space = space, None
    elif space is not None:
        names["space"] = _object_name(space)
    if names:
        config = dataclasses.replace(config, **names)
    resume = resume and (Path(out) / "config.json").is_file()
    return run_search(config, out, resume=resume, log=log, fitness=fitness, space=space)
