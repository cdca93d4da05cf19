"""GP operators and the ask/tell strategy: limits, determinism, elitism, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evosearch.gp import (
    GeneticProgramming,
    GPConfig,
    Grammar,
    MetricGenome,
    point_mutation,
    random_tree,
    subtree_crossover,
    subtree_mutation,
    tournament,
)
from evosearch.strategy import Request
from evosearch.symbolic import KNOWN_METRICS, canonical, parse, to_string

GRAMMAR = Grammar(max_depth=4, max_size=9)


def test_tournament_breaks_ties_by_tree_size():
    fitness, sizes = [1.0, 1.0, 2.0], [9, 3, 1]
    assert tournament(fitness, np.random.default_rng(0), 3, sizes) == 1
    assert tournament(fitness, np.random.default_rng(0), 3) in (0, 1)


def test_best_prefers_the_smaller_of_equal_fitness():
    gp = GeneticProgramming(
        GPConfig(population=2, generations=0, elitism=0), rng=np.random.default_rng(0)
    )
    request = gp.ask()
    gp._asked = [parse("add(mul(G, mul(G, W)), mul(W, X))"), parse("mul(W, X)")]
    gp.tell(request, [0.5, 0.5])
    assert gp.best[0].key() == "mul(W, X)"


def _fitness(tree) -> float:
    """A cheap deterministic stand-in for a pruned model's KL: prefers trees near |W|*X."""
    key = to_string(canonical(tree))
    return 0.0 if key == "mul(W, X)" else 1.0 + tree.size() + (len(key) % 7) / 10


@pytest.mark.parametrize("method", ["grow", "full"])
def test_random_trees_respect_limits_and_are_deterministic(method):
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, GRAMMAR, depth=6, method=method) for _ in range(200)]
    assert all(t.depth() <= 4 and t.size() <= 9 for t in trees)
    again = [random_tree(np.random.default_rng(0), GRAMMAR, depth=6, method=method)]
    assert again[0] == trees[0]
    if method == "full":  # full trees that fit the size limit reach the requested depth
        assert any(t.depth() == 4 for t in trees)
    assert len({to_string(t) for t in trees}) > 50


def test_operators_keep_limits_and_are_deterministic():
    rng = np.random.default_rng(1)
    pop = [random_tree(rng, GRAMMAR, depth=4) for _ in range(30)]
    for seed in range(40):
        a, b = pop[seed % 30], pop[(seed * 7 + 3) % 30]
        for op in (
            lambda r, a=a, b=b: subtree_crossover(a, b, r, GRAMMAR),
            lambda r, a=a: subtree_mutation(a, r, GRAMMAR, depth=3),
            lambda r, a=a: point_mutation(a, r, GRAMMAR),
        ):
            child = op(np.random.default_rng(seed))
            assert GRAMMAR.fits(child)
            assert op(np.random.default_rng(seed)) == child


def test_point_mutation_changes_one_label_and_keeps_the_shape():
    tree = parse("mul(sqrt(W), add(X, G))")
    changed = 0
    for seed in range(20):
        child = point_mutation(tree, np.random.default_rng(seed), GRAMMAR)
        assert child.size() == tree.size() and child.depth() == tree.depth()
        diffs = sum(a != b for a, b in zip(_labels(tree), _labels(child)))
        assert diffs <= 1
        changed += diffs
    assert changed > 10


def _labels(tree):
    return [tree.op] + [x for c in tree.children for x in _labels(c)]


def test_crossover_takes_material_from_both_parents():
    a, b = parse("mul(W, W)"), parse("sqrt(sqrt(G))")
    children = {
        to_string(subtree_crossover(a, b, np.random.default_rng(s), GRAMMAR)) for s in range(30)
    }
    assert any("G" in c and "mul" in c for c in children)


def test_tournament_picks_the_best_entrant():
    fitness = [5.0, 1.0, 3.0, math.inf]
    assert tournament(fitness, np.random.default_rng(0), 4) == 1
    picks = [tournament(fitness, np.random.default_rng(s), 1) for s in range(50)]
    assert set(picks) == {0, 1, 2, 3}  # size 1: uniform


def _run(config, seed, seeds=()):
    gp = GeneticProgramming(config, rng=np.random.default_rng(seed), seeds=seeds)
    asked = []
    while (request := gp.ask()) is not None:
        asked.append([str(g) for g in request.genomes])
        gp.tell(request, [_fitness(g.tree) for g in request.genomes])
    return gp, asked


def test_strategy_is_deterministic_seeded_and_elitist():
    seeds = [parse(KNOWN_METRICS[k]) for k in ("magnitude", "pruner-zero")]
    cfg = GPConfig(population=8, generations=5, elitism=2, grammar=GRAMMAR)
    gp, asked = _run(cfg, 0, seeds)
    _, again = _run(cfg, 0, seeds)
    assert asked == again
    assert asked[0][:2] == ["W", "mul(sqr(W), mms(G))"]  # seeds first
    assert len(asked[0]) == 8 and all(len(a) == 6 for a in asked[1:])
    assert len(asked) == 6
    # elitism: the best fitness never gets worse, and the best is the true minimum told
    told = [_fitness(parse(t)) for gen in asked for t in gen]
    assert gp.best[1] == min(told)
    assert [h["proposed"] for h in gp.history] == asked
    # offspring of one generation are distinct in canonical form
    for gen in asked[1:]:
        assert len({to_string(canonical(parse(t))) for t in gen}) == len(gen)
    assert _run(cfg, 1, seeds)[1] != asked


