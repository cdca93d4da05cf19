"""Ask/tell search strategies with staged selection ("racing").

A strategy never touches a model or data. ``ask`` returns a :class:`Request`: genomes to score
at one fidelity (a number of calibration tokens); ``tell`` gets their fitness values (lower is
better) in the same order. Exactly one function, :func:`evosearch.engine.search`, drives the loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from evosearch.genome import Genome, LevelSpec
from evosearch.operators import (
    anchored_step,
    budget_step,
    local_neighbours,
    mixed_mutation,
    number_of_switches,
    random_genome,
    switch_neighbours,
)
from evosearch.pareto import pareto_front
from evosearch.strategy import Request, Stage, Strategy

__all__ = [
    "EvoPress",
    "EvoPressConfig",
    "MultiBudgetEvoPress",
    "RandomSearch",
    "Request",
    "Stage",
    "Strategy",
]


@dataclass(frozen=True, kw_only=True)
class EvoPressConfig:
    """Hyper-parameters of the EvoPress loop (Sieberling et al., 2024, Alg. 1).

    Args:
        generations: generations after the initial one.
        offspring: λ, new candidates per generation.
        initial_population: random genomes raced in generation 0 next to the strategy's
            ``initial`` genomes; 0 starts from the initial genomes alone (EvoPress's start from
            the uniform allocation, so no random genome can take its place by a noisy win).
        stages: racing stages of increasing fidelity; the last stage's ``survivors`` is μ, the
            number of parents. Parents re-enter every stage (elitism) and are never eliminated
            before the last one, so they are always compared at the highest fidelity.
        max_switches: mutations apply min(U{1..m}, U{1..m}) level switches.
        adaptive_switches: self-adjust ``m`` (after Doerr et al., 2017, "The (1+λ) EA with
            self-adjusting mutation rate"): half of each generation's offspring draw their
            switches with ``m / 2``, half with ``2 m``, and ``m`` moves to the half whose
            offspring ranked best in the first racing stage. ``m`` starts at
            ``max_switches`` and stays within [1, number of units]. Meant for spaces with
            many units, where one to three switches are a tiny step. Off by default: on
            SmolLM2-135M its gain was within the seed spread (experiments/strategies).
        locality: probability that a switch of a mutation is a local switch (the receiving
            unit lies next to a unit holding a level: a dropped block slides along or joins a
            run of dropped blocks, :func:`~evosearch.operators.local_switch`) instead of a
            switch between two random units. 0 is EvoPress's mutation.
        polish: after the last generation, up to this many more generations whose offspring
            are the best parent's whole one-switch neighbourhood
            (:func:`~evosearch.operators.switch_neighbours`), raced through the same stages;
            they stop after the first that keeps the best parent (a local optimum at the
            racing's fidelity). Meant for small neighbourhoods (layer drop: ``k * (n - k)``).
        polish_stages: the racing stages of a polish generation (``None``: ``stages``), e.g.
            a cheap first stage over the whole neighbourhood and a final one on many more
            tokens than an evolution generation affords, where the last few candidates differ
            by less than a short batch can tell. Its last stage keeps as many as ``stages``'s.
        polish_moves: the neighbourhood a polish generation races: ``"all"`` one-switch
            neighbours, or ``"local"`` ones only (:func:`~evosearch.operators.local_neighbours`:
            for layer drop, at most ``2k`` targets once the dropped blocks form runs).
        max_seconds: a wall-clock budget for the whole search (``None``: none). The loop
            (:func:`~evosearch.engine.search`) ends the evolution early when the next
            generation and the polish would not fit in it, then runs the polish; so
            ``generations`` becomes an upper bound.
    """

    generations: int = 20
    offspring: int = 16
    initial_population: int = 16
    stages: tuple[Stage, ...] = (
        Stage(tokens=2048, survivors=2),
        Stage(tokens=16384, survivors=1),
    )
    max_switches: int = 3
    adaptive_switches: bool = False
    locality: float = 0.0
    polish: int = 0
    polish_moves: str = "all"
    polish_stages: tuple[Stage, ...] | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.offspring < 1:
            raise ValueError(f"offspring must be >= 1, got {self.offspring}")
        if self.initial_population < 0:
            raise ValueError(f"initial_population must be >= 0, got {self.initial_population}")
        if not self.stages:
            raise ValueError("stages must not be empty")
        object.__setattr__(self, "stages", _as_stages(self.stages))
        if self.polish_stages is not None:
            object.__setattr__(self, "polish_stages", _as_stages(self.polish_stages))
            if not self.polish_stages:
                raise ValueError("polish_stages must not be empty (None: the stages)")
            if self.polish_stages[-1].survivors != self.parents:
                raise ValueError(
                    f"polish_stages must end keeping {self.parents} (as stages do), "
                    f"got {self.polish_stages[-1].survivors}"
                )
            if not self.polish:
                raise ValueError("polish_stages needs polish >= 1")
        if self.max_switches < 1:
            raise ValueError(f"max_switches must be >= 1, got {self.max_switches}")
        if not 0 <= self.locality <= 1:
            raise ValueError(f"locality must lie in [0, 1], got {self.locality}")
        if self.polish < 0:
            raise ValueError(f"polish must be >= 0, got {self.polish}")
        if self.polish_moves not in ("all", "local"):
            raise ValueError(f"polish_moves must be 'all' or 'local', got {self.polish_moves!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")

    @property
    def parents(self) -> int:
        return self.stages[-1].survivors

    def racing(self, polishing: bool = False) -> tuple[Stage, ...]:
        """The stages of an evolution generation, or of a polish generation."""
        return self.polish_stages if polishing and self.polish_stages else self.stages

    def generation_tokens(self, pool: int, polishing: bool = False) -> int:
        """Calibration tokens of one generation whose first stage races ``pool`` genomes (each
        later stage: the previous stage's survivors plus the parents), none memoised."""
        stages = self.racing(polishing)
        later = zip(stages, stages[1:])
        return pool * stages[0].tokens + sum(
            s.tokens * (p.survivors + self.parents) for p, s in later
        )


def _as_stages(stages) -> tuple[Stage, ...]:
    return tuple(s if isinstance(s, Stage) else Stage(**s) for s in stages)


@dataclass
class _Member:
    genome: Genome
    value: float = float("inf")
    is_parent: bool = False


def _scored_pool(strategy, request: Request, values: list[float]) -> list[_Member]:
    """The pending pool of ``strategy`` with ``values`` set, after checking that ``request``
    is the one it asked last."""
    pool = strategy._pool
    if (
        pool is None
        or request.generation != strategy.generation
        or request.stage != strategy.stage
    ):
        raise RuntimeError("tell() must answer the latest ask()")
    if len(values) != len(pool):
        raise ValueError(f"expected {len(pool)} values, got {len(values)}")
    for member, value in zip(pool, values):
        member.value = float(value)
    return pool


def _draw(space, makers, seen: set[Genome], rng: np.random.Generator) -> list[_Member]:
    """One new member per maker ``f(rng) -> Genome``: distinct from ``seen`` (which grows) and
    feasible for the space; a maker that finds none in 100 tries (a tiny space) adds nothing.
    A space with ``repair(genome, rng)`` (e.g. a composite space's bytes, or a budget a
    mutation left unspent) has every made genome repaired first."""
    feasible = getattr(space, "is_feasible", None) or (lambda genome: True)
    repair = getattr(space, "repair", None) or (lambda genome, rng: genome)
    members = []
    for make in makers:
        for _attempt in range(100):
            genome = repair(make(rng), rng)
            if genome not in seen and feasible(genome):
                seen.add(genome)
                members.append(_Member(genome))
                break
    return members


class _SwitchCount:
    """The ``m`` of ``min(U{1..m}, U{1..m})`` level switches per mutation and, with
    ``adaptive_switches``, its self-adjustment: :meth:`plan` gives half the offspring
    ``m / 2`` and half ``2 m``, :meth:`mutate` makes a child and notes the ``m`` it was drawn
    with, and :meth:`update` moves ``m`` to the value of the best ranked offspring. ``m``
    (default ``max_switches``) restores a checkpoint's value."""

    def __init__(
        self, config: EvoPressConfig, n_units: int, m: int | None = None, space=None
    ) -> None:
        # a space's own ``mutation(genome, spec, rng, n)`` (e.g. a composite space's, which
        # moves each of its parts as often as any other) replaces the level switches
        self.operator = getattr(space, "mutation", None)
        self.adaptive = config.adaptive_switches
        self.max_switches = config.max_switches
        self.locality = config.locality
        self.m = config.max_switches if m is None else m
        self.n_units = n_units
        self.origin: dict[Genome, int] = {}

    def plan(self, count: int) -> list[int]:
        if not self.adaptive:
            return [self.m] * count
        low, high = max(1, round(self.m / 2)), max(1, min(self.n_units, 2 * self.m))
        return [low] * (count - count // 2) + [high] * (count // 2)

    def mutate(self, parent: Genome, spec: LevelSpec, rng, m: int | None = None) -> Genome:
        """A mutant of ``parent`` with ``min(U{1..m}, U{1..m})`` switches (``m`` default:
        ``max_switches``), each a local switch with probability ``locality``, recorded as
        drawn with ``m``."""
        m = m or self.max_switches
        n = number_of_switches(rng, m)
        if self.operator is not None:
            child = self.operator(parent, spec, rng, n)
        else:
            child = mixed_mutation(parent, spec, rng, n, self.locality)
        if self.adaptive:
            self.origin[child] = m
        return child

    def update(self, ranked: list[Genome]) -> None:
        """``ranked``: the offspring, best first (other genomes are ignored)."""
        best = next((g for g in ranked if g in self.origin), None)
        if best is not None:
            self.m = self.origin[best]
        self.origin = {}


class EvoPress:
    """(μ+λ) evolution with budget-preserving level-switch mutation and racing selection.

    Args:
        space: a search space (needs ``spec`` and ``random_genome``; generation 0 draws from
            its ``initial_genome`` where it has one).
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
        if self.config.initial_population == 0 and not self.initial:
            raise ValueError("initial_population=0 needs initial genomes to start from")
        self.rng = rng
        self.variation = variation or self._mutate
        self.generation = 0
        self.stage = 0
        self.parents: list[_Member] = []
        self.history: list[dict] = []
        self._pool: list[_Member] | None = None
        self._switches = _SwitchCount(self.config, space.spec.n_units, space=space)
        self.settled = False  # a polish generation kept the best parent
        self.last_generation = self.config.generations  # moved earlier by finish()
        self.last_polish = self.config.generations + self.config.polish

    # -- ask / tell -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the last generation has been told (``ask`` then returns ``None``): the
        last evolution generation, then the polish generations until one keeps the best."""
        if self.generation <= self.last_generation:
            return False
        return self.settled or self.generation > self.last_polish

    @property
    def polishing(self) -> bool:
        """Whether the current generation is a polish generation (see ``polish``)."""
        return self.generation > self.last_generation

    @property
    def _stages(self) -> tuple[Stage, ...]:
        return self.config.racing(self.polishing)

    def finish(self) -> None:
        """End the search early (between generations): no more evolution generations, only
        the polish (if any); called during the polish, end it too. The loop calls it when its
        wall-clock budget runs short."""
        if self._pool is not None:
            raise RuntimeError("finish() is only available between generations")
        if self.polishing:
            self.last_polish = self.generation - 1
        else:
            self.last_generation = self.generation - 1
            self.last_polish = self.last_generation + self.config.polish

    def finishing_tokens(self) -> int:
        """Calibration tokens the search still needs once :meth:`finish` is called: one polish
        generation (its pool raced through every stage), or 0."""
        if self.polishing or not self.config.polish or not self.parents:
            return 0
        return self.config.generation_tokens(len(self._polish_pool()), polishing=True)

    def ask(self) -> Request | None:
        """The next genomes to evaluate, or ``None`` when the search is finished."""
        if self.done:
            return None
        if self._pool is None:
            self._pool = self._new_pool()
        tokens = self._stages[self.stage].tokens
        genomes = tuple(m.genome for m in self._pool)
        parents = tuple(m.genome for m in self._pool if m.is_parent)
        return Request(self.generation, self.stage, tokens, genomes, parents)

    def tell(self, request: Request, values: list[float]) -> None:
        """Fitness values (lower is better) for ``request.genomes``, in order."""
        pool = _scored_pool(self, request, values)
        ranked = sorted(range(len(pool)), key=lambda i: (pool[i].value, i))
        if self.stage == 0:
            self._switches.update([pool[i].genome for i in ranked if not pool[i].is_parent])
        last = self.stage == len(self._stages) - 1
        if last:
            before = self.parents[0].genome if self.parents else None
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
            if self.polishing:
                self.history[-1]["polish"] = True
                self.settled = self.parents[0].genome == before
            if self.config.adaptive_switches:
                self.history[-1]["switch_scale"] = self.switch_scale
            self.generation += 1
            self.stage = 0
            self._pool = None
        else:
            keep = self._stages[self.stage].survivors
            challengers = [i for i in ranked if not pool[i].is_parent][:keep]
            kept = sorted({i for i in range(len(pool)) if pool[i].is_parent} | set(challengers))
            self._pool = [pool[i] for i in kept]
            self.stage += 1

    @property
    def switch_scale(self) -> int:
        """The ``m`` of the next generation's mutations (moves with ``adaptive_switches``)."""
        return self._switches.m

    @property
    def best(self) -> tuple[Genome, float] | None:
        """The best parent and its value at the last stage's fidelity, once there is one."""
        if not self.parents:
            return None
        return self.parents[0].genome, self.parents[0].value

    # -- offspring ------------------------------------------------------------------------

    def _mutate(self, parent: Genome, rng: np.random.Generator, m: int | None = None) -> Genome:
        return self._switches.mutate(parent, self.space.spec, rng, m)

    def _polish_pool(self) -> list[_Member]:
        """The parents, then every feasible neighbour of the best parent (``polish_moves``)."""
        feasible = getattr(self.space, "is_feasible", None) or (lambda genome: True)
        members = [_Member(p.genome, is_parent=True) for p in self.parents]
        seen = {p.genome for p in self.parents}
        moves = local_neighbours if self.config.polish_moves == "local" else switch_neighbours
        for genome in moves(self.parents[0].genome, self.space.spec):
            if genome not in seen and feasible(genome):
                seen.add(genome)
                members.append(_Member(genome))
        return members

    def _new_pool(self) -> list[_Member]:
        if self.polishing:
            return self._polish_pool()
        if self.generation == 0:
            members = [_Member(g) for g in self.initial]
            seen = set(self.initial)
            start = getattr(self.space, "initial_genome", self.space.random_genome)
            makers = [start] * self.config.initial_population
        else:
            members = [_Member(p.genome, is_parent=True) for p in self.parents]
            seen = {p.genome for p in self.parents}

            def make(rng, m):
                parent = self.parents[int(rng.integers(len(self.parents)))].genome
                if self.variation != self._mutate:  # a user's variation
                    return self.variation(parent, rng)
                return self._mutate(parent, rng, m)

            plan = self._switches.plan(self.config.offspring)
            makers = [lambda rng, m=m: make(rng, m) for m in plan]
        # a space may bound its genomes beyond the budget (e.g. a maximal total deviation)
        members += _draw(self.space, makers, seen, self.rng)
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
            "switch_scale": self._switches.m,
            "settled": self.settled,
            "last_generation": self.last_generation,
            "last_polish": self.last_polish,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the search goes on exactly as the saved one)."""
        self.generation = state["generation"]
        self.stage = 0
        self._pool = None
        self.settled = state.get("settled", False)
        self.last_generation = state.get("last_generation", self.config.generations)
        self.last_polish = state.get("last_polish", self.last_generation + self.config.polish)
        self.parents = [_Member(Genome.from_key(k), v, True) for k, v in state["parents"]]
        self.history = list(state["history"])
        self.rng.bit_generator.state = state["rng"]
        n_units = self.space.spec.n_units
        self._switches = _SwitchCount(
            self.config, n_units, state.get("switch_scale"), space=self.space
        )


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


class MultiBudgetEvoPress:
    """EvoPress over a range of budgets at once: one elite per budget, shared by its neighbours.

    A multi-objective search over compression levels (e.g. KL vs parameters for 3..15 dropped
    blocks, or KL vs average sparsity for 50..70 %) as a quality-diversity loop: every budget
    of ``budgets`` is a *niche* holding its best ``mu`` genomes (``mu`` = the last stage's
    ``survivors``). Each offspring picks a niche at random and is made from one of: a
    level-switch mutation of that niche's elite (the budget is kept), or the elite of the
    next lower / higher budget with levels added / removed at random units until it meets this
    niche's budget (:func:`~evosearch.operators.budget_step`). Because good genomes at
    neighbouring budgets are alike (the best 7 dropped blocks mostly contain the best 6), a
    find at one budget seeds the others, which independent single-budget runs cannot do.

    Racing is as in :class:`EvoPress`, with fitness compared *within* a niche: at a non-final
    stage the challengers compete globally for ``survivors`` places by their relative
    improvement over their niche's reference (a niche without an elite keeps its best
    candidate). With ``lazy_parents`` (default) the elites join only the final stage, where
    they are compared with the survivors on the same tokens, and the early-stage reference is
    the elite's last value: all challengers of a stage share one batch, so its difficulty
    scales every niche alike, and the tokens EvoPress spends re-scoring a parent per niche at
    every stage go to offspring instead (in a simulated 5-budget layer drop at equal tokens
    this made 4.15 of 5 budgets match or beat separate EvoPress runs, against 3.6 with the
    parents re-raced). ``lazy_parents=False`` re-races them in every stage, as EvoPress does.
    The final stage sets each niche's elites.

    Args:
        space: a search space (``spec``, optionally ``is_feasible``).
        budgets: the niches, in increasing order: each an ``int`` (that budget in every group
            of the space, as ``num_drop`` is) or a ``{group: budget}`` dict.
        config: loop settings (``initial_population`` random genomes are spread over the
            niches, at least one each; 0: none, every niche starts from its initial genomes).
        rng: the only source of randomness.
        objectives: extra minimised objectives ``f(genome) -> tuple`` reported next to the
            fitness by :meth:`pareto` (e.g. the parameter count); default: the niche index.
        initial: extra genomes for generation 0, each meeting one of the niches' budgets.
        labels: a name per niche for histories and logs (default: the budget).
        focus: give each generation's offspring to only this many niches, taken in turn
            (generation ``g`` >= 1 serves niches ``(g - 1) * focus ...`` modulo their number),
            so every niche gets the same share of whole generations, as separate single-budget
            runs would, and its challengers race only each other (``None``: each offspring
            picks its niche at random, and all challengers race for the survivor places).
        lazy_parents: elites join the final racing stage only (see above).
        anchors: a reference genome per niche, e.g. each sparsity's uniform allocation. A
            neighbour's elite then moves to a niche as its offset from its own anchor added to
            this niche's anchor (levels clipped to each unit's range, the budget then made
            exact by :func:`~evosearch.operators.budget_step`): the elite's *pattern* (which
            layers are pruned more or less than uniform) carries over, instead of the budget
            difference landing on random units. ``None``: budget steps as above.
    """

    def __init__(
        self,
        space,
        *,
        budgets,
        config: EvoPressConfig | None = None,
        rng: np.random.Generator,
        objectives: Callable[[Genome], tuple[float, ...]] | None = None,
        initial: tuple[Genome, ...] | list[Genome] = (),
        labels: tuple[str, ...] | list[str] | None = None,
        focus: int | None = None,
        lazy_parents: bool = True,
        anchors: tuple[Genome, ...] | list[Genome] | None = None,
    ) -> None:
        self.space = space
        self.config = config or EvoPressConfig()
        self.rng = rng
        self.objectives = objectives
        groups = sorted(space.spec.budgets)
        niches = []
        for b in budgets:
            if isinstance(b, dict):
                if sorted(b) != groups:
                    raise ValueError(f"a niche's budgets must name the groups {groups}, got {b}")
                niches.append(tuple(int(b[g]) for g in groups))
            else:
                niches.append((int(b),) * len(groups))
        if not niches or len(set(niches)) != len(niches):
            raise ValueError("budgets must be a non-empty list of distinct budgets")
        self.niches = tuple(niches)
        self.lazy_parents = lazy_parents
        self.focus = None if focus is None else min(int(focus), len(niches))
        if self.focus is not None and self.focus < 1:
            raise ValueError(f"focus must be >= 1, got {focus}")
        self.labels = (
            tuple(labels)
            if labels
            else tuple(str(n[0]) if len(set(n)) == 1 else "/".join(map(str, n)) for n in niches)
        )
        if len(self.labels) != len(niches):
            raise ValueError(f"{len(niches)} budgets but {len(self.labels)} labels")
        self._groups = groups
        self._index = {n: i for i, n in enumerate(niches)}
        self._specs = [self._spec_at(space.spec, dict(zip(groups, n))) for n in niches]
        if bad := [g.key() for g in initial if self.niche_of(g) is None]:
            raise ValueError(f"initial genomes meet none of the budgets searched: {bad}")
        self.initial = tuple(dict.fromkeys(initial))
        covered = {self.niche_of(g) for g in self.initial}
        if self.config.initial_population == 0 and (
            empty := [lab for i, lab in enumerate(self.labels) if i not in covered]
        ):
            raise ValueError(
                f"initial_population=0 needs an initial genome at every budget; none at {empty}"
            )
        if anchors is not None and [self.niche_of(a) for a in anchors] != list(range(len(niches))):
            raise ValueError("anchors must hold one genome per budget, in the budgets' order")
        self.anchors = None if anchors is None else tuple(anchors)
        self.generation = 0
        self.stage = 0
        self.elites: dict[int, list[_Member]] = {}
        self.history: list[dict] = []
        self._pool: list[_Member] | None = None
        self._switches = _SwitchCount(self.config, space.spec.n_units, space=space)

    @staticmethod
    def _spec_at(spec: LevelSpec, budgets: dict[int, int]) -> LevelSpec:
        try:
            return dataclasses.replace(spec, budgets=budgets)
        except ValueError as exc:
            raise ValueError(f"budget {budgets} does not fit the space: {exc}") from None

    def niche_of(self, genome: Genome) -> int | None:
        """The index of the niche whose budgets ``genome`` meets, or ``None``."""
        spec = self.space.spec
        sums = tuple(spec.group_total(genome.levels, g) for g in self._groups)
        return self._index.get(sums)

    # -- ask / tell -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the last generation has been told (``ask`` then returns ``None``)."""
        return self.generation > self.config.generations

    def ask(self) -> Request | None:
        """The next genomes to evaluate, or ``None`` when the search is finished."""
        if self.done:
            return None
        if self._pool is None:
            self._pool = self._new_pool()
        tokens = self.config.stages[self.stage].tokens
        genomes = tuple(m.genome for m in self._pool)
        parents = tuple(m.genome for m in self._pool if m.is_parent)
        return Request(self.generation, self.stage, tokens, genomes, parents)

    def tell(self, request: Request, values: list[float]) -> None:
        """Fitness values (lower is better) for ``request.genomes``, in order; the last
        stage sets each niche's elites."""
        pool = _scored_pool(self, request, values)
        by_niche: dict[int, list[int]] = {}
        for i, m in enumerate(pool):
            by_niche.setdefault(self.niche_of(m.genome), []).append(i)
        if self.stage == 0 and self._switches.origin:  # rank by improvement on their elite
            gains = []
            for i, m in enumerate(pool):
                elite = self.elites.get(self.niche_of(m.genome))
                if elite and not m.is_parent:
                    gains.append(((m.value - elite[0].value) / max(abs(elite[0].value), 1e-12), i))
            self._switches.update([pool[i].genome for _, i in sorted(gains)])
        if self.stage == len(self.config.stages) - 1:
            mu = self.config.parents
            for n, idx in by_niche.items():
                ranked = sorted(idx, key=lambda i: (pool[i].value, i))[:mu]
                if math.isfinite(pool[ranked[0]].value):
                    self.elites[n] = [_Member(pool[i].genome, pool[i].value, True) for i in ranked]
            best = self.best
            self.history.append(
                {
                    "generation": self.generation,
                    "best": best[0].key() if best else None,
                    "value": best[1] if best else math.inf,
                    "tokens": request.tokens,
                    "niches": {
                        self.labels[n]: self.elites[n][0].value for n in sorted(self.elites)
                    },
                }
            )
            if self.config.adaptive_switches:
                self.history[-1]["switch_scale"] = self._switches.m
            self.generation += 1
            self.stage = 0
            self._pool = None
            return
        keep: set[int] = set()
        scored: list[tuple[float, int]] = []
        for n, idx in by_niche.items():
            parents = [i for i in idx if pool[i].is_parent]
            challengers = sorted(
                (i for i in idx if not pool[i].is_parent), key=lambda i: (pool[i].value, i)
            )
            if parents:
                reference = min(pool[i].value for i in parents)
            elif self.lazy_parents and n in self.elites:  # its last value, other tokens
                reference = self.elites[n][0].value
            else:  # a niche without an elite keeps its best
                parents = [challengers.pop(0)]
                reference = pool[parents[0]].value
            keep.update(parents)
            scale = max(abs(reference), 1e-12)
            scored += [((pool[i].value - reference) / scale, i) for i in challengers]
        survivors = self.config.stages[self.stage].survivors
        keep.update(i for _, i in sorted(scored)[:survivors])
        self._pool = [pool[i] for i in sorted(keep)]
        self.stage += 1
        if self.lazy_parents and self.stage == len(self.config.stages) - 1:
            self._pool = self._with_parents(self._pool)

    @property
    def best(self) -> tuple[Genome, float] | None:
        """The elite with the lowest fitness over all budgets (first objective), as for the
        Optuna strategies; :meth:`pareto` is the result of a multi-budget search."""
        elites = [e[0] for e in self.elites.values()]
        if not elites:
            return None
        top = min(elites, key=lambda m: m.value)
        return top.genome, top.value

    def progress_note(self, sign: float = 1.0) -> str:
        """One line for progress output: every budget's elite fitness (``sign`` turns the
        minimised values back into the fitness's own direction)."""
        values = ", ".join(
            f"{self.labels[n]}: {sign * self.elites[n][0].value:.3g}" for n in sorted(self.elites)
        )
        return f"budgets {len(self.elites)}/{len(self.niches)} [{values}]"

    def pareto(self) -> list[tuple[Genome, tuple[float, ...]]]:
        """The non-dominated niche elites and their objective values ``(fitness, *extra)``."""
        points = []
        for n in sorted(self.elites):
            m = self.elites[n][0]
            extra = tuple(self.objectives(m.genome)) if self.objectives else (float(-n),)
            points.append((m.genome, (m.value, *extra)))
        return [points[i] for i in pareto_front([v for _, v in points])]

    # -- offspring ------------------------------------------------------------------------

    def _step(self, genome: Genome, source: int, target: int, rng) -> Genome:
        """``genome`` (at niche ``source``) moved to niche ``target``'s budgets, guided by the
        elite beyond ``target`` when there is one (see :func:`budget_step`)."""
        beyond = self.elites.get(2 * target - source)
        guide = beyond[int(rng.integers(len(beyond)))].genome if beyond else None
        if self.anchors is not None:
            a = self.anchors
            return anchored_step(genome, self.space.spec, rng, a[source], a[target], guide)
        deltas = {
            g: want - have
            for g, have, want in zip(self._groups, self.niches[source], self.niches[target])
        }
        return budget_step(genome, self.space.spec, rng, deltas, guide)

    def _with_parents(self, members: list[_Member]) -> list[_Member]:
        """The elites of the niches of ``members`` (to race again beside them: elitism, on
        new tokens when a stage's batch changes per generation), then ``members``."""
        have = {m.genome for m in members}
        niches = sorted({self.niche_of(m.genome) for m in members})
        parents = [
            _Member(m.genome, is_parent=True)
            for n in niches
            for m in self.elites.get(n, [])
            if m.genome not in have
        ]
        return parents + members

    def _offspring(
        self, rng: np.random.Generator, n: int | None = None, m: int | None = None
    ) -> Genome:
        """A child for niche ``n`` (random if ``None``); a mutation of its elite uses
        ``min(U{1..m}, U{1..m})`` switches (``m``: ``max_switches`` if ``None``)."""
        if n is None:
            n = int(rng.integers(len(self.niches)))
        sources = [s for s in (n, n - 1, n + 1) if s in self.elites]
        if not sources:
            return random_genome(self._specs[n], rng)
        source = sources[int(rng.integers(len(sources)))]
        parents = self.elites[source]
        parent = parents[int(rng.integers(len(parents)))].genome
        if source == n:
            return self._switches.mutate(parent, self._specs[n], rng, m)
        return self._step(parent, source, n, rng)

    def _new_pool(self) -> list[_Member]:
        if self.generation == 0:
            members = [_Member(g) for g in self.initial]
            seen = set(self.initial)
            n_random = self.config.initial_population
            per_niche = max(1, -(-n_random // len(self.niches))) if n_random else 0
            makers = [
                (lambda rng, n=n: random_genome(self._specs[n], rng))
                for n in range(len(self.niches))
                for _ in range(per_niche)
            ]
        else:
            members = []
            seen = {m.genome for ms in self.elites.values() for m in ms}
            plan = self._switches.plan(self.config.offspring)
            if self.focus is None:
                makers = [(lambda rng, m=m: self._offspring(rng, None, m)) for m in plan]
            else:  # the next niches in turn, the offspring dealt round-robin among them
                first = (self.generation - 1) * self.focus
                chosen = [(first + i) % len(self.niches) for i in range(self.focus)]
                makers = [
                    (lambda rng, n=int(chosen[i % self.focus]), m=m: self._offspring(rng, n, m))
                    for i, m in enumerate(plan)
                ]
        members += _draw(self.space, makers, seen, self.rng)
        if not self.lazy_parents:
            members = self._with_parents(members)
        if not members:
            raise RuntimeError("the search space has no genome to evaluate")
        return members

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-able state; valid between generations."""
        if self._pool is not None:
            raise RuntimeError("state_dict() is only available between generations")
        return {
            "generation": self.generation,
            "elites": {
                str(n): [[m.genome.key(), m.value] for m in ms] for n, ms in self.elites.items()
            },
            "history": self.history,
            "rng": self.rng.bit_generator.state,
            "switch_scale": self._switches.m,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the search goes on exactly as the saved one)."""
        self.generation = state["generation"]
        self.stage = 0
        self._pool = None
        n_units = self.space.spec.n_units
        self._switches = _SwitchCount(
            self.config, n_units, state.get("switch_scale"), space=self.space
        )
        self.elites = {
            int(n): [_Member(Genome.from_key(k), v, True) for k, v in ms]
            for n, ms in state["elites"].items()
        }
        self.history = list(state["history"])
        self.rng.bit_generator.state = state["rng"]
