"""MultiBudgetEvoPress: one elite per budget, offspring carried between neighbouring budgets,
driven by a pure Python loop (no model, no data)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_strategies import ADAPTIVE, WIDE, _trace, drive

from evosearch.operators import budget_step
from evosearch.pareto import pareto_front
from evosearch.strategies import EvoPress, EvoPressConfig, MultiBudgetEvoPress, Stage
from search_spaces import LayerDropSpace

SPACE = LayerDropSpace(12, num_drop=6)
SUBLAYERS = LayerDropSpace(8, num_drop=4, sublayers=True)
# Each block's damage; the optimum at budget b drops the b cheapest blocks (nested sets).
DAMAGE = [0.9, 0.1, 0.7, 0.3, 1.3, 0.2, 1.1, 0.5, 0.4, 1.7, 0.6, 0.8]
CONFIG = EvoPressConfig(
    generations=50,
    offspring=8,
    initial_population=6,
    stages=(Stage(tokens=16, survivors=3), Stage(tokens=64, survivors=1)),
)


def damage(genome, request=None) -> float:
    return float(sum(d for d, v in zip(DAMAGE, genome.levels) if v))


def optimum(b: int) -> float:
    return float(sum(sorted(DAMAGE)[:b]))


def multi(seed=0, config=CONFIG, space=SPACE, budgets=range(2, 7), **kwargs):
    return MultiBudgetEvoPress(
        space,
        budgets=list(budgets),
        config=config,
        rng=np.random.default_rng(seed),
        objectives=lambda g: (12.0 - sum(g.levels),),  # blocks kept
        **kwargs,
    )


def test_budget_step_moves_every_group_by_one_level():
    rng = np.random.default_rng(0)
    genome = SUBLAYERS.random_genome(rng)
    spec = SUBLAYERS.spec
    for delta in (1, -1):
        out = budget_step(genome, spec, rng, delta)
        for g in spec.budgets:
            units = spec.units_of(g)
            assert (
                sum(out.levels[u] for u in units) == sum(genome.levels[u] for u in units) + delta
            )
        assert sum(abs(a - b) for a, b in zip(out.levels, genome.levels)) == len(spec.budgets)
    full = SPACE.from_dropped(blocks=range(12))
    with pytest.raises(ValueError, match="no unit"):
        budget_step(full, SPACE.spec, rng, 1)


def test_first_generation_covers_every_budget():
    strategy = multi()
    request = strategy.ask()
    niches = [strategy.niche_of(g) for g in request.genomes]
    assert set(niches) == {0, 1, 2, 3, 4}
    assert {sum(g.levels) for g in request.genomes} == {2, 3, 4, 5, 6}
    assert len(set(request.genomes)) == len(request.genomes)
    drive(strategy, damage, stop_after_generation=0)
    assert sorted(strategy.elites) == [0, 1, 2, 3, 4]
    assert list(strategy.history[0]["niches"]) == ["2", "3", "4", "5", "6"]
    note = strategy.progress_note()
    assert note.startswith("budgets 5/5 [2: ") and note.count(":") == 5


def test_every_budget_reaches_its_optimum_and_the_front_is_exact():
    strategy = multi()
    log = drive(strategy, damage)
    for n, b in enumerate(range(2, 7)):
        genome = strategy.elites[n][0].genome
        assert sum(genome.levels) == b  # the niche's budget, exactly
        assert strategy.elites[n][0].value == pytest.approx(optimum(b))
    front = strategy.pareto()
    assert [round(v[0], 6) for _, v in front] == [round(optimum(b), 6) for b in range(2, 7)]
    assert pareto_front([v for _, v in front]) == list(range(len(front)))
    assert strategy.best[1] == pytest.approx(optimum(2))
    # every genome asked for lies in the range and keeps both its groups' budgets equal
    assert all(strategy.niche_of(g) is not None for r, _ in log for g in r.genomes)
    values = [h["value"] for h in strategy.history]
    assert values == sorted(values, reverse=True)  # elitism per niche


def test_sublayer_space_keeps_one_budget_for_both_groups():
    strategy = multi(space=SUBLAYERS, budgets=(1, 2, 3))
    log = drive(strategy, lambda g, r=None: float(sum(i * v for i, v in enumerate(g.levels))))
    spec = SUBLAYERS.spec
    for request, _ in log:
        for g in request.genomes:
            sums = {sum(g.levels[u] for u in spec.units_of(k)) for k in spec.budgets}
            assert len(sums) == 1 and sums.pop() in (1, 2, 3)


def test_sharing_between_budgets_beats_independent_runs_at_equal_evaluations():
    """The point of a multi-budget search: on a fitness whose optima are nested, five budgets
    searched together end closer to their optima than five separate EvoPress runs that make
    the same number of fitness calls (summed over 8 seeds, so luck does not decide)."""
    config = EvoPressConfig(
        generations=8, offspring=4, initial_population=5, stages=(Stage(tokens=1, survivors=1),)
    )
    shared_gap = separate_gap = 0.0
    for seed in range(8):
        strategy = multi(seed, config)
        calls = sum(len(r.genomes) for r, _ in drive(strategy, damage))
        shared_gap += sum(strategy.elites[n][0].value - optimum(n + 2) for n in range(5))
        share = calls // 5  # per budget; a run makes 1 call, then 2 per generation
        single = EvoPressConfig(
            generations=(share - 1) // 2, offspring=1, initial_population=1, stages=config.stages
        )
        for b in range(2, 7):
            run = EvoPress(
                LayerDropSpace(12, num_drop=b), config=single, rng=np.random.default_rng(seed)
            )
            assert sum(len(r.genomes) for r, _ in drive(run, damage)) <= share
            separate_gap += run.best[1] - optimum(b)
    assert shared_gap < separate_gap


def test_resume_continues_identically():
    full = multi(5)
    full_log = drive(full, damage)
    first = multi(5)
    head = drive(first, damage, stop_after_generation=3)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = multi(99)
    resumed.load_state_dict(state)
    tail = drive(resumed, damage)
    assert _trace(head + tail) == _trace(full_log)
    assert resumed.history == full.history
    assert resumed.pareto() == full.pareto()


def test_uneven_niches_step_by_the_budget_difference():
    """Niches need not be one level apart (a sparsity range has hundreds of levels between
    neighbours): stepping moves a neighbour's elite by the whole difference."""
    strategy = multi(budgets=(1, 4, 8), config=CONFIG)
    log = drive(strategy, damage)
    assert {sum(g.levels) for r, _ in log for g in r.genomes} == {1, 4, 8}
    assert [sum(strategy.elites[n][0].genome.levels) for n in range(3)] == [1, 4, 8]
    assert strategy.elites[2][0].value == pytest.approx(optimum(8))


