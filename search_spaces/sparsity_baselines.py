"""Allocations a sparsity search is compared with (or starts from): uniform, OWL and Fisher.

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity", Sec. 3): a block's *outlier ratio*
``D_l`` is the share of its Wanda scores ``|W_ij| * ||X_j||`` above ``M`` times their mean;
blocks with more outliers are pruned less. The ratios are min-max scaled into
``[0, 2 * lambda]``, centred, and give each block the sparsity ``target + mean(r) - r_l``, so
the average stays at the target and sparsities span ``target +- lambda``. All linears of a
block share its sparsity. ``M`` and ``lambda`` are chosen by a grid search on calibration data.

Fisher: the second-order estimate of the loss increase of each layer at each level of the
database, ``sum_ij F_ij (W_ij - W'_ij)^2`` with ``F`` the empirical diagonal Fisher (squared
language-modelling gradients, one backward pass per calibration sequence) and ``W'`` the
level's weights (Optimal Brain Damage's saliency with the Fisher for the Hessian). The
allocation minimises the sum of these estimates at the exact budget (:func:`allocate`): layers
are independent in the estimate, so it costs one gradient pass and no candidate evaluation.
Unlike a per-block allocation (OWL) it sets every linear on its own: on SmolLM2-135M at 60 %
it prunes the first blocks and the v projections less and the q projections more.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from evosearch.engine import Evaluator, sample_batch
from evosearch.genome import Genome, LevelSpec
from evosearch.operators import steepest_exchange
from evosearch.pruning import collect_stats
from evosearch.registry import register_baseline

__all__ = [
    "OWL_LAMBDAS",
    "OWL_MS",
    "allocate",
    "compute",
    "fisher",
    "fisher_errors",
    "outlier_ratios",
    "owl",
    "owl_sparsities",
]


OWL_MS = (3.0, 5.0, 7.0, 10.0)
OWL_LAMBDAS = (0.02, 0.05, 0.08, 0.12)


def outlier_ratios(model, space, input_ids: torch.Tensor, ms: Sequence[float]) -> dict:
    """``{M: [D_l per block]}``: per block, the share of Wanda scores above ``M x`` mean."""
    stats = collect_stats(model, input_ids)
    blocks = sorted({r.block for r in space.refs})
    out: dict[float, list[float]] = {m: [] for m in ms}
    for b in blocks:
        scores = torch.cat(
            [
                (r.weight(model).detach().abs().float() * stats[r.name].x_norm[None, :]).flatten()
                for r in space.refs
                if r.block == b
            ]
        )
        mean = scores.mean()
        for m in ms:
            out[m].append(float((scores > m * mean).float().mean()))
    return out


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios (OWL, Eq. 4 and its released scaling)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min())
    scaled = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    density = scaled - scaled.mean() + (1 - target)
    return [float(1 - x) for x in density]


def owl(
    space,
    evaluator: Evaluator,
    data,
    *,
    seed: int = 0,
    tokens: int = 4096,
    ms: Sequence[float] = OWL_MS,
    lambdas: Sequence[float] = OWL_LAMBDAS,
    log: Callable[[str], None] | None = print,
) -> tuple[Genome, dict]:
    """The OWL allocation whose ``(M, lambda)`` gives the best fitness on ``tokens``
    calibration tokens, mapped to the nearest valid genome of ``space``; returns it and the
    grid's fitness table."""
    model = evaluator.model
    ratios = outlier_ratios(model, space, data.input_ids, ms)
    batch = sample_batch(data, tokens, seed=seed, generation=2**31 - 2, stage=0)
    blocks = sorted({r.block for r in space.refs})
    grid = {}
    best: tuple[float, Genome, tuple] | None = None
    for m, lam in itertools.product(ms, lambdas):
        per_block = dict(zip(blocks, owl_sparsities(ratios[m], space.config_.target, lam)))
        genome = space.genome_for([per_block[r.block] for r in space.refs])
        value, _ = evaluator(genome, batch)
        grid[f"M={m:g},lambda={lam:g}"] = value
        if best is None or value < best[0]:
            best = (value, genome, (m, lam))
    assert best is not None
    if log:
        log(f"owl: best M={best[2][0]:g}, lambda={best[2][1]:g} of {len(grid)} settings")
    return best[1], {"grid": grid, "best": {"M": best[2][0], "lambda": best[2][1]}}


def fisher_errors(
    model, space, input_ids: torch.Tensor, *, log: Callable[[str], None] | None = print
) -> list[list[float]]:
    """Per layer of ``space`` and per level ``0..top``: ``sum_ij F_ij (W_ij - W'_ij)^2``, the
    diagonal-Fisher estimate of the loss increase when only that layer is at that level.
    ``F`` sums the squared gradients of one backward pass per sequence of ``input_ids``; it
    holds one float32 copy of the block linears while it is used."""
    stats = collect_stats(model, input_ids, gradients=True, progress=log)
    out = []
    for ref, ladder in zip(space.refs, space.ladders):
        fisher = stats.pop(ref.name).grad_sq
        w = ref.weight(model).detach().float().cpu()
        out.append(
            [
                float((fisher * (w - space.level_weight(ref, k).float().cpu()).pow(2)).sum())
                for k in range(ladder.top + 1)
            ]
        )
    return out


