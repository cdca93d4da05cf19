"""Optuna samplers (TPE, NSGA-II, NSGA-III, CMA-ES, random) as ask/tell strategies.

Encoding: every unit gets a float *key* in [0, 1] (and, for a multi-budget search, each group
gets an integer budget). A genome is decoded by dealing the group's budget one level at a time to
the unit with the largest ``key / (level + 1)`` that still has room (D'Hondt apportionment; for
0/1 levels: the ``budget`` units with the largest keys). Every sampled point therefore decodes
to a genome that meets the budget exactly, so no evaluation is wasted on an infeasible point
(constraints via Optuna's ``constraints_func`` would spend evaluations learning what the repair
gives for free), and continuous samplers such as CMA-ES apply unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from evosearch.genome import Genome, LevelSpec
from evosearch.pareto import pareto_front
from evosearch.strategies import Request

__all__ = ["SAMPLERS", "OptunaStrategy", "OptunaStrategyConfig", "decode_keys", "encode_genome"]

SAMPLERS = ("tpe", "nsga2", "nsga3", "cmaes", "random")


@dataclass(frozen=True, kw_only=True)
class OptunaStrategyConfig:
    """Settings of an Optuna-driven search.

    Args:
        sampler: one of :data:`SAMPLERS`.
        generations: batches after the first (``generations + 1`` batches in all, as EvoPress).
        batch_size: trials asked per batch (the population size of NSGA-II/III).
        tokens: calibration tokens every candidate is scored on (one fidelity).
        budget_range: ``(low, high)`` or ``(low, high, step)``: search every group's budget
            in this range as well (multi-budget / multi-objective search); ``None`` keeps the
            space's budgets.
        budget_groups: the groups whose budget ``budget_range`` samples (``None``: all); the
            others keep the space's budgets (e.g. a composite space's slack group).
    """

    sampler: str = "tpe"
    generations: int = 20
    batch_size: int = 16
    tokens: int = 2048
    budget_range: tuple[int, ...] | None = None
    budget_groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if self.budget_range is not None:
            lo, hi, *step = self.budget_range
            if not 0 <= lo <= hi or len(step) > 1 or (step and step[0] < 1):
                raise ValueError(
                    f"budget_range must be (low, high[, step]) with 0 <= low <= high and "
                    f"step >= 1, got {self.budget_range}"
                )


def decode_keys(spec: LevelSpec, keys: list[float], budgets: dict[int, int]) -> Genome:
    """The genome that deals each group's budget by D'Hondt over the units' keys."""
    levels = [0] * spec.n_units
    for group, budget in sorted(budgets.items()):
        units = [u for u in spec.units_of(group) if spec.max_levels[u] > 0]
        capacity = sum(spec.max_levels[u] for u in units)
        if budget > capacity:
            raise ValueError(f"budget {budget} of group {group} exceeds its capacity {capacity}")
        for _ in range(budget):
            u = max(
                (u for u in units if levels[u] < spec.max_levels[u]),
                key=lambda u: (keys[u] / (levels[u] + 1), -u),
            )
            levels[u] += 1
    return Genome(tuple(levels))


def encode_genome(spec: LevelSpec, genome: Genome) -> list[float]:
    """Keys in [0, 1] that :func:`decode_keys` turns back into ``genome`` (at its own budgets).

    Unit ``u`` gets a key proportional to ``level_u + 1/2``: its quotients ``key / (l + 1)`` are
    above the common threshold ``1/scale`` exactly for its first ``level_u`` levels, so the
    apportionment deals each group's budget back as ``genome`` holds it.
    """
    scale = max(spec.max_levels) + 0.5
    return [(v + 0.5) / scale for v in genome.levels]


def _make_sampler(name: str, seed: int, batch_size: int, n_objectives: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=batch_size, seed=seed)
    if name == "nsga3":
        return optuna.samplers.NSGAIIISampler(population_size=batch_size, seed=seed)
    if name == "cmaes":
        if n_objectives > 1:
            raise ValueError("CMA-ES is single-objective; use nsga2/nsga3/tpe/random")
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