def test_budget_step_with_per_group_deltas():
    rng = np.random.default_rng(1)
    spec = SUBLAYERS.spec
    genome = SUBLAYERS.random_genome(rng)
    out = budget_step(genome, spec, rng, {0: 3, 1: -2})
    sums = [sum(out.levels[u] for u in spec.units_of(g)) for g in (0, 1)]
    assert sums == [4 + 3, 4 - 2]
    with pytest.raises(ValueError, match="unknown groups"):
        budget_step(genome, spec, rng, {7: 1})


def test_bad_budgets_and_initial_genomes_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        multi(budgets=(2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        multi(budgets=(2, 13))
    with pytest.raises(ValueError, match="none of the budgets"):
        multi(initial=[SPACE.from_dropped(blocks=[0])])
    with pytest.raises(ValueError, match="name the groups"):
        multi(budgets=({5: 2},))
    zero = dataclasses.replace(CONFIG, initial_population=0)
    starts = [SPACE.from_dropped(blocks=range(n)) for n in (2, 3)]
    with pytest.raises(ValueError, match=r"every budget; none at \['4', '5', '6'\]"):
        multi(config=zero, initial=starts)
    request = multi(config=zero, budgets=(2, 3), initial=starts).ask()
    assert request.genomes == tuple(starts)


def test_guided_step_moves_toward_the_guide():
    rng = np.random.default_rng(3)
    low = SPACE.from_dropped(blocks=[1, 5])
    guide = SPACE.from_dropped(blocks=[1, 3, 5, 8])
    for _ in range(20):
        up = budget_step(low, SPACE.spec, rng, 1, guide)
        assert set(SPACE.dropped(up)[0]) - {1, 5} <= {3, 8}
        down = budget_step(guide, SPACE.spec, rng, -2, low)
        assert set(SPACE.dropped(down)[0]) == {1, 5}
    # once the guide offers nothing more, any unit may move
    beyond = budget_step(guide, SPACE.spec, rng, 1, low)
    assert sum(beyond.levels) == 5


@pytest.mark.parametrize("lazy", [True, False])
def test_parents_race_in_the_final_stage_or_in_every_stage(lazy):
    strategy = multi(1, lazy_parents=lazy)
    drive(strategy, damage, stop_after_generation=0)
    elites = {m.genome for ms in strategy.elites.values() for m in ms}
    first = strategy.ask()
    assert (first.generation, first.stage) == (1, 0)
    assert bool(elites & set(first.genomes)) is not lazy  # lazy: offspring only
    strategy.tell(first, [damage(g) for g in first.genomes])
    final = strategy.ask()
    assert final.stage == 1
    challengers = [g for g in final.genomes if g not in elites]
    niches = {strategy.niche_of(g) for g in challengers}
    # every surviving challenger meets its niche's elite on the final tokens; re-raced
    # parents of niches whose challengers all lost stay in the pool too
    raced = {strategy.niche_of(g) for g in final.genomes if g in elites}
    assert raced == niches if lazy else raced >= niches


def test_focus_serves_the_budgets_in_turn():
    strategy = multi(focus=2)
    log = drive(strategy, damage, stop_after_generation=6)
    served = {}
    for request, _ in log:
        if request.generation > 0 and request.stage == 0:
            served[request.generation] = {strategy.niche_of(g) for g in request.genomes}
    # generation g serves niches 2(g-1), 2(g-1)+1 modulo 5: each niche equally often
    assert served == {1: {0, 1}, 2: {2, 3}, 3: {4, 0}, 4: {1, 2}, 5: {3, 4}, 6: {0, 1}}
    with pytest.raises(ValueError, match="focus"):
        multi(focus=0)


WIDE_BUDGETS = (90, 100, 110)
WIDE_STARTS = {b: WIDE.from_dropped(blocks=range(b)) for b in WIDE_BUDGETS}


def _from_starts(sign):
    """Generation 0 keeps each budget's start as its elite; then ``sign`` x the number of
    blocks that differ from the start of the genome's budget."""

    def fitness(g, r):
        start = WIDE_STARTS[sum(g.levels)]
        if r.generation == 0:
            return float(g != start)
        return sign * float(sum(a != b for a, b in zip(g.levels, start.levels)))

    return fitness


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_adaptive_switches_follow_the_best_improving_offspring(sign):
    config = dataclasses.replace(ADAPTIVE, offspring=12, initial_population=3)
    strategy = MultiBudgetEvoPress(
        WIDE,
        budgets=WIDE_BUDGETS,
        config=config,
        rng=np.random.default_rng(0),
        initial=tuple(WIDE_STARTS.values()),
    )
    drive(strategy, _from_starts(sign))
    scales = [h["switch_scale"] for h in strategy.history]
    assert scales[0] == config.max_switches
    if sign < 0:  # rewarding change: the half with twice the switches wins
        assert scales[-1] >= 24 and scales == sorted(scales)
    else:
        assert scales[-1] == 1
    state = json.loads(json.dumps(strategy.state_dict()))
    assert state["switch_scale"] == scales[-1]
    again = MultiBudgetEvoPress(
        WIDE, budgets=WIDE_BUDGETS, config=config, rng=np.random.default_rng(5)
    )
    again.load_state_dict(state)
    assert again._switches.m == scales[-1]
