"""Genetic programming over symbolic pruning metrics (Pruner-Zero, Dong et al. 2024, Sec. 3).

Pure operators on :class:`~evosearch.symbolic.Node` trees, each taking an explicit numpy
``rng`` (same seed, same trees): :func:`random_tree` (grow / full), :func:`subtree_crossover`,
:func:`subtree_mutation`, :func:`point_mutation` and :func:`tournament`. Every operator returns
a tree within the :class:`Grammar`'s depth and size limits.

:class:`GeneticProgramming` wires them into a :class:`~evosearch.strategy.Strategy`, the
protocol every strategy of :func:`evosearch.engine.search` follows: :meth:`~GeneticProgramming.ask`
returns a :class:`~evosearch.strategy.Request` of :class:`MetricGenome` s (the initial
population, then each generation's offspring), :meth:`~GeneticProgramming.tell` receives their
fitness (lower is better; ``inf`` for a rejected metric) and forms the next population from the
elites and the offspring. Offspring whose canonical form (:func:`~evosearch.symbolic.canonical`)
is already in the population are regenerated a few times, then replaced by a fresh random tree,
so equivalent metrics do not crowd it (Pruner-Zero's opposing-operation simplification serves
the same purpose). :mod:`evosearch.metric_search` runs it on the engine.

Example:
    >>> gp = GeneticProgramming(GPConfig(population=8), rng=np.random.default_rng(0))
    >>> while (request := gp.ask()) is not None:                    # doctest: +SKIP
    ...     gp.tell(request, [my_fitness(g.canonical) for g in request.genomes])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from evosearch.strategy import Request
from evosearch.symbolic import (
    BINARY,
    OPS,
    TERMINALS,
    UNARY,
    Node,
    canonical,
    const,
    parse,
    to_math,
    to_string,
)

__all__ = [
    "GPConfig",
    "GeneticProgramming",
    "Grammar",
    "MetricGenome",
    "point_mutation",
    "random_tree",
    "subtree_crossover",
    "subtree_mutation",
    "tournament",
]

Path = tuple[int, ...]  # child indices from the root


@dataclass(frozen=True, kw_only=True)
class Grammar:
    """What random trees are built from, and the limits every operator keeps.

    Args:
        terminals: terminal names (see :data:`~evosearch.symbolic.TERMINALS`).
        unary / binary: operator names (see :data:`~evosearch.symbolic.OPS`).
        max_depth: most nodes on a root-to-leaf path (a leaf has depth 1).
        max_size: most nodes in a tree.
        const_prob: chance that a random leaf is a constant (an ephemeral random constant)
            rather than a terminal; constants let a tree weigh one term against another
            (GBLM's ``|W|·‖X‖ + α·|W|·|G|``). 0 disables them.
        const_range: ``(low, high)``, both positive: constants are drawn log-uniformly from
            it, rounded to two significant digits (readable metrics, fewer distinct trees).
    """

    terminals: tuple[str, ...] = ("W", "X", "G")
    unary: tuple[str, ...] = UNARY
    binary: tuple[str, ...] = BINARY
    max_depth: int = 6
    max_size: int = 20
    const_prob: float = 0.1
    const_range: tuple[float, float] = (0.01, 10000.0)

    def __post_init__(self) -> None:
        if not self.terminals:
            raise ValueError("grammar needs at least one terminal")
        for t in self.terminals:
            if t not in TERMINALS:
                raise ValueError(f"unknown terminal {t!r}; known: {sorted(TERMINALS)}")
        for names, arity in ((self.unary, 1), (self.binary, 2)):
            for n in names:
                if n not in OPS or OPS[n].arity != arity:
                    raise ValueError(f"{n!r} is not a known operator of arity {arity}")
        if not self.binary and not self.unary:
            raise ValueError("grammar needs at least one operator")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {self.max_size}")
        if not 0 <= self.const_prob < 1:
            raise ValueError(f"const_prob must lie in [0, 1), got {self.const_prob}")
        object.__setattr__(self, "const_range", tuple(float(v) for v in self.const_range))
        low, high = self.const_range
        if not 0 < low <= high:
            raise ValueError(f"const_range must be 0 < low <= high, got {self.const_range}")

    def fits(self, tree: Node) -> bool:
        return tree.depth() <= self.max_depth and tree.size() <= self.max_size


# -- tree addressing -----------------------------------------------------------------------------


def _paths(tree: Node, prefix: Path = ()) -> list[Path]:
    """Every node's path, pre-order."""
    out = [prefix]
    for i, c in enumerate(tree.children):
        out.extend(_paths(c, prefix + (i,)))
    return out


def _at(tree: Node, path: Path) -> Node:
    for i in path:
        tree = tree.children[i]
    return tree


def _replace(tree: Node, path: Path, new: Node) -> Node:
    if not path:
        return new
    kids = list(tree.children)
    kids[path[0]] = _replace(kids[path[0]], path[1:], new)
    return Node(tree.op, tuple(kids), tree.value)


# -- operators -----------------------------------------------------------------------------------


def random_tree(
    rng: np.random.Generator, grammar: Grammar, *, depth: int, method: str = "grow"
) -> Node:
    """A random tree of at most ``depth`` levels (and within ``grammar``'s size limit).

    ``method="full"``: every branch reaches ``depth``; ``"grow"``: leaves may come earlier.
    Trees over the size limit are redrawn (grow) or fall back to grow.
    """
    if method not in ("grow", "full"):
        raise ValueError(f"method must be 'grow' or 'full', got {method!r}")
    depth = max(1, min(depth, grammar.max_depth))
    for _ in range(20):
        tree = _draw(rng, grammar, depth, method)
        if grammar.fits(tree) and tree.terminals():  # a constant-only tree ranks nothing
            return tree
        method = "grow"
    return Node(str(rng.choice(grammar.terminals)))


def _draw(rng: np.random.Generator, grammar: Grammar, depth: int, method: str) -> Node:
    n_ops = len(grammar.unary) + len(grammar.binary)
    n_term = len(grammar.terminals)
    leaf = depth <= 1 or (method == "grow" and rng.random() < n_term / (n_term + n_ops))
    if leaf:
        if grammar.const_prob and rng.random() < grammar.const_prob:
            low, high = np.log10(grammar.const_range)
            return const(_round2(10.0 ** rng.uniform(low, high)))
        return Node(str(rng.choice(grammar.terminals)))
    k = int(rng.integers(n_ops))
    if k < len(grammar.unary):
        return Node(grammar.unary[k], (_draw(rng, grammar, depth - 1, method),))
    name = grammar.binary[k - len(grammar.unary)]
    return Node(name, tuple(_draw(rng, grammar, depth - 1, method) for _ in range(2)))


def _round2(value: float) -> float:
    """``value`` rounded to two significant digits."""
    return float(f"{value:.2g}")


def subtree_crossover(
    a: Node, b: Node, rng: np.random.Generator, grammar: Grammar, *, tries: int = 10
) -> Node:
    """``a`` with a random subtree replaced by a random subtree of ``b``; a copy of ``a`` when
    no swap within the limits is found in ``tries`` draws."""
    pa, pb = _paths(a), _paths(b)
    for _ in range(tries):
        child = _replace(a, pa[int(rng.integers(len(pa)))], _at(b, pb[int(rng.integers(len(pb)))]))
        if grammar.fits(child):
            return child
    return a


def subtree_mutation(
    tree: Node, rng: np.random.Generator, grammar: Grammar, *, depth: int = 3, tries: int = 10
) -> Node:
    """``tree`` with a random subtree replaced by a new random (grow) tree of ``depth``."""
    paths = _paths(tree)
    for _ in range(tries):
        path = paths[int(rng.integers(len(paths)))]
        room = grammar.max_depth - len(path)
        new = random_tree(rng, grammar, depth=max(1, min(depth, room)), method="grow")
        child = _replace(tree, path, new)
        if grammar.fits(child):
            return child
    return tree


def point_mutation(tree: Node, rng: np.random.Generator, grammar: Grammar) -> Node:
    """``tree`` with one node's label changed to another of the same arity (a terminal for a
    terminal; a constant is multiplied by ``10**U(-1, 1)``, rounded to two significant digits,
    so that repeated mutations tune a weight finely). Shape, depth and size are unchanged."""
    paths = _paths(tree)
    path = paths[int(rng.integers(len(paths)))]
    node = _at(tree, path)
    if node.op == "const":
        value = _round2(node.value * 10.0 ** rng.uniform(-1.0, 1.0))
        if value == node.value:  # rounding undid the step
            value = _round2(node.value * 2.0)
        return _replace(tree, path, const(value))
    if node.is_leaf:
        pool = grammar.terminals
    else:
        pool = grammar.unary if len(node.children) == 1 else grammar.binary
    others = [n for n in pool if n != node.op]
    if not others:
        return tree
    return _replace(tree, path, Node(str(rng.choice(others)), node.children))


def tournament(
    fitness: Sequence[float],
    rng: np.random.Generator,
    size: int,
    sizes: Sequence[int] | None = None,
) -> int:
    """Index of the best (lowest) of ``size`` entries drawn without replacement. Ties go to the
    smaller tree when ``sizes`` (tree sizes) is given (parsimony: equivalent metrics padded
    with negligible terms lose), then to the earlier draw."""
    size = min(size, len(fitness))
    picks = rng.choice(len(fitness), size=size, replace=False)
    return int(min(picks, key=lambda i: (fitness[i], sizes[i] if sizes else 0)))


# -- genome --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricGenome:
    """An expression tree as a genome: frozen, hashable, identified by its canonical form.

    The engine memoises and logs on :meth:`key`, the canonical form's string
    (:func:`~evosearch.symbolic.canonical`), so equivalent trees (``sqrt(sqr(W))`` and ``W``)
    are evaluated once; the tree itself is kept as proposed, because the GP operators work on
    it (same seed, same trees).

    Attributes:
        tree: the expression as proposed.
    """

    tree: Node
    canonical: Node = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "canonical", canonical(self.tree))

    def key(self) -> str:
        """The canonical form as an expression string (parses back with ``parse``)."""
        return to_string(self.canonical)

    @classmethod
    def from_key(cls, key: str) -> MetricGenome:
        """The genome of a logged key (its tree is the canonical form)."""
        return cls(parse(key))

    def __str__(self) -> str:
        return to_string(self.tree)


