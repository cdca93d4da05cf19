"""The strategy a search config names, over a problem's space (multi-budget over a range)."""

from __future__ import annotations

import numpy as np

from evosearch import registry
from evosearch.problem import Problem
from evosearch.strategies import EvoPress, MultiBudgetEvoPress, RandomSearch

__all__ = ["make_strategy", "niches"]


def _varying_groups(budgets: list) -> tuple[int, ...] | None:
    """The groups whose budget differs between the niches (``None``: every group, or
    integer budgets that set every group alike)."""
    if not budgets or not isinstance(budgets[0], dict):
        return None
    varying = tuple(g for g in sorted(budgets[0]) if len({b[g] for b in budgets}) > 1)
    return None if len(varying) == len(budgets[0]) else varying


def _sampled_range(budgets: list) -> tuple[int, int, int]:
    """``(low, high, step)`` of the budgets an Optuna sampler draws from (every sampled group
    has the same range): the niches' span, on their grid when they are evenly spaced."""
    groups = _varying_groups(budgets)
    values = [b if isinstance(b, int) else min(b[g] for g in (groups or b)) for b in budgets]
    steps = {b - a for a, b in zip(values, values[1:])}
    return values[0], values[-1], steps.pop() if len(steps) == 1 else 1


def niches(problem: Problem) -> tuple[list, list[str]] | None:
    """The budgets (and labels) of a multi-budget search, or ``None`` for a single budget."""
    hook = problem.entry.niches
    return None if hook is None else hook(problem.config.space.settings, problem.space)


def make_strategy(problem: Problem, name: str, initial=(), objectives=None):
    """The registered strategy ``name`` over the problem's space, built by its factory
    ``factory(problem, initial, objectives, budgets)`` (budgets: :func:`niches`)."""
    return registry.strategy(name)(problem, tuple(initial), objectives, niches(problem))


def _evopress(problem: Problem, initial, objectives, budgets):
    """EvoPress; multi-budget EvoPress (one elite per budget) over a budget range."""
    config, space = problem.config, problem.space
    rng = np.random.default_rng(config.seed)
    if budgets is None:
        return EvoPress(space, config=config.evopress_config(), rng=rng, initial=initial)
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


def _random(problem: Problem, initial, objectives, budgets):
    """Random search with EvoPress's racing and budget."""
    rng = np.random.default_rng(problem.config.seed)
    return RandomSearch(
        problem.space, config=problem.config.evopress_config(), rng=rng, initial=initial
    )


def _optuna(sampler: str):
    """A factory of the Optuna strategy with ``sampler`` (one fidelity per evaluation)."""

    def make(problem: Problem, initial, objectives, budgets):
        from evosearch.optuna_strategy import OptunaStrategy, OptunaStrategyConfig

        config = problem.config
        sampler_config = OptunaStrategyConfig(
            sampler=sampler,
            generations=config.strategy.loop.generations,
            batch_size=config.strategy.loop.offspring,
            tokens=config.strategy.sampler_tokens or config.stages[-1].tokens,
            budget_range=None if budgets is None else _sampled_range(budgets[0]),
            budget_groups=None if budgets is None else _varying_groups(budgets[0]),
        )
        return OptunaStrategy(
            problem.space,
            config=sampler_config,
            seed=config.seed,
            objectives=objectives,
            initial=initial,
        )

    return make


registry.register_strategy("evopress", _evopress)
registry.register_strategy("random", _random)
for _name in ("tpe", "nsga2", "nsga3", "cmaes"):
    registry.register_strategy(_name, _optuna(_name))
registry.register_strategy("optuna-random", _optuna("random"))