class OptunaStrategy:
    """Drive a search space with an Optuna sampler through the engine's ask/tell protocol.

    Args:
        space: the search space (``spec`` is used).
        config: sampler settings.
        seed: the sampler's seed.
        objectives: extra minimised objectives ``f(genome) -> tuple`` (e.g. parameter count)
            appended to the fitness for a multi-objective study; ``None``: single objective.
        initial: genomes enqueued as the first trials (a warm start, e.g. the uniform
            allocation of a sparsity space), encoded exactly by :func:`encode_genome`.
    """

    def __init__(
        self,
        space,
        *,
        config: OptunaStrategyConfig | None = None,
        seed: int = 0,
        objectives: Callable[[Genome], tuple[float, ...]] | None = None,
        initial: tuple[Genome, ...] | list[Genome] = (),
    ) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space
        self.config = config or OptunaStrategyConfig()
        self.objectives = objectives
        spec = space.spec
        self._active = [u for u in range(spec.n_units) if spec.max_levels[u] > 0]
        self._distributions: dict = {
            f"key.{u}": optuna.distributions.FloatDistribution(0.0, 1.0) for u in self._active
        }
        if self.config.budget_range is not None:
            lo, hi, *step = self.config.budget_range
            step_ = step[0] if step else 1
            hi = lo + (hi - lo) // step_ * step_  # Optuna needs high on the step grid
            for g in sorted(self.config.budget_groups or spec.budgets):
                self._distributions[f"budget.{g}"] = optuna.distributions.IntDistribution(
                    lo, hi, step=step_
                )
        n_obj = 1 + (len(objectives(spec_genome(spec))) if objectives else 0)
        self._n_objectives = n_obj
        self.study = optuna.create_study(
            directions=["minimize"] * n_obj,
            sampler=_make_sampler(self.config.sampler, seed, self.config.batch_size, n_obj),
        )
        for genome in dict.fromkeys(initial):
            if not spec.is_valid(genome) and self.config.budget_range is None:
                raise ValueError(f"initial genome {genome.key()} does not fit the space's budget")
            keys = encode_genome(spec, genome)
            params = {f"key.{u}": keys[u] for u in self._active}
            if self.config.budget_range is not None:
                for g in sorted(self.config.budget_groups or spec.budgets):
                    params[f"budget.{g}"] = spec.group_total(genome.levels, g)
            self.study.enqueue_trial(params)
        self.generation = 0
        self.history: list[dict] = []
        self._pending: list = []
        self._request: Request | None = None
        self._best: tuple[Genome, float] | None = None
        self._told: list[list[float | None]] = []

    def decode(self, params: dict) -> Genome:
        spec = self.space.spec
        keys = [0.0] * spec.n_units
        for u in self._active:
            keys[u] = params[f"key.{u}"]
        budgets = {g: params.get(f"budget.{g}", b) for g, b in spec.budgets.items()}
        genome = decode_keys(spec, keys, budgets)
        repair = getattr(self.space, "repair", None)  # deterministic: same params, same genome
        return genome if repair is None else repair(genome)

    @property
    def done(self) -> bool:
        """True once the last generation has been told (``ask`` then returns ``None``)."""
        return self.generation > self.config.generations

    def ask(self) -> Request | None:
        """The next batch of trials as genomes, or ``None`` when the search is finished."""
        if self.done:
            return None
        if self._request is None:  # asked again before a tell: the same trials
            self._pending = [
                self.study.ask(self._distributions) for _ in range(self.config.batch_size)
            ]
            genomes = tuple(self.decode(t.params) for t in self._pending)
            self._request = Request(self.generation, 0, self.config.tokens, genomes)
        return self._request

    def tell(self, request: Request, values: list[float]) -> None:
        """Fitness values for the latest request's trials (``inf``: a failed trial)."""
        import optuna

        if self._request is None or request.generation != self.generation:
            raise RuntimeError("tell() must answer the latest ask()")
        if len(values) != len(self._pending):
            raise ValueError(f"expected {len(self._pending)} values, got {len(values)}")
        for trial, genome, value in zip(self._pending, request.genomes, values):
            if value == float("inf"):
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            extra = tuple(self.objectives(genome)) if self.objectives else ()
            self.study.tell(trial, [value, *extra] if extra else value)
            if self._best is None or value < self._best[1]:
                self._best = (genome, value)
        self._pending = []
        self._request = None
        self._told.append([None if v == float("inf") else v for v in values])
        if self._best is not None:
            self.history.append(
                {
                    "generation": self.generation,
                    "best": self._best[0].key(),
                    "value": self._best[1],
                    "tokens": request.tokens,
                }
            )
        self.generation += 1

    @property
    def best(self) -> tuple[Genome, float] | None:
        """The genome with the lowest fitness so far (first objective)."""
        return self._best

    def pareto(self) -> list[tuple[Genome, tuple[float, ...]]]:
        """The non-dominated evaluated genomes and their objective values (each once)."""
        import optuna

        done = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        points = [(self.decode(t.params), tuple(t.values)) for t in done]
        return [points[i] for i in pareto_front([v for _, v in points])]

    def state_dict(self) -> dict:
        """JSON-able state between generations: the values told so far. Loading replays them
        through a fresh sampler with the same seed, which asks the same points again (samplers
        are deterministic given their seed and history), so no pickled sampler is stored."""
        return {"generation": self.generation, "told": self._told}

    def load_state_dict(self, state: dict) -> None:
        """Replay :meth:`state_dict`'s values through this fresh strategy's sampler."""
        if self.generation != 0:
            raise RuntimeError("load_state_dict() needs a fresh strategy")
        for values in state["told"]:
            request = self.ask()
            self.tell(request, [float("inf") if v is None else v for v in values])
        if self.generation != state["generation"]:
            raise RuntimeError("replaying the study did not reach the checkpoint's generation")


def spec_genome(spec: LevelSpec) -> Genome:
    """Some genome of the spec's shape (used to probe the number of extra objectives)."""
    return Genome((0,) * spec.n_units)
