"""evosearch.strategies: EvoPress and RandomSearch as ask/tell objects, driven here by a pure
Python loop (no model, no data)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from evosearch.genome import Genome
from evosearch.operators import switch_neighbours
from evosearch.strategies import EvoPress, EvoPressConfig, RandomSearch, Request, Stage
from search_spaces import LayerDropSpace

SPACE = LayerDropSpace(10, num_drop=3)
CONFIG = EvoPressConfig(
    generations=6,
    offspring=8,
    initial_population=10,
    stages=(
        Stage(tokens=16, survivors=4),
        Stage(tokens=64, survivors=3),
        Stage(tokens=256, survivors=2),
    ),
)


def index_sum(genome, request: Request | None = None) -> float:
    """Toy fitness: the sum of the dropped block indices (optimum: blocks 0, 1, 2)."""
    return float(sum(i for i, v in enumerate(genome.levels) if v))


def binary_code(genome, request: Request | None = None) -> float:
    """Toy fitness without ties: the dropped blocks read as a binary number."""
    return float(sum(2**i for i, v in enumerate(genome.levels) if v))


def drive(strategy, fitness=index_sum, *, stop_after_generation: int | None = None):
    """Run ask/tell to the end (or until ``stop_after_generation`` is finished); return every
    request with its values."""
    log = []
    while (request := strategy.ask()) is not None:
        values = [fitness(g, request) for g in request.genomes]
        log.append((request, values))
        strategy.tell(request, values)
        if stop_after_generation is not None and strategy.generation > stop_after_generation:
            break
    return log


def evopress(seed: int = 0, config: EvoPressConfig = CONFIG, space=SPACE, **kwargs) -> EvoPress:
    return EvoPress(space, config=config, rng=np.random.default_rng(seed), **kwargs)


def test_first_request_is_the_distinct_initial_population():
    request = evopress().ask()
    assert (request.generation, request.stage, request.tokens) == (0, 0, 16)
    assert len(request.genomes) == CONFIG.initial_population
    assert len(set(request.genomes)) == CONFIG.initial_population
    assert all(SPACE.spec.is_valid(g) for g in request.genomes)


def test_ask_repeats_until_told():
    strategy = evopress()
    assert strategy.ask() == strategy.ask()


def test_racing_keeps_the_best_challengers_plus_the_parents():
    strategy = evopress()
    n_stages = len(CONFIG.stages)
    previous = None
    n_requests = 0
    while (request := strategy.ask()) is not None:
        n_requests += 1
        genomes = request.genomes
        parents = {p.genome for p in strategy.parents}
        assert len(parents) == (CONFIG.parents if request.generation > 0 else 0)
        assert request.tokens == CONFIG.stages[request.stage].tokens
        assert len(set(genomes)) == len(genomes)
        assert parents <= set(genomes)  # elitism: parents enter every stage
        if request.stage == 0:
            fresh = CONFIG.initial_population if request.generation == 0 else CONFIG.offspring
            assert len(genomes) == len(parents) + fresh
        else:
            kept = CONFIG.stages[request.stage - 1].survivors
            assert len(genomes) == kept + len(parents)
            # the survivors of the previous stage are its best challengers
            prev_genomes, prev_values = previous
            challengers = sorted(
                (v, i)
                for i, (g, v) in enumerate(zip(prev_genomes, prev_values))
                if g not in parents
            )
            assert {prev_genomes[i] for _, i in challengers[:kept]} | parents == set(genomes)
        values = [binary_code(g) for g in genomes]
        strategy.tell(request, values)
        previous = (genomes, values)
        if request.stage == n_stages - 1:  # the new parents are the best of the last stage
            best = sorted(zip(values, range(len(genomes))))[: CONFIG.parents]
            assert [p.genome for p in strategy.parents] == [genomes[i] for _, i in best]
    assert n_requests == (CONFIG.generations + 1) * n_stages


def test_parents_survive_low_fidelity_stages_even_when_they_look_worst():
    strategy = evopress(1)
    drive(strategy, stop_after_generation=0)
    parents = {p.genome for p in strategy.parents}
    assert len(parents) == CONFIG.parents

    def parents_look_bad_early(genome, request):
        if genome in parents and request.stage < len(CONFIG.stages) - 1:
            return 1e9
        return index_sum(genome)

    stages_seen = 0
    while (request := strategy.ask()) is not None and request.generation == 1:
        assert parents <= set(request.genomes)
        strategy.tell(request, [parents_look_bad_early(g, request) for g in request.genomes])
        stages_seen += 1
    assert stages_seen == len(CONFIG.stages)


def test_evopress_finds_the_optimum_of_a_toy_fitness():
    config = EvoPressConfig(
        generations=40,
        offspring=8,
        initial_population=8,
        stages=(Stage(tokens=1, survivors=2), Stage(tokens=1, survivors=1)),
    )
    strategy = evopress(0, config)
    drive(strategy)
    genome, value = strategy.best
    assert genome == SPACE.from_dropped(blocks=[0, 1, 2])
    assert value == 3.0
    values = [h["value"] for h in strategy.history]
    assert len(values) == config.generations + 1
    assert values == sorted(values, reverse=True)  # elitism: the best never gets worse
    assert strategy.ask() is None


def _trace(log):
    return [(r.generation, r.stage, r.tokens, r.genomes) for r, _ in log]


def test_same_seed_same_search_different_seed_different_search():
    a, b, c = evopress(3), evopress(3), evopress(4)
    log_a, log_b, log_c = drive(a), drive(b), drive(c)
    assert _trace(log_a) == _trace(log_b)
    assert a.history == b.history
    assert _trace(log_a) != _trace(log_c)
    assert log_a[0][0].genomes != log_c[0][0].genomes


def test_state_dict_resume_continues_identically():
    uninterrupted = evopress(11)
    full_log = drive(uninterrupted)

    first = evopress(11)
    head = drive(first, stop_after_generation=2)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip

    resumed = evopress(999)  # its own rng state is overwritten by the checkpoint
    resumed.load_state_dict(state)
    tail = drive(resumed)
    assert _trace(head + tail) == _trace(full_log)
    assert resumed.history == uninterrupted.history
    assert resumed.best == uninterrupted.best


def test_state_dict_is_refused_mid_generation():
    strategy = evopress(11)
    strategy.ask()
    with pytest.raises(RuntimeError, match="between generations"):
        strategy.state_dict()


def test_tell_checks_its_request():
    strategy = evopress()
    request = strategy.ask()
    with pytest.raises(ValueError, match="expected"):
        strategy.tell(request, [0.0])
    strategy.tell(request, [index_sum(g) for g in request.genomes])
    with pytest.raises(RuntimeError, match="latest ask"):
        strategy.tell(request, [index_sum(g) for g in request.genomes])


def test_custom_variation_is_used_for_offspring():
    calls = []

    def shift(parent, rng):
        calls.append(parent)
        levels = parent.levels
        return type(parent)(levels[1:] + levels[:1])

    strategy = evopress(0, variation=shift)
    drive(strategy, stop_after_generation=1)
    assert calls
    assert all(SPACE.spec.is_valid(p) for p in calls)


def test_random_search_spends_the_same_evaluations_as_evopress():
    evo_log = drive(evopress(5))
    rnd = RandomSearch(SPACE, config=CONFIG, rng=np.random.default_rng(5))
    rnd_log = drive(rnd)
    shape = [(r.generation, r.stage, r.tokens, len(r.genomes)) for r, _ in evo_log]
    assert shape == [(r.generation, r.stage, r.tokens, len(r.genomes)) for r, _ in rnd_log]
    assert all(SPACE.spec.is_valid(g) for r, _ in rnd_log for g in r.genomes)
    assert _trace(evo_log) != _trace(rnd_log)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(generations=-1), "generations"),
        (dict(offspring=0), "offspring"),
        (dict(initial_population=-1), "initial_population"),
        (dict(stages=()), "stages"),
        (dict(max_switches=0), "max_switches"),
        (dict(locality=1.5), "locality"),
        (dict(locality=-0.1), "locality"),
        (dict(polish=-1), "polish"),
        (dict(polish_moves="some"), "polish_moves"),
        (dict(polish_stages=()), "polish_stages"),
        (dict(polish_stages=[Stage(tokens=8, survivors=3)]), "polish_stages must end keeping"),
        (dict(polish_stages=[Stage(tokens=8, survivors=1)]), "polish_stages needs polish"),
    ],
)
def test_config_validation_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvoPressConfig(**kwargs)


def test_stage_validation_and_dict_stages():
    with pytest.raises(ValueError, match="tokens"):
        Stage(tokens=0, survivors=1)
    with pytest.raises(ValueError, match="survivors"):
        Stage(tokens=1, survivors=0)
    config = EvoPressConfig(stages=({"tokens": 8, "survivors": 2},))
    assert config.stages == (Stage(tokens=8, survivors=2),)
    assert config.parents == 2


@pytest.mark.parametrize(
    "text, match",
    [("abc", "tokens:survivors"), ("16:2:1", "tokens:survivors"), ("16:0", "survivors")],
)
def test_stage_parse(text, match):
    assert Stage.parse("16:2,64:1") == (
        Stage(tokens=16, survivors=2),
        Stage(tokens=64, survivors=1),
    )
    with pytest.raises(ValueError, match=match):
        Stage.parse(text)


def test_initial_genomes_join_generation_zero_and_must_fit_the_budget():
    space = LayerDropSpace(10, num_drop=3)
    seeds = [space.from_dropped(blocks=[0, 1, 2]), space.from_dropped(blocks=[7, 8, 9])]
    config = EvoPressConfig(
        generations=1, offspring=2, initial_population=3, stages=(Stage(tokens=1, survivors=1),)
    )
    strategy = EvoPress(space, config=config, rng=np.random.default_rng(0), initial=seeds)
    request = strategy.ask()
    assert request.genomes[:2] == tuple(seeds)
    assert len(set(request.genomes)) == len(request.genomes) == 5
    with pytest.raises(ValueError, match="budget"):
        EvoPress(
            space,
            config=config,
            rng=np.random.default_rng(0),
            initial=[space.from_dropped(blocks=[0])],
        )


def test_zero_initial_population_starts_from_the_initial_genomes_alone():
    start = SPACE.from_dropped(blocks=[0, 1, 2])
    config = dataclasses.replace(CONFIG, initial_population=0)
    strategy = evopress(config=config, initial=[start])
    request = strategy.ask()
    assert request.genomes == (start,)
    for _ in CONFIG.stages:  # the start is the first parent, whatever it scores
        request = strategy.ask()
        strategy.tell(request, [5.0] * len(request.genomes))
    assert strategy.best == (start, 5.0)
    assert len(set(strategy.ask().genomes) - {start}) == CONFIG.offspring
    with pytest.raises(ValueError, match="initial genomes"):
        evopress(config=config)


WIDE = LayerDropSpace(200, num_drop=100)  # many units, as a per-layer sparsity space has
ADAPTIVE = EvoPressConfig(
    generations=5,
    offspring=8,
    initial_population=1,
    stages=(Stage(tokens=16, survivors=2), Stage(tokens=64, survivors=1)),
    adaptive_switches=True,
)


def _changes_from(start):
    return lambda g, request=None: float(sum(a != b for a, b in zip(g.levels, start.levels)))


def _from_start(start, sign):
    """Generation 0 keeps ``start`` as the parent; then ``sign`` x the distance from it."""
    changes = _changes_from(start)
    return lambda g, r: float(g != start) if r.generation == 0 else sign * changes(g)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_adaptive_switches_follow_the_half_whose_offspring_won(sign):
    """Rewarding distance from the start, the best offspring come from the half with twice the
    switches and ``m`` doubles; punishing it, the half with half the switches wins and ``m``
    falls to 1."""
    start = WIDE.from_dropped(blocks=range(100))
    strategy = EvoPress(WIDE, config=ADAPTIVE, rng=np.random.default_rng(0), initial=(start,))
    log = drive(strategy, _from_start(start, sign))
    scales = [h["switch_scale"] for h in strategy.history]
    assert scales[0] == ADAPTIVE.max_switches  # generation 0 has no offspring
    if sign < 0:
        assert scales == [3 * 2**i for i in range(len(scales))]
    else:
        assert scales[-1] == 1
    # each offspring pool: half drawn with m / 2 switches, half with 2 m
    gen1 = next(r for r, _ in log if r.generation == 1 and r.stage == 0)
    parent = gen1.genomes[0]
    dist = [_changes_from(parent)(g) / 2 for g in gen1.genomes[1:]]  # a switch changes 2 units
    assert max(dist[:4]) <= 2 < max(dist[4:]) <= 6


def test_adaptive_switches_survive_resume_and_are_off_by_default():
    start = WIDE.from_dropped(blocks=range(100))
    fitness = _from_start(start, -1.0)
    full = EvoPress(WIDE, config=ADAPTIVE, rng=np.random.default_rng(1), initial=(start,))
    full_log = drive(full, fitness)
    first = EvoPress(WIDE, config=ADAPTIVE, rng=np.random.default_rng(1), initial=(start,))
    head = drive(first, fitness, stop_after_generation=2)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["switch_scale"] == 12
    resumed = EvoPress(WIDE, config=ADAPTIVE, rng=np.random.default_rng(9), initial=(start,))
    resumed.load_state_dict(state)
    assert _trace(head + drive(resumed, fitness)) == _trace(full_log)
    config = dataclasses.replace(ADAPTIVE, adaptive_switches=False)
    plain = EvoPress(WIDE, config=config, rng=np.random.default_rng(1), initial=(start,))
    drive(plain, fitness)
    assert plain.switch_scale == 3 and "switch_scale" not in plain.history[-1]


# -- locality and the final polish -----------------------------------------------------------

POLISH = dataclasses.replace(
    CONFIG,
    generations=2,
    polish=5,
    stages=(Stage(tokens=1, survivors=2), Stage(tokens=1, survivors=1)),
)


def test_polish_races_the_whole_neighbourhood_and_stops_at_a_local_optimum():
    strategy = evopress(0, POLISH)
    log = drive(strategy, binary_code)
    polish = [r for r, _ in log if r.generation > POLISH.generations]
    history = strategy.history
    for request in (r for r in polish if r.stage == 0):
        best = Genome.from_key(history[request.generation - 1]["best"])
        # the parent, then every one-switch neighbour of the best (3 dropped x 7 kept)
        assert set(request.genomes) == {best, *switch_neighbours(best, SPACE.spec)}
    marked = [h for h in history if h.get("polish")]
    assert len(marked) == len({r.generation for r in polish}) >= 1
    assert [h["generation"] for h in marked][0] == POLISH.generations + 1
    if len(marked) < POLISH.polish:  # it stopped early: the last polish kept the best
        assert marked[-1]["best"] == history[-2]["best"]
    best, value = strategy.best
    assert all(binary_code(n) > value for n in switch_neighbours(best, SPACE.spec))
    assert strategy.ask() is None


def test_polish_reaches_the_optimum_of_a_toy_fitness_that_evolution_did_not():
    plain = evopress(1, dataclasses.replace(POLISH, polish=0))
    drive(plain, binary_code)
    polished = evopress(1, POLISH)
    drive(polished, binary_code)
    assert polished.best[1] <= plain.best[1]
    assert polished.best[0] == SPACE.from_dropped(blocks=[0, 1, 2])


def test_polish_state_survives_resume():
    config = dataclasses.replace(POLISH, polish=3)
    uninterrupted = evopress(5, config)
    full_log = drive(uninterrupted, binary_code)
    first = evopress(5, config)
    head = drive(first, binary_code, stop_after_generation=config.generations + 1)
    resumed = evopress(999, config)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = drive(resumed, binary_code)
    assert _trace(head + tail) == _trace(full_log)
    assert resumed.best == uninterrupted.best


def test_locality_zero_is_the_default_and_locality_changes_the_offspring():
    assert CONFIG.locality == 0.0 and CONFIG.polish == 0
    base, local = evopress(2), evopress(2, dataclasses.replace(CONFIG, locality=1.0))
    log_base, log_local = drive(base), drive(local)
    assert log_base[0][0].genomes == log_local[0][0].genomes  # same random start
    assert _trace(log_base) != _trace(log_local)
    # with locality 1, every offspring is its parent with blocks slid to adjacent positions
    for request, _ in log_local:
        assert all(SPACE.spec.is_valid(g) for g in request.genomes)


def test_local_polish_races_only_the_local_neighbourhood():
    from evosearch.operators import local_neighbours

    strategy = evopress(0, dataclasses.replace(POLISH, polish_moves="local"))
    log = drive(strategy, binary_code)
    polish = [r for r, _ in log if r.generation > POLISH.generations and r.stage == 0]
    assert polish
    for request in polish:
        best = Genome.from_key(strategy.history[request.generation - 1]["best"])
        assert set(request.genomes) == {best, *local_neighbours(best, SPACE.spec)}


def test_polish_is_refused_for_a_budget_range_and_optuna():
    from evosearch.config import SearchConfig

    assert SearchConfig.from_dict(dict(num_drop=2, polish=2)).strategy.loop.polish == 2
    with pytest.raises(ValueError, match="polish"):
        SearchConfig.from_dict(dict(drop_range=(2, 4), polish=2))
    with pytest.raises(ValueError, match="polish"):
        SearchConfig.from_dict(dict(num_drop=2, polish=2, strategy="tpe"))


def test_finish_ends_the_evolution_then_polishes_and_survives_resume():
    config = dataclasses.replace(POLISH, generations=10, polish=1)
    strategy = evopress(3, config)
    drive(strategy, binary_code, stop_after_generation=1)
    assert strategy.finishing_tokens() == sum(
        len(r.genomes) * r.tokens for r in _polish_requests(strategy)
    )
    strategy.finish()
    state = json.loads(json.dumps(strategy.state_dict()))
    log = drive(strategy, binary_code)
    assert {r.generation for r, _ in log} == {2}  # one polish generation, then done
    assert strategy.history[-1].get("polish") and strategy.done
    resumed = evopress(99, config)
    resumed.load_state_dict(state)
    assert _trace(drive(resumed, binary_code)) == _trace(log)
    with pytest.raises(RuntimeError, match="between generations"):
        started = evopress(3, config)
        started.ask()
        started.finish()


def test_polish_stages_race_the_polish_generations_only():
    stages = (
        Stage(tokens=1, survivors=3),
        Stage(tokens=5, survivors=2),
        Stage(tokens=9, survivors=1),
    )
    config = dataclasses.replace(POLISH, polish=1, polish_stages=stages)
    strategy = evopress(3, config)
    log = drive(strategy, binary_code)
    evolution = {(r.stage, r.tokens) for r, _ in log if r.generation <= config.generations}
    polish = [r for r, _ in log if r.generation > config.generations]
    assert evolution == {(0, 1), (1, 1)}
    assert [(r.stage, r.tokens, len(r.genomes)) for r in polish][1:] == [(1, 5, 4), (2, 9, 3)]
    assert strategy.history[-1].get("polish") and strategy.done
    probe = evopress(3, config)
    drive(probe, binary_code, stop_after_generation=1)
    assert probe.finishing_tokens() == sum(
        len(r.genomes) * r.tokens for r in _polish_requests(probe)
    )


def _polish_requests(strategy: EvoPress) -> list[Request]:
    """The requests of ``strategy``'s next generation, were it a polish generation (a copy is
    driven; ``strategy`` is unchanged)."""
    probe = evopress(0, strategy.config)
    probe.load_state_dict(json.loads(json.dumps(strategy.state_dict())))
    probe.finish()
    return [r for r, _ in drive(probe, binary_code)]
