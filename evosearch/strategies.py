"""Ask/tell search strategies with staged selection ("racing").

A strategy never touches a model or data. ``ask`` returns a :class:`Request`: genomes to score
at one fidelity (a number of calibration tokens); ``tell`` gets their fitness values (lower is
better) in the same order. Exactly one function, :func:`evosearch.engine.search`, drives the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from evosearch.genome import Genome
from evosearch.operators import level_switch_mutation, number_of_switches

__all__ = ["EvoPress", "EvoPressConfig", "RandomSearch", "Request", "Stage"]


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One selection stage: every candidate is scored on ``tokens`` calibration tokens (the same
    tokens for all of them) and the best ``survivors`` go on."""

    tokens: int
    survivors: int

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"Stage.tokens must be >= 1, got {self.tokens}")
        if self.survivors < 1:
            raise ValueError(f"Stage.survivors must be >= 1, got {self.survivors}")


@dataclass(frozen=True, kw_only=True)
class EvoPressConfig:
    """Hyper-parameters of the EvoPress loop (Sieberling et al., 2024, Alg. 1).

    Args:
        generations: generations after the initial one.
        offspring: λ, new candidates per generation.
        initial_population: random genomes raced in generation 0.
        stages: racing stages of increasing fidelity; the last stage's ``survivors`` is μ, the
            number of parents. Parents re-enter every stage (elitism) and are never eliminated
            before the last one, so they are always compared at the highest fidelity.
        max_switches: mutations apply min(U{1..m}, U{1..m}) level switches.
    """

    generations: int = 20
    offspring: int = 16
    initial_population: int = 16
    stages: tuple[Stage, ...] = (
        Stage(tokens=2048, survivors=2),
        Stage(tokens=16384, survivors=1),
    )
    max_switches: int = 3

    def __post_init__(self) -> None:
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.offspring < 1:
            raise ValueError(f"offspring must be >= 1, got {self.offspring}")
        if self.initial_population < 1:
            raise ValueError(f"initial_population must be >= 1, got {self.initial_population}")
        if not self.stages:
            raise ValueError("stages must not be empty")
        object.__setattr__(
            self, "stages", tuple(s if isinstance(s, Stage) else Stage(**s) for s in self.stages)
        )
        if self.max_switches < 1:
            raise ValueError(f"max_switches must be >= 1, got {self.max_switches}")

    @property
    def parents(self) -> int:
        return self.stages[-1].survivors


@dataclass(frozen=True)
class Request:
    """Genomes to evaluate now, all on the same ``tokens`` of generation ``generation``'s data
    for stage ``stage``."""

    generation: int
    stage: int
    tokens: int
    genomes: tuple[Genome, ...]


@dataclass
class _Member:
    genome: Genome
    value: float = float("inf")
    is_parent: bool = False