def test_strategy_finds_the_planted_optimum():
    cfg = GPConfig(population=12, generations=10, grammar=Grammar(max_depth=3, max_size=5))
    gp, _ = _run(cfg, 0)
    assert gp.best[0].key() == "mul(W, X)"


def test_state_dict_resumes_exactly():
    cfg = GPConfig(population=6, generations=4, grammar=GRAMMAR)
    full, asked = _run(cfg, 3)
    gp = GeneticProgramming(cfg, rng=np.random.default_rng(3))
    for _ in range(2):
        request = gp.ask()
        gp.tell(request, [_fitness(g.tree) for g in request.genomes])
    gp.ask()  # a pending ask is part of the state
    state = json.loads(json.dumps(gp.state_dict()))
    resumed = GeneticProgramming(cfg, rng=np.random.default_rng(999))
    resumed.load_state_dict(state)
    rest = []
    while (request := resumed.ask()) is not None:
        rest.append([str(g) for g in request.genomes])
        resumed.tell(request, [_fitness(g.tree) for g in request.genomes])
    assert rest == asked[2:]
    assert resumed.best == full.best and resumed.history == full.history


def test_ask_tell_contract():
    gp = GeneticProgramming(GPConfig(population=4, generations=0), rng=np.random.default_rng(0))
    assert gp.best is None
    with pytest.raises(RuntimeError, match="latest ask"):
        gp.tell(Request(0, 0, 2048, ()), [1.0])
    request = gp.ask()
    assert gp.ask() == request and request.tokens == 2048  # the same trees until told
    assert all(isinstance(g, MetricGenome) for g in request.genomes)
    with pytest.raises(ValueError, match="expected 4"):
        gp.tell(request, [1.0])
    gp.tell(request, [math.nan, 2.0, 1.0, math.inf])  # NaN counts as rejected (inf)
    assert gp.done and gp.best[1] == 1.0
    assert gp.ask() is None


def test_metric_genome_is_keyed_by_its_canonical_form():
    a, b = MetricGenome(parse("sqrt(mul(X, W))")), MetricGenome(parse("mul(W, X)"))
    assert a.key() == b.key() == "mul(W, X)" and a != b and str(a) == "sqrt(mul(X, W))"
    assert {a, MetricGenome(parse("sqrt(mul(X, W))"))} == {a}
    assert MetricGenome.from_key(a.key()) == b


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"population": 1}, "population"),
        ({"elitism": 4, "population": 4}, "elitism"),
        ({"crossover_rate": 1.5}, "crossover_rate"),
        ({"tournament_size": 0}, "tournament_size"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPConfig(**kwargs)


def test_grammar_validation():
    with pytest.raises(ValueError, match="terminal"):
        Grammar(terminals=("W", "H"))
    with pytest.raises(ValueError, match="arity 1"):
        Grammar(unary=("mul",))
    with pytest.raises(ValueError, match="exceeds"):
        GeneticProgramming(
            GPConfig(grammar=Grammar(max_depth=2)),
            rng=np.random.default_rng(0),
            seeds=[parse(KNOWN_METRICS["gblm"])],
        )


def test_random_trees_hold_constants_from_the_range():
    grammar = Grammar(max_depth=4, max_size=9, const_prob=0.3, const_range=(0.5, 200.0))
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, grammar, depth=4) for _ in range(200)]
    consts = [n.value for t in trees for n in _nodes(t) if n.op == "const"]
    assert len(consts) > 20
    assert all(0.5 * 0.95 <= c <= 200 * 1.05 and float(f"{c:.2g}") == c for c in consts)
    assert all(t.terminals() for t in trees)  # never a constant-only tree
    none = Grammar(max_depth=4, max_size=9, const_prob=0.0)
    assert not any(
        n.op == "const" for _ in range(100) for n in _nodes(random_tree(rng, none, depth=4))
    )
    with pytest.raises(ValueError, match="const_range"):
        Grammar(const_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="const_prob"):
        Grammar(const_prob=1.0)


def test_point_mutation_tunes_a_constant_within_a_factor_of_ten():
    tree = parse("mul(100, W)")
    rng = np.random.default_rng(0)
    values = set()
    for _ in range(200):
        child = point_mutation(tree, rng, GRAMMAR)
        if child.op == "mul" and child.children[1].op == "W":  # the constant was mutated
            values.add(child.children[0].value)
    assert len(values) > 20 and 100 not in values
    assert all(10 <= v <= 1000 for v in values)


def _nodes(tree):
    yield tree
    for c in tree.children:
        yield from _nodes(c)
