"""The strategy a search config names, over a problem's space (multi-budget over a range)."""

from __future__ import annotations

import numpy as np

from evosearch.problem import Problem
from evosearch.strategies import EvoPress, MultiBudgetEvoPress, RandomSearch

__all__ = ["make_strategy", "niches"]


def _sampled_range(budgets: list) -> tuple[int, int, int]:
    """``(low, high, step)`` of the budgets an Optuna sampler draws from (every group has the
    same range): the niches' span, on their grid when they are evenly spaced."""
    values = [b if isinstance(b, int) else min(b.values()) for b in budgets]
    steps = {b - a for a, b in zip(values, values[1:])}
    return values[0], values[-1], steps.pop() if len(steps) == 1 else 1


def niches(problem: Problem) -> tuple[list, list[str]] | None:
    """The budgets (and labels) of a multi-budget search, or ``None`` for a single budget."""
    hook = problem.entry.niches
    return None if hook is None else hook(problem.config.space.settings, problem.space)


def make_strategy(problem: Problem, name: str, initial=(), objectives=None):
    """The strategy ``name`` over the problem's space (multi-budget over a budget range)."""
    config, space = problem.config, problem.space
    budgets = niches(problem)
    if name not in ("evopress", "random"):
        from evosearch.optuna_strategy import OptunaStrategy, OptunaStrategyConfig

        sampler_config = OptunaStrategyConfig(
            sampler="random" if name == "optuna-random" else name,
            generations=config.strategy.loop.generations,
            batch_size=config.strategy.loop.offspring,
            tokens=config.strategy.sampler_tokens or config.stages[-1].tokens,
            budget_range=None if budgets is None else _sampled_range(budgets[0]),
        )
        return OptunaStrategy(
            space, config=sampler_config, seed=config.seed, objectives=objectives, initial=initial
        )
    rng = np.random.default_rng(config.seed)
    if name == "evopress" and budgets is not None:
        return MultiBudgetEvoPress(
            space,
            budgets=budgets[0],
            labels=budgets[1],
            config=config.evopress_config(),
            rng=rng,
            objectives=objectives,
            initial=initial,
            focus=config.strategy.budget_focus,
            anchors=space.range_uniform_genomes() if config.strategy.offset_steps else None,
        )
    cls = EvoPress if name == "evopress" else RandomSearch
    return cls(space, config=config.evopress_config(), rng=rng, initial=initial)