def allocate(
    errors: Sequence[Sequence[float]],
    spec: LevelSpec,
    start: Genome,
    *,
    max_shift: int | None = None,
    centre: Genome | None = None,
) -> Genome:
    """The genome that minimises ``sum_i errors[i][level_i]`` at ``start``'s budgets, by
    steepest exchange: while some switch (one unit down a level, another of its group up one)
    lowers the sum, make the best one. Exact when each unit's errors are convex in its level;
    a local optimum otherwise. With ``max_shift``, no switch takes the genome more than that
    many levels (summed over units) from ``centre``."""
    levels = list(start.levels)
    ref = (centre or start).levels
    shift = [sum(abs(a - b) for a, b in zip(levels, ref))]  # levels moved from the centre

    def moved(levels: list[int], i: int, j: int) -> int:  # its change when i goes down, j up
        def one(u: int, step: int) -> int:
            return abs(levels[u] + step - ref[u]) - abs(levels[u] - ref[u])

        return one(i, -1) + one(j, 1)

    def allowed(levels: list[int], i: int, j: int) -> bool:
        return max_shift is None or shift[0] + moved(levels, i, j) <= max_shift

    def on_move(levels: list[int], i: int, j: int) -> None:
        shift[0] += moved(levels, i, j)

    steepest_exchange(errors, spec, levels, allowed=allowed, on_move=on_move)
    return Genome(tuple(levels))


def fisher(
    space,
    model,
    input_ids: torch.Tensor,
    starts: Sequence[Genome] | None = None,
    *,
    log: Callable[[str], None] | None = print,
) -> list[Genome]:
    """The Fisher allocation (see the module docstring) at the budget of each of ``starts``
    (default: the uniform allocation), each found from its start; one gradient pass serves
    them all, e.g. every sparsity of a range."""
    errors = fisher_errors(model, space, input_ids, log=log)
    starts = list(starts or [space.uniform_genome()])
    bound = space.config_.max_total_shift
    out = [allocate(errors, space.spec, g, max_shift=bound, centre=g) for g in starts]
    if log:
        for start, genome in zip(starts, out):
            log(
                f"fisher: estimated loss increase "
                f"{sum(e[v] for e, v in zip(errors, genome.levels)):.4g} (uniform "
                f"{sum(e[v] for e, v in zip(errors, start.levels)):.4g}) at sparsity "
                f"{space.metrics(genome)['sparsity']:.3f}, "
                f"{sum(abs(a - b) for a, b in zip(genome.levels, start.levels))} levels moved "
                "from uniform"
            )
    return out


def compute(
    name: str, space, evaluator: Evaluator, data, *, seed: int = 0, tokens: int = 4096, log=print
) -> Genome:
    """The genome of baseline ``name`` (``uniform``, ``owl`` or ``fisher``; OWL's grid is
    scored on ``tokens`` calibration tokens)."""
    if name == "uniform":
        return space.uniform_genome()
    if name == "fisher":
        return fisher(space, evaluator.model, data.input_ids, log=log)[0]
    if name == "owl":
        if space.config_.nm is not None:
            raise ValueError("OWL allocates unstructured sparsity; it has no N:M variant")
        return owl(space, evaluator, data, seed=seed, tokens=tokens, log=log)[0]
    raise ValueError(f"unknown sparsity baseline {name!r}; choose from uniform, owl, fisher")


def _registered(name: str):
    def run(problem, settings, log=print) -> Genome:
        return compute(
            name,
            problem.space,
            problem.evaluator(),
            problem.data,
            seed=settings.seed,
            tokens=settings.stages[-1].tokens,  # the fidelity of the search's final stage
            log=log,
        )

    return run


for _name in ("uniform", "owl", "fisher"):
    register_baseline("sparsity", _name, _registered(_name))


def range_starts(problem, warm_start: tuple[str, ...], log=print):
    """The starts of a search over a sparsity range: every budget's uniform allocation first,
    and with ``fisher`` in ``warm_start`` every budget's Fisher allocation last (one gradient
    pass); the middle budget's counts as the ``fisher`` baseline."""
    space = problem.space
    starts = tuple(space.range_uniform_genomes())
    if "fisher" not in warm_start:
        return starts, (), {}
    allocations = tuple(fisher(space, problem.model, problem.data.input_ids, starts, log=log))
    middle = space.uniform_genome()  # the baseline is the middle sparsity's, if searched
    return (
        starts,
        allocations,
        {"fisher": allocations[starts.index(middle)] if middle in starts else None},
    )
