"""Every strategy keeps the Strategy contract (evosearch.testing.strategy), genome type aside."""

from __future__ import annotations

import numpy as np
import pytest

from evosearch.gp import GeneticProgramming, GPConfig, Grammar
from evosearch.optuna_strategy import OptunaStrategy, OptunaStrategyConfig
from evosearch.strategies import EvoPress, EvoPressConfig, MultiBudgetEvoPress, RandomSearch, Stage
from evosearch.strategy import Strategy
from evosearch.symbolic import KNOWN_METRICS, parse
from evosearch.testing.strategy import CHECKS
from search_spaces import LayerDropSpace

SPACE = LayerDropSpace(8, num_drop=3)
EVOPRESS = EvoPressConfig(
    generations=3,
    offspring=6,
    initial_population=6,
    stages=(Stage(tokens=16, survivors=3), Stage(tokens=64, survivors=2)),
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


STRATEGIES = {
    "evopress": lambda seed: EvoPress(SPACE, config=EVOPRESS, rng=_rng(seed)),
    "random": lambda seed: RandomSearch(SPACE, config=EVOPRESS, rng=_rng(seed)),
    "multi-budget": lambda seed: MultiBudgetEvoPress(
        SPACE, budgets=[2, 3, 4], config=EVOPRESS, rng=_rng(seed)
    ),
    "optuna-tpe": lambda seed: OptunaStrategy(
        SPACE, config=OptunaStrategyConfig(sampler="tpe", generations=2, batch_size=4), seed=seed
    ),
    "optuna-nsga2": lambda seed: OptunaStrategy(
        SPACE,
        config=OptunaStrategyConfig(sampler="nsga2", generations=2, batch_size=4),
        seed=seed,
    ),
    "gp": lambda seed: GeneticProgramming(
        GPConfig(population=6, generations=3, grammar=Grammar(max_depth=4, max_size=9)),
        rng=_rng(seed),
        seeds=[parse(KNOWN_METRICS["wanda"])],
    ),
}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_keeps_the_contract(name, check):
    check(STRATEGIES[name])


def test_a_broken_strategy_fails_the_contract():
    """The checks can fail: a strategy whose tell ignores a wrong number of values."""

    class Lenient(EvoPress):
        def tell(self, request, values):
            super().tell(request, list(values)[: len(request.genomes)])

    make = lambda seed: Lenient(SPACE, config=EVOPRESS, rng=_rng(seed))  # noqa: E731
    assert isinstance(make(0), Strategy)
    check = dict((c.__name__, c) for c in CHECKS)["check_tell_refuses_a_wrong_answer"]
    with pytest.raises(AssertionError, match="accepted"):
        check(make)