class EvoPress:
    """(μ+λ) evolution with budget-preserving level-switch mutation and racing selection.

    Args:
        space: a search space (needs ``spec`` and ``random_genome``).
        config: loop hyper-parameters.
        rng: the only source of randomness.
        variation: ``f(parent, rng) -> Genome``; default: EvoPress level-switch mutation.
        initial: genomes raced in generation 0 alongside the random ones (a warm start, e.g.
            the heuristics' choices); each must be valid for the space.
    """

    def __init__(
        self,
        space,
        *,
        config: EvoPressConfig | None = None,
        rng: np.random.Generator,
        variation: Callable[[Genome, np.random.Generator], Genome] | None = None,
        initial: tuple[Genome, ...] | list[Genome] = (),
    ) -> None:
        if bad := [g for g in initial if not space.spec.is_valid(g)]:
            raise ValueError(f"initial genomes do not fit the space's budget: {bad}")
        self.initial = tuple(dict.fromkeys(initial))  # de-duplicated, order kept
        self.space = space
        self.config = config or EvoPressConfig()
        self.rng = rng
        self.variation = variation or self._mutate
        self.generation = 0
        self.stage = 0
        self.parents: list[_Member] = []
        self.history: list[dict] = []
        self._pool: list[_Member] | None = None

    # -- ask / tell -----------------------------------------------------------------------

    def ask(self) -> Request | None:
        """The next genomes to evaluate, or ``None`` when the search is finished."""
        if self.generation > self.config.generations:
            return None
        if self._pool is None:
            self._pool = self._new_pool()
        tokens = self.config.stages[self.stage].tokens
        genomes = tuple(m.genome for m in self._pool)
        return Request(self.generation, self.stage, tokens, genomes)

    def tell(self, request: Request, values: list[float]) -> None:
        """Fitness values (lower is better) for ``request.genomes``, in order."""
        pool = self._pool
        if pool is None or request.generation != self.generation or request.stage != self.stage:
            raise RuntimeError("tell() must answer the latest ask()")
        if len(values) != len(pool):
            raise ValueError(f"expected {len(pool)} values, got {len(values)}")
        for member, value in zip(pool, values):
            member.value = float(value)
        ranked = sorted(range(len(pool)), key=lambda i: (pool[i].value, i))
        last = self.stage == len(self.config.stages) - 1
        if last:
            self.parents = [
                _Member(pool[i].genome, pool[i].value, True) for i in ranked[: self.config.parents]
            ]
            self.history.append(
                {
                    "generation": self.generation,
                    "best": self.parents[0].genome.key(),
                    "value": self.parents[0].value,
                    "tokens": request.tokens,
                }
            )
            self.generation += 1
            self.stage = 0
            self._pool = None
        else:
            keep = self.config.stages[self.stage].survivors
            challengers = [i for i in ranked if not pool[i].is_parent][:keep]
            kept = sorted({i for i in range(len(pool)) if pool[i].is_parent} | set(challengers))
            self._pool = [pool[i] for i in kept]
            self.stage += 1

    @property
    def best(self) -> tuple[Genome, float] | None:
        """The best parent and its value at the last stage's fidelity, once there is one."""
        if not self.parents:
            return None
        return self.parents[0].genome, self.parents[0].value

    # -- offspring ------------------------------------------------------------------------

    def _mutate(self, parent: Genome, rng: np.random.Generator) -> Genome:
        n = number_of_switches(rng, self.config.max_switches)
        return level_switch_mutation(parent, self.space.spec, rng, n)

    def _new_pool(self) -> list[_Member]:
        if self.generation == 0:
            make, count = self.space.random_genome, self.config.initial_population
            members = [_Member(g) for g in self.initial]
            seen = set(self.initial)
        else:
            members = [_Member(p.genome, is_parent=True) for p in self.parents]
            seen = {p.genome for p in self.parents}
            count = self.config.offspring

            def make(rng):
                parent = self.parents[int(rng.integers(len(self.parents)))].genome
                return self.variation(parent, rng)

        # a space may bound its genomes beyond the budget (e.g. a maximal total deviation)
        feasible = getattr(self.space, "is_feasible", None) or (lambda genome: True)
        for _ in range(count):
            for _attempt in range(100):  # a tiny space may have fewer distinct genomes
                genome = make(self.rng)
                if genome not in seen and feasible(genome):
                    seen.add(genome)
                    members.append(_Member(genome))
                    break
        if not members:
            raise RuntimeError("the search space has no genome to evaluate")
        return members

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-able state; valid between generations (when ``ask`` would start a new pool)."""
        if self._pool is not None:
            raise RuntimeError("state_dict() is only available between generations")
        return {
            "generation": self.generation,
            "parents": [[p.genome.key(), p.value] for p in self.parents],
            "history": self.history,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generation = state["generation"]
        self.stage = 0
        self._pool = None
        self.parents = [_Member(Genome.from_key(k), v, True) for k, v in state["parents"]]
        self.history = list(state["history"])
        self.rng.bit_generator.state = state["rng"]


class RandomSearch(EvoPress):
    """Random search with the same racing, budget and elitism as :class:`EvoPress`: offspring
    are fresh random genomes instead of mutants, so both spend the same evaluations and tokens."""

    def __init__(self, space, *, config: EvoPressConfig | None = None, rng, initial=()) -> None:
        super().__init__(
            space,
            config=config,
            rng=rng,
            variation=lambda _parent, r: space.random_genome(r),
            initial=initial,
        )