# -- strategy ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GPConfig:
    """Parameters of :class:`GeneticProgramming`.

    Args:
        population: individuals per generation.
        generations: generations after the initial population (the search evaluates about
            ``population + generations * (population - elitism)`` trees).
        tournament_size: entrants per tournament.
        crossover_rate: chance that an offspring starts as a subtree crossover of two parents
            (otherwise as a copy of one).
        subtree_mutation_rate / point_mutation_rate: chances, applied in turn after crossover.
        elitism: best individuals carried over unchanged.
        init_depth: depth of the random trees of the initial population (ramped half-and-half
            over depths 2..init_depth).
        tokens: calibration tokens every tree is scored on (the requests' fidelity; the metric
            search asks for all its calibration tokens).
        grammar: terminals, operators and the depth/size limits.
    """

    population: int = 16
    generations: int = 8
    tournament_size: int = 3
    crossover_rate: float = 0.7
    subtree_mutation_rate: float = 0.2
    point_mutation_rate: float = 0.2
    elitism: int = 2
    init_depth: int = 4
    tokens: int = 2048
    grammar: Grammar = field(default_factory=Grammar)

    def __post_init__(self) -> None:
        if self.population < 2:
            raise ValueError(f"population must be >= 2, got {self.population}")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.tournament_size < 1:
            raise ValueError(f"tournament_size must be >= 1, got {self.tournament_size}")
        for name in ("crossover_rate", "subtree_mutation_rate", "point_mutation_rate"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if not 0 <= self.elitism < self.population:
            raise ValueError(
                f"elitism must lie in [0, population - 1] = [0, {self.population - 1}], "
                f"got {self.elitism}"
            )
        if self.init_depth < 1:
            raise ValueError(f"init_depth must be >= 1, got {self.init_depth}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank_key(tree_fitness: tuple[Node, float]) -> tuple[float, int]:
    """Lower fitness first; among equal fitness, the smaller tree."""
    return tree_fitness[1], tree_fitness[0].size()


class GeneticProgramming:
    """GP over metric trees as a :class:`~evosearch.strategy.Strategy` (minimises fitness;
    ties go to the smaller tree).

    Each :meth:`ask` is one generation (one stage): the initial population, then
    ``population - elitism`` offspring, as :class:`MetricGenome` s scored on
    ``config.tokens`` tokens.

    Args:
        config: the :class:`GPConfig`.
        rng: the only source of randomness.
        seeds: trees placed first in the initial population (e.g. the known metrics); the rest
            is filled with random trees. Seeds outside the grammar's limits are rejected.
    """

    def __init__(
        self, config: GPConfig, *, rng: np.random.Generator, seeds: Sequence[Node] = ()
    ) -> None:
        self.config = config
        self.rng = rng
        g = config.grammar
        for s in seeds:
            if not g.fits(s):
                raise ValueError(f"seed {to_string(s)} exceeds the depth/size limits")
        self.seeds = tuple(seeds)
        self.generation = 0  # generations told so far (0: initial population not yet told)
        self.population: list[tuple[Node, float]] = []
        self.history: list[dict[str, Any]] = []
        self._asked: list[Node] | None = None

    @property
    def done(self) -> bool:
        """All generations have been told."""
        return self.generation > self.config.generations

    def ask(self) -> Request | None:
        """The trees to evaluate now (the initial population, then each generation's
        ``population - elitism`` offspring), or ``None`` when done. Calling it twice without
        :meth:`tell` returns the same trees."""
        if self.done:
            return None
        if self._asked is None:
            self._asked = self._initial() if self.generation == 0 else self._offspring()
        genomes = tuple(MetricGenome(t) for t in self._asked)
        return Request(self.generation, 0, self.config.tokens, genomes)

    def tell(self, request: Request, values: Sequence[float]) -> None:
        """The fitness of the trees of the last :meth:`ask`, in order (``inf`` or ``nan``:
        rejected)."""
        if self._asked is None or request.generation != self.generation:
            raise RuntimeError("tell() must answer the latest ask()")
        if len(values) != len(self._asked):
            raise ValueError(f"expected {len(self._asked)} fitness values, got {len(values)}")
        told = [
            (t, float(f) if not math.isnan(f) else math.inf) for t, f in zip(self._asked, values)
        ]
        elites = self._ranked()[: self.config.elitism] if self.generation else []
        self.population = sorted(elites + told, key=_rank_key)[: self.config.population]
        best_tree, best_value = self._ranked()[0]
        self.history.append(
            {
                "generation": self.generation,
                "best": MetricGenome(best_tree).key(),
                "value": best_value,
                "tokens": request.tokens,
                "proposed": [to_string(t) for t in self._asked],
            }
        )
        self._asked = None
        self.generation += 1

    @property
    def best(self) -> tuple[MetricGenome, float] | None:
        """The best tree told so far and its fitness, or ``None`` before the first tell."""
        if not self.population:
            return None
        tree, value = self._ranked()[0]
        return MetricGenome(tree), value

    def progress_note(self, sign: float = 1.0) -> str:
        """The best metric, readable, for the engine's progress line."""
        best = self.best
        return "" if best is None else f"metric {to_math(best[0].canonical)}"

    def _ranked(self) -> list[tuple[Node, float]]:
        return sorted(self.population, key=_rank_key)

    def _initial(self) -> list[Node]:
        cfg, g = self.config, self.config.grammar
        out: list[Node] = []
        keys: set[str] = set()
        for s in self.seeds:
            key = to_string(canonical(s))
            if key not in keys:
                keys.add(key)
                out.append(s)
        depths = list(range(2, max(cfg.init_depth, 2) + 1))
        attempts = 0
        while len(out) < cfg.population:
            attempts += 1
            depth = depths[len(out) % len(depths)]
            method = "full" if len(out) % 2 else "grow"
            tree = random_tree(self.rng, g, depth=depth, method=method)
            key = to_string(canonical(tree))
            if key in keys and attempts < 50 * cfg.population:
                continue
            keys.add(key)
            out.append(tree)
        return out[: cfg.population]

    def _offspring(self) -> list[Node]:
        cfg, g = self.config, self.config.grammar
        fitness = [f for _, f in self.population]
        trees = [t for t, _ in self.population]
        sizes = [t.size() for t in trees]
        keys = {to_string(canonical(t)) for t in trees}
        out: list[Node] = []
        n = cfg.population - cfg.elitism
        while len(out) < n:
            for _ in range(10):
                parent = trees[tournament(fitness, self.rng, cfg.tournament_size, sizes)]
                child = parent
                if self.rng.random() < cfg.crossover_rate:
                    other = trees[tournament(fitness, self.rng, cfg.tournament_size, sizes)]
                    child = subtree_crossover(child, other, self.rng, g)
                if self.rng.random() < cfg.subtree_mutation_rate:
                    child = subtree_mutation(child, self.rng, g, depth=cfg.init_depth - 1)
                if self.rng.random() < cfg.point_mutation_rate:
                    child = point_mutation(child, self.rng, g)
                key = to_string(canonical(child))
                if key not in keys:
                    break
            else:  # the population has converged here: a fresh random tree keeps it diverse
                for _ in range(50):
                    child = random_tree(self.rng, g, depth=cfg.init_depth, method="grow")
                    key = to_string(canonical(child))
                    if key not in keys:
                        break
            keys.add(key)
            out.append(child)
        return out

    # -- persistence -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: generation, population with fitness, pending ask (also
        valid within a generation), history, rng."""
        return {
            "generation": self.generation,
            "population": [[to_string(t), f] for t, f in self.population],
            "asked": None if self._asked is None else [to_string(t) for t in self._asked],
            "history": self.history,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the strategy then continues exactly as the saved one."""
        self.generation = int(state["generation"])
        self.population = [(parse(t), float(f)) for t, f in state["population"]]
        asked = state.get("asked")
        self._asked = None if asked is None else [parse(t) for t in asked]
        self.history = list(state.get("history", []))
        self.rng.bit_generator.state = state["rng"]
