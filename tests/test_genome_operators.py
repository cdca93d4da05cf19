"""evosearch.genome and evosearch.operators: frozen genomes, exact budgets, level switches."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from evosearch.genome import Genome, LevelSpec
from evosearch.operators import (
    fill_budget,
    level_switch_mutation,
    local_neighbours,
    local_switch,
    mixed_mutation,
    number_of_switches,
    part_mutation,
    random_genome,
    switch_neighbours,
)
from search_spaces import LayerDropSpace

# A multi-level spec: two groups, one frozen unit (max level 0).
MULTI = LevelSpec(
    max_levels=(3, 2, 4, 0, 1, 2),
    groups=(0, 0, 1, 1, 1, 0),
    budgets={0: 4, 1: 3},
)


def _specs():
    return {
        "blocks": LayerDropSpace(10, num_drop=3).spec,
        "sublayers": LayerDropSpace(6, num_drop=2, sublayers=True).spec,
        "allowed": LayerDropSpace(8, num_drop=2, sublayers=True, allowed=[1, 2, 5]).spec,
        "multi": MULTI,
    }


SPEC_IDS = list(_specs())


# -- Genome ----------------------------------------------------------------------------------


def test_genome_is_hashable_and_compares_by_levels():
    a = Genome((0, 1, 1))
    b = Genome([np.int64(0), 1, np.int8(1)])
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, Genome((1, 1, 0))}) == 2
    assert all(type(v) is int for v in b.levels)
    assert isinstance(b.levels, tuple)


def test_genome_is_frozen():
    genome = Genome((0, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        genome.levels = (1, 0)


@pytest.mark.parametrize("levels", [(0,), (0, 1, 1, 0), (3, 10, 35, 0, 9), tuple(range(36))])
def test_key_round_trip(levels):
    genome = Genome(levels)
    key = genome.key()
    assert len(key) == len(levels)
    assert Genome.from_key(key) == genome


def test_keys_of_different_genomes_differ():
    genomes = {Genome((a, b, c)) for a in range(4) for b in range(4) for c in range(4)}
    assert len({g.key() for g in genomes}) == len(genomes)


def test_key_rejects_levels_it_cannot_encode():
    with pytest.raises(ValueError, match="1295"):
        Genome((0, 36 * 36)).key()
    with pytest.raises(ValueError, match="1295"):
        Genome((-1, 3)).key()


# -- LevelSpec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_levels=(1, 1), groups=(0, 0), budgets={0: 3}), "impossible"),
        (dict(max_levels=(1, 1), groups=(0, 0), budgets={0: -1}), "impossible"),
        (dict(max_levels=(2, 0), groups=(0, 1), budgets={0: 1, 1: 1}), "group 1"),
        (dict(max_levels=(1, 1), groups=(0, 1), budgets={0: 1}), "group 1 has no budget"),
        (dict(max_levels=(1, 1), groups=(0,), budgets={0: 1}), "groups"),
        (dict(max_levels=(1, 1), groups=(0, 0), budgets={0: 1}, names=("a",)), "names"),
        (dict(max_levels=(), groups=(), budgets={}), "at least one unit"),
        (dict(max_levels=(1, -1), groups=(0, 0), budgets={0: 0}), ">= 0"),
    ],
)
def test_level_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LevelSpec(**kwargs)


def test_level_spec_rejects_a_budget_for_a_group_without_units():
    # Group 1 has no unit, so its budget of 1 can never be met: random_genome cannot deal it out
    # and is_valid rejects every genome. The spec must be refused on construction.
    with pytest.raises(ValueError, match="group 1"):
        LevelSpec(max_levels=(1, 1), groups=(0, 0), budgets={0: 1, 1: 1})


def test_is_valid():
    spec = LevelSpec(max_levels=(1, 2, 1), groups=(0, 0, 1), budgets={0: 2, 1: 1})
    assert spec.is_valid(Genome((0, 2, 1)))
    assert spec.is_valid(Genome((1, 1, 1)))
    assert not spec.is_valid(Genome((1, 1, 0)))  # group 1 misses its budget
    assert not spec.is_valid(Genome((2, 0, 1)))  # unit 0 above its max level
    assert not spec.is_valid(Genome((0, 2)))  # wrong length
    assert spec.units_of(0) == [0, 1]
    assert spec.n_units == 3


# -- random_genome ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_IDS)
def test_random_genome_is_always_valid(name):
    spec = _specs()[name]
    touched = [0] * spec.n_units
    for seed in range(300):
        genome = random_genome(spec, np.random.default_rng(seed))
        assert spec.is_valid(genome), (seed, genome)
        for i, v in enumerate(genome.levels):
            touched[i] += v > 0
    # every unit that may be compressed is compressed by some genome; frozen ones never are
    assert [t > 0 for t in touched] == [m > 0 for m in spec.max_levels]


def test_random_genome_is_deterministic_in_the_rng():
    spec = _specs()["multi"]
    a = [random_genome(spec, np.random.default_rng(7)) for _ in range(3)]
    b = [random_genome(spec, np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(7)
    sequence = [random_genome(spec, rng) for _ in range(20)]
    assert len(set(sequence)) > 1


# -- level_switch_mutation -------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_IDS)
def test_mutation_preserves_budgets_and_max_levels(name):
    spec = _specs()[name]
    rng = np.random.default_rng(0)
    for _ in range(200):
        parent = random_genome(spec, rng)
        n = int(rng.integers(1, 4))
        child = level_switch_mutation(parent, spec, rng, n)
        assert spec.is_valid(child), (parent, child)


@pytest.mark.parametrize("name", SPEC_IDS)
def test_single_switch_moves_one_level_within_one_group(name):
    spec = _specs()[name]
    rng = np.random.default_rng(1)
    for _ in range(200):
        parent = random_genome(spec, rng)
        child = level_switch_mutation(parent, spec, rng, 1)
        assert child != parent
        diff = [c - p for c, p in zip(child.levels, parent.levels)]
        changed = [i for i, d in enumerate(diff) if d]
        assert sorted(diff[i] for i in changed) == [-1, 1]
        assert spec.groups[changed[0]] == spec.groups[changed[1]]


def test_mutation_reaches_every_neighbour():
    space = LayerDropSpace(5, num_drop=2)
    parent = space.from_dropped(blocks=[0, 1])
    rng = np.random.default_rng(3)
    children = {level_switch_mutation(parent, space.spec, rng, 1) for _ in range(300)}
    # 2 blocks to undrop x 3 blocks to drop
    assert len(children) == 6


@pytest.mark.parametrize("num_drop", [0, 4])
def test_mutation_without_possible_switch_returns_the_genome(num_drop):
    spec = LayerDropSpace(5, num_drop=num_drop, allowed=[0, 1, 2, 3]).spec
    genome = random_genome(spec, np.random.default_rng(0))
    assert level_switch_mutation(genome, spec, np.random.default_rng(0), 3) == genome


def test_sublayer_mutation_moves_only_in_the_group_with_room():
    # only blocks 0 and 2 may be dropped: each kind can only swap between those two
    space = LayerDropSpace(3, num_drop=1, sublayers=True, allowed=[0, 2])
    spec = space.spec
    parent = space.from_dropped(attention=[0], mlp=[2])
    rng = np.random.default_rng(0)
    children = {level_switch_mutation(parent, spec, rng, 1) for _ in range(100)}
    assert children == {
        space.from_dropped(attention=[2], mlp=[2]),
        space.from_dropped(attention=[0], mlp=[0]),
    }


@pytest.mark.parametrize("name", SPEC_IDS)
def test_mutation_is_deterministic_in_the_rng(name):
    spec = _specs()[name]
    parent = random_genome(spec, np.random.default_rng(0))

    def children(seed):
        rng = np.random.default_rng(seed)
        return [level_switch_mutation(parent, spec, rng, 2) for _ in range(30)]

    assert children(5) == children(5)
    assert children(5) != children(6)


# -- number_of_switches ----------------------------------------------------------------------


def test_number_of_switches_distribution():
    rng = np.random.default_rng(0)
    n = 20000
    counts = Counter(number_of_switches(rng) for _ in range(n))
    assert set(counts) == {1, 2, 3}
    assert counts[1] > counts[2] > counts[3]
    # min of two independent U{1,2,3}: P(k) = (7 - 2k) / 9
    for k in (1, 2, 3):
        assert counts[k] / n == pytest.approx((7 - 2 * k) / 9, abs=0.02)


def test_number_of_switches_respects_high():
    rng = np.random.default_rng(0)
    assert {number_of_switches(rng, 1) for _ in range(50)} == {1}
    assert max(number_of_switches(rng, 5) for _ in range(2000)) == 5


def test_keys_of_levels_above_35_round_trip_and_old_keys_still_parse():
    wide = Genome((0, 35, 36, 1295, 7))
    assert wide.key().startswith("~")
    assert Genome.from_key(wide.key()) == wide
    narrow = Genome((0, 35, 7))
    assert narrow.key() == "0z7" and Genome.from_key("0z7") == narrow


def test_a_switch_moves_switch_size_levels_as_far_as_both_units_allow():
    spec = LevelSpec(max_levels=(10, 10, 2), groups=(0, 0, 0), budgets={0: 10}, switch_size=4)
    rng = np.random.default_rng(0)
    moves = Counter()
    for _ in range(200):
        parent = Genome((5, 5, 0))
        child = level_switch_mutation(parent, spec, rng, 1)
        assert spec.is_valid(child)
        moves[max(abs(a - b) for a, b in zip(child.levels, parent.levels))] += 1
        if child.levels[2] > 0:  # unit 2 has room for only 2 levels
            assert child.levels[2] == 2
    assert set(moves) == {2, 4}
    with pytest.raises(ValueError, match="switch_size"):
        LevelSpec(max_levels=(1, 1), groups=(0, 0), budgets={0: 1}, switch_size=0)


def test_fill_budget_buys_the_largest_error_drop_per_cost_until_nothing_fits():
    costs = [[0, 10, 20], [0, 4, 8], [0, 1, 2]]
    errors = [[9.0, 1.0, 0.0], [5.0, 2.0, 1.9], [1.0, 1.0, 1.0]]  # unit 2: no gain, never raised
    # drops per cost: unit 0: 0.8 then 0.1; unit 1: 0.75 then 0.025
    levels, spare = fill_budget([0, 0, 0], costs, errors, 15, (2, 2, 2))
    assert levels == [1, 1, 0] and spare == 1
    levels, spare = fill_budget([0, 0, 0], costs, errors, 9, (2, 2, 2))
    assert levels == [0, 2, 0] and spare == 1  # unit 0's rung (10) does not fit
    assert fill_budget([0, 0, 0], costs, errors, 100, (2, 2, 2), max_raises=1)[0] == [1, 0, 0]
    assert fill_budget([2, 2, 0], costs, errors, 100, (2, 2, 2))[0] == [2, 2, 0]


# -- locality: local switches, mixed mutation, the one-switch neighbourhood ------------------


@pytest.mark.parametrize("name", SPEC_IDS)
def test_local_switch_gives_a_level_to_a_unit_next_to_one_that_holds_levels(name):
    spec = _specs()[name]
    rng = np.random.default_rng(0)
    for _ in range(200):
        parent = random_genome(spec, rng)
        child = local_switch(parent, spec, rng)
        assert spec.is_valid(child)
        diff = [u for u, (a, b) in enumerate(zip(parent.levels, child.levels)) if a != b]
        if not diff:
            continue
        down, up = sorted(diff, key=lambda u: child.levels[u] - parent.levels[u])
        assert spec.groups[down] == spec.groups[up]
        units = spec.units_of(spec.groups[up])
        k = units.index(up)
        neighbours = units[max(k - 1, 0) : k] + units[k + 1 : k + 2]
        assert any(parent.levels[u] > 0 for u in neighbours)


def test_local_switch_slides_or_joins_runs_of_dropped_blocks():
    space = LayerDropSpace(10, num_drop=3)
    parent = space.from_dropped(blocks=[0, 4, 5])
    children = {
        tuple(
            space.describe(local_switch(parent, space.spec, np.random.default_rng(s)))[
                "dropped_blocks"
            ]
        )
        for s in range(300)
    }
    # one of 0, 4, 5 moves to 1, 3 or 6 (the kept blocks next to a dropped one): 9 moves
    expected = {tuple(sorted({0, 4, 5} - {i} | {j})) for i in (0, 4, 5) for j in (1, 3, 6)}
    assert children == expected and len(expected) == 9


def test_local_switch_is_the_identity_when_nothing_can_move_and_is_seeded():
    spec = LevelSpec(max_levels=(1, 1, 0, 1), groups=(0, 0, 0, 0), budgets={0: 2})
    stuck = Genome((1, 1, 0, 0))  # 2 is frozen: no kept unit is next to a dropped one
    assert local_switch(stuck, spec, np.random.default_rng(0), 3) == stuck
    space = LayerDropSpace(20, num_drop=5)
    g = space.random_genome(np.random.default_rng(1))
    a = local_switch(g, space.spec, np.random.default_rng(7), 4)
    assert a == local_switch(g, space.spec, np.random.default_rng(7), 4)


def test_mixed_mutation_without_locality_is_the_level_switch_mutation():
    space = LayerDropSpace(16, num_drop=5, sublayers=True)
    g = space.random_genome(np.random.default_rng(2))
    for seed in range(20):
        a = mixed_mutation(g, space.spec, np.random.default_rng(seed), 3, locality=0.0)
        b = level_switch_mutation(g, space.spec, np.random.default_rng(seed), 3)
        assert a == b


def test_mixed_mutation_with_full_locality_only_makes_local_switches():
    space = LayerDropSpace(12, num_drop=4)
    rng = np.random.default_rng(3)
    for _ in range(100):
        g = space.random_genome(rng)
        child = mixed_mutation(g, space.spec, rng, 1, locality=1.0)
        (up,) = [u for u in range(12) if child.levels[u] > g.levels[u]]
        assert g.levels[max(up - 1, 0)] or g.levels[min(up + 1, 11)]
        assert space.spec.is_valid(child)


@pytest.mark.parametrize("name", SPEC_IDS)
def test_switch_neighbours_are_every_one_switch_genome(name):
    spec = _specs()[name]
    g = random_genome(spec, np.random.default_rng(4))
    neighbours = switch_neighbours(g, spec)
    assert len(set(neighbours)) == len(neighbours) and g not in neighbours
    assert all(spec.is_valid(n) for n in neighbours)
    rng = np.random.default_rng(5)
    mutants = {level_switch_mutation(g, spec, rng) for _ in range(2000)}
    assert mutants == set(neighbours)  # a single switch reaches exactly the neighbourhood


def test_switch_neighbours_of_a_layer_drop_number_k_times_n_minus_k():
    space = LayerDropSpace(30, num_drop=7)
    g = space.from_dropped(blocks=range(12, 19))
    assert len(switch_neighbours(g, space.spec)) == 7 * 23


def test_local_neighbours_are_every_local_switch():
    space = LayerDropSpace(30, num_drop=7)
    run = space.from_dropped(blocks=range(12, 19))
    # a run of 7: each dropped block to 11 or 19
    assert len(local_neighbours(run, space.spec)) == 7 * 2
    for name, spec in _specs().items():
        g = random_genome(spec, np.random.default_rng(6))
        rng = np.random.default_rng(8)
        mutants = {local_switch(g, spec, rng) for _ in range(2000)}
        assert mutants == set(local_neighbours(g, spec)), name
        assert set(local_neighbours(g, spec)) <= set(switch_neighbours(g, spec))


def test_part_mutation_moves_a_small_part_as_often_as_a_large_one():
    # group 0: a part of 3 units, a part of 60 and 20 slack units (no part); group 1 apart
    spec = LevelSpec(
        max_levels=(1,) * 3 + (4,) * 60 + (4,) * 20 + (2,),
        groups=(0,) * 83 + (1,),
        budgets={0: 2 * 60 + 40, 1: 1},
    )
    start = Genome((0,) * 3 + (2,) * 60 + (2,) * 20 + (1,))
    assert spec.is_valid(start)
    parts = [range(3), range(3, 63)]
    rng, small = np.random.default_rng(0), 0
    for _ in range(400):
        child = part_mutation(start, spec, parts, rng)
        assert spec.is_valid(child) and child != start
        assert child.levels[-1] == 1  # another group never moves
        small += any(child.levels[:3])
    # uniform unit draws would move the small part about 3 / 83 of the time
    assert 0.35 < small / 400 < 0.65
    assert part_mutation(start, spec, [], rng) == start
