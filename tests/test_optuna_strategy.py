"""Optuna samplers as strategies: budget-exact decoding, determinism, resume, Pareto."""

from __future__ import annotations

import numpy as np
import pytest

from evosearch.genome import LevelSpec
from evosearch.optuna_strategy import SAMPLERS, OptunaStrategy, OptunaStrategyConfig, decode_keys
from evosearch.pareto import hypervolume, pareto_front
from search_spaces import LayerDropSpace


def _run(strategy, fitness, stop_after=None):
    while (request := strategy.ask()) is not None:
        strategy.tell(request, [fitness(g) for g in request.genomes])
        if stop_after is not None and strategy.generation == stop_after:
            return strategy
    return strategy


def _toy(genome):  # best: drop the lowest-index blocks
    return float(sum(i for i, v in enumerate(genome.levels) if v))


def test_decode_keys_meets_budgets_exactly_and_follows_keys():
    spec = LevelSpec(max_levels=(3, 3, 3, 0), groups=(0, 0, 0, 0), budgets={0: 4})
    g = decode_keys(spec, [0.9, 0.1, 0.45, 1.0], {0: 4})
    assert sum(g.levels) == 4 and g.levels[3] == 0
    assert g.levels[0] > g.levels[2] > g.levels[1]
    space = LayerDropSpace(8, num_drop=3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        keys = rng.random(8).tolist()
        g = decode_keys(space.spec, keys, {0: 3})
        assert space.spec.is_valid(g)
        assert {i for i, v in enumerate(g.levels) if v} == set(np.argsort(keys)[-3:].tolist())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_gives_valid_genomes_and_is_deterministic(sampler):
    space = LayerDropSpace(8, num_drop=3)
    config = OptunaStrategyConfig(sampler=sampler, generations=3, batch_size=4, tokens=8)
    a = _run(OptunaStrategy(space, config=config, seed=1), _toy)
    b = _run(OptunaStrategy(space, config=config, seed=1), _toy)
    assert a.history == b.history and len(a.history) == 4
    assert all(
        space.spec.is_valid(OptunaStrategy(space, config=config).decode(t.params))
        for t in a.study.trials
    )


def test_tpe_improves_on_its_first_batch():
    space = LayerDropSpace(12, num_drop=3)
    config = OptunaStrategyConfig(sampler="tpe", generations=12, batch_size=8, tokens=8)
    s = _run(OptunaStrategy(space, config=config, seed=0), _toy)
    assert s.history[-1]["value"] < s.history[0]["value"]


def test_resume_replays_to_the_same_trajectory():
    space = LayerDropSpace(10, num_drop=3)
    config = OptunaStrategyConfig(sampler="tpe", generations=5, batch_size=4, tokens=8)
    full = _run(OptunaStrategy(space, config=config, seed=3), _toy)
    half = _run(OptunaStrategy(space, config=config, seed=3), _toy, stop_after=3)
    resumed = OptunaStrategy(space, config=config, seed=3)
    resumed.load_state_dict(half.state_dict())
    _run(resumed, _toy)
    assert resumed.history == full.history
    assert resumed.best == full.best


def test_multi_objective_budget_range_and_pareto():
    space = LayerDropSpace(10, num_drop=6)
    config = OptunaStrategyConfig(
        sampler="nsga2", generations=6, batch_size=8, tokens=8, budget_range=(1, 6)
    )
    strategy = OptunaStrategy(
        space, config=config, seed=0, objectives=lambda g: (10 - sum(g.levels),)
    )
    _run(strategy, _toy)
    budgets = {sum(strategy.decode(t.params).levels) for t in strategy.study.trials}
    assert budgets <= set(range(1, 7)) and len(budgets) > 2
    front = strategy.pareto()
    assert len(front) >= 2
    points = [v for _, v in front]
    assert pareto_front(points) == list(range(len(points)))


def test_pareto_front_and_hypervolume_by_hand():
    pts = [(1, 5), (2, 2), (3, 3), (5, 1), (2, 2)]
    assert pareto_front(pts) == [0, 1, 3]
    # boxes against reference (6, 6): x in [1,2) h=1 ; [2,5) h=4 ; [5,6) h=5
    assert hypervolume(pts, (6, 6)) == pytest.approx(1 * 1 + 3 * 4 + 1 * 5)
    assert hypervolume([(7, 1)], (6, 6)) == 0.0
    cube = hypervolume([(0, 0, 0)], (1, 2, 3))
    assert cube == pytest.approx(6.0)


def test_encode_genome_round_trips_through_decode_keys():
    from evosearch.operators import random_genome
    from evosearch.optuna_strategy import encode_genome

    spec = LevelSpec(
        max_levels=(8, 8, 5, 0, 8, 3), groups=(0, 0, 0, 0, 1, 1), budgets={0: 9, 1: 6}
    )
    rng = np.random.default_rng(0)
    for _ in range(100):
        genome = random_genome(spec, rng)
        keys = encode_genome(spec, genome)
        assert all(0.0 <= k <= 1.0 for k in keys)
        assert decode_keys(spec, keys, spec.budgets) == genome


def test_initial_genomes_are_the_first_trials():
    space = LayerDropSpace(8, num_drop=3)
    warm = [space.from_dropped(blocks=[5, 6, 7]), space.from_dropped(blocks=[0, 3, 4])]
    config = OptunaStrategyConfig(sampler="tpe", generations=1, batch_size=4, tokens=8)
    strategy = OptunaStrategy(space, config=config, seed=0, initial=warm)
    assert list(strategy.ask().genomes[:2]) == warm
    with pytest.raises(ValueError, match="does not fit"):
        OptunaStrategy(space, config=config, initial=[space.from_dropped(blocks=[1])])
