"""A :class:`Problem`: one model, its calibration data and dense cache, a space and a fitness.

Everything a search evaluates goes through a Problem, in this process or rebuilt in a Ray worker
by a :class:`WorkerRecipe`, so a user's fitness or space reaches every route the built-in ones
reach. Spaces and fitnesses come from :mod:`evosearch.registry` by name (or ``module:attribute``),
or are given as objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from evosearch import registry
from evosearch.arch import get_blocks
from evosearch.data import TokenData, load_token_data
from evosearch.engine import Evaluator, sample_batch
from evosearch.evaluation import Batch, as_fitness
from evosearch.forward import compute_dense_cache
from evosearch.genome import Genome
from evosearch.models import load_model
from evosearch.validate import resolve_device

__all__ = ["Problem", "WorkerRecipe", "build_fitness", "build_space", "make_runner"]


def user_object(name: str, what: str):
    """The object a ``module:attribute`` name gives (``None`` for a registered name), loaded
    once in the driver so that it reaches Ray workers pickled (by value)."""
    if name.startswith("custom:"):
        raise ValueError(
            f"this run's {what} was a Python object ({name}); resume it with "
            f"evosearch.run(..., {what}=<the object>)"
        )
    return registry.load_object(name) if ":" in name else None


def build_space(config, model, input_ids, log: Callable[[str], None] = print, space=None):
    """The search space of ``config`` (``space``: a builder or entry overriding the name)."""
    entry = space_entry(config, space)
    ctx = registry.SpaceContext(
        model=model,
        input_ids=input_ids,
        config=config.space.settings,
        model_id=config.model,
        db_dir=config.db_dir,
        log=log,
    )
    return entry.build(ctx)


def space_entry(config, space=None) -> registry.SpaceEntry:
    """The registry entry of the run's space (``space`` overrides ``config.space``)."""
    if space is None:
        return config.space.entry()
    return space if isinstance(space, registry.SpaceEntry) else registry.SpaceEntry(space)


def build_fitness(config, fitness=None):
    """The fitness of ``config`` (``fitness``: an object or callable overriding the name),
    wrapped for training-aware selection when the config asks for it."""
    fit = (
        fitness
        if fitness is not None
        else registry.fitness(config.fitness, **config.fitness_options)
    )
    fit = as_fitness(fit() if isinstance(fit, type) else fit)  # a class: its instance
    if config.selection_training is not None:
        from evosearch.training_aware import TrainingAware

        schedule = dict(enumerate(config.selection_training.tokens))
        fit = TrainingAware(fit, schedule, config.train_config())
    return fit


class Problem:
    """The loaded model, calibration data, dense cache, space and fitness of one config.

    Args:
        config: a :class:`~evosearch.config.SearchConfig`.
        log: progress sink.
        fitness: a fitness object or ``fn(model, batch) -> float`` used instead of the
            config's fitness name.
        space: a space builder (``build(ctx) -> SearchSpace``) used instead of the config's.
    """

    def __init__(self, config, log: Callable[[str], None] = print, *, fitness=None, space=None):
        self.config, self.log = config, log
        fitness = fitness if fitness is not None else user_object(config.fitness, "fitness")
        space = space if space is not None else user_object(config.space.name, "space")
        self._fitness_override, self._space_override = fitness, space
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_model(config.model, device=resolve_device(config.device))
        n_blocks = len(get_blocks(self.model))
        n_params = sum(p.numel() for p in self.model.parameters()) / 1e6
        log(f"model {config.model}: {n_blocks} blocks, {n_params:.1f}M parameters "
            f"({time.perf_counter() - t0:.1f}s)")  # fmt: skip
        self.entry = space_entry(config, space)
        if self.entry.check_model is not None:  # an impossible budget fails before data loads
            self.entry.check_model(config.space.settings, self.model)
        t0 = time.perf_counter()
        self.data: TokenData = load_token_data(config.data_spec(), self.tokenizer, self.model)
        log(f"calibration data: {self.data.description} ({time.perf_counter() - t0:.1f}s)")
        self.space = build_space(config, self.model, self.data.input_ids, log, space)
        t0 = time.perf_counter()
        self.dense = compute_dense_cache(
            self.model, self.data.input_ids, prefix_reuse=config.prefix_reuse, dtype=config.dtype
        )
        self.cache_seconds = time.perf_counter() - t0
        log(
            f"dense cache: teacher {self.dense.teacher_bytes_per_token()} B/token, prefix "
            f"{self.dense.prefix_bytes_per_token()} B/token ({self.cache_seconds:.1f}s)"
        )
        self.fitness = build_fitness(config, fitness)
        if hasattr(self.fitness, "prepare"):
            self.fitness.prepare(self.model, self.data.input_ids, self.dense)

    def evaluator(self) -> Evaluator:
        """A fresh memoising evaluator of this problem on the resident model."""
        return Evaluator(
            self.model,
            self.space,
            self.fitness,
            self.dense,
            prefix_reuse=self.config.prefix_reuse,
            parent_reuse=self.config.parent_reuse,
        )

    def full_batch(self) -> Batch:
        """Every calibration sequence as one batch (no stage: the final comparison)."""
        return Batch(tuple(range(self.data.n_sequences)), self.data.input_ids)

    def evaluate(
        self, genome: Genome, *, tokens: int | None = None, generation: int = 0, stage: int = 0
    ) -> float:
        """The fitness of ``genome`` at an explicit fidelity: ``tokens`` calibration tokens of
        the batch of ``(generation, stage)`` (``None``: all tokens), in its own direction."""
        if tokens is None:
            batch = self.full_batch()
        else:
            batch = sample_batch(
                self.data, tokens, seed=self.config.seed, generation=generation, stage=stage
            )
        return self.evaluator().raw(genome, batch)

    def recipe(self) -> WorkerRecipe:
        """How a worker process rebuilds this problem's evaluator."""
        return WorkerRecipe(self.config, self._fitness_override, self._space_override)


@dataclass(frozen=True)
class WorkerRecipe:
    """How a Ray worker rebuilds a problem's evaluator: it loads the model itself and takes the
    calibration tokens and the dense cache from the object store (computed once, by the driver).
    A user's fitness or space object travels pickled; names are looked up in the registry.

    Called as ``recipe(input_ids=..., dense=...)`` in each worker; returns an
    :class:`~evosearch.engine.Evaluator`.
    """

    config: Any
    fitness: Any = None
    space: Any = None

    def __call__(self, *, input_ids: torch.Tensor, dense) -> Evaluator:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per worker would drown the search's log
        hf_logging.set_verbosity_error()
        config = self.config
        model, _ = load_model(config.model, device=resolve_device(config.device))
        space = build_space(config, model, input_ids, lambda _: None, self.space)
        fitness = build_fitness(config, self.fitness)
        if hasattr(fitness, "prepare"):
            fitness.prepare(model, input_ids, dense)
        return Evaluator(
            model,
            space,
            fitness,
            dense,
            prefix_reuse=config.prefix_reuse,
            parent_reuse=config.parent_reuse,
        )


def make_runner(problem: Problem, log: Callable[[str], None] = print):
    """The runner ``problem.config.runner`` names (a started pool, for ``ray``)."""
    from evosearch.runners import InProcessRunner, RayRunner

    config = problem.config
    if config.runner.name == "inprocess":
        return InProcessRunner()
    t0 = time.perf_counter()
    _ship_by_value(problem._fitness_override, problem._space_override)
    runner = RayRunner(
        problem.recipe(),
        shared={"input_ids": problem.data.input_ids, "dense": problem.dense},
        config=config.ray_config(),
    )
    ray = config.ray_config()
    where = ray.address or "a local Ray instance"
    log(
        f"ray: {ray.workers} workers on {len(set(runner.worker_nodes()))} node(s) of {where}, "
        f"{ray.num_cpus} CPUs and {ray.num_gpus} GPUs each, started in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return runner


def _ship_by_value(*objects) -> None:
    """Let Ray pickle a user's objects with their module's code, so workers need not import
    the user's file (it may sit in a folder only the driver has on its path)."""
    import sys

    import ray.cloudpickle

    for obj in objects:
        module = sys.modules.get(getattr(obj, "__module__", None) or "")
        top = (getattr(module, "__name__", "") or "").split(".")[0]
        if module is not None and top not in ("evosearch", "search_spaces", "fitness"):
            if "site-packages" not in (getattr(module, "__file__", "") or ""):
                ray.cloudpickle.register_pickle_by_value(module)
