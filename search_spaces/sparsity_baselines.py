"""Allocations a sparsity search is compared with (or starts from): uniform, OWL and
layer-error.

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity", Sec. 3): a block's *outlier ratio*
``D_l`` is the share of its Wanda scores ``|W_ij| * ||X_j||`` above ``M`` times their mean;
blocks with more outliers are pruned less. The ratios are min-max scaled into
``[0, 2 * lambda]``, centred, and give each block the sparsity ``target + mean(r) - r_l``, so
the average stays at the target and sparsities span ``target +- lambda``. All linears of a
block share its sparsity. ``M`` and ``lambda`` are chosen by a grid search on calibration data.

Layer-error: each layer's relative output error at each level of the database,
``tr(dW H dW^T) / tr(W H W^T)`` with ``H = X^T X`` of its calibration inputs and ``dW`` the
weights the level removes (or changes), then the allocation that minimises the sum of these
errors at the exact budget (:func:`allocate`). It costs one forward pass of the dense model and
no candidate evaluation. Since a level step removes the same number of weights in every layer,
a step is a large share of a small layer (k/v projections) and a small share of a large one
(MLP): the allocation prunes small layers less, which uniform and OWL (one sparsity per block)
cannot express.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from evosearch.engine import Evaluator, sample_batch
from evosearch.genome import Genome, LevelSpec
from evosearch.pruning import collect_stats

__all__ = [
    "OWL_LAMBDAS",
    "OWL_MS",
    "allocate",
    "compute",
    "layer_error",
    "layer_errors",
    "outlier_ratios",
    "owl",
    "owl_sparsities",
]

HESSIAN_BYTES = 2**30  # input statistics held at once by layer_errors (one pass per chunk)

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


def layer_errors(
    model, space, input_ids: torch.Tensor, *, log: Callable[[str], None] | None = print
) -> list[list[float]]:
    """Per layer of ``space`` and per level ``0..top``: the relative output error
    ``tr(dW H dW^T) / tr(W H W^T)`` on ``input_ids``. The input statistics ``H`` are collected
    in chunks of layers of at most :data:`HESSIAN_BYTES` (one dense forward pass each)."""
    chunks: list[list] = [[]]
    size = 0
    for ref in space.refs:
        need = ref.shape[1] ** 2 * 4
        if chunks[-1] and size + need > HESSIAN_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(ref)
        size += need
    out: dict[str, list[float]] = {}
    for i, chunk in enumerate(chunks):
        if log and len(chunks) > 1:
            log(f"layer-error: input statistics, pass {i + 1}/{len(chunks)}")
        stats = collect_stats(model, input_ids, hessian=True, layers=[r.name for r in chunk])
        for ref in chunk:
            h = stats[ref.name].hessian
            w = ref.weight(model).detach().float().cpu()
            total = float((w @ h * w).sum())
            ladder = space.ladders[space.refs.index(ref)]
            errors = []
            for level in range(ladder.top + 1):
                d = w - space.level_weight(ref, level).float().cpu()
                errors.append(float((d @ h * d).sum()) / max(total, 1e-30))
            out[ref.name] = errors
        del stats
    return [out[r.name] for r in space.refs]


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
    shift = sum(abs(a - b) for a, b in zip(levels, ref))

    def moved(u: int, step: int) -> int:  # change of the total shift when unit u moves
        return abs(levels[u] + step - ref[u]) - abs(levels[u] - ref[u])

    while True:
        best: tuple[float, int, int] | None = None
        for g in sorted(spec.budgets):
            units = spec.units_of(g)
            down = sorted(
                (errors[u][levels[u] - 1] - errors[u][levels[u]], u) for u in units if levels[u]
            )
            up = sorted(
                (errors[u][levels[u] + 1] - errors[u][levels[u]], u)
                for u in units
                if levels[u] < spec.max_levels[u]
            )
            for d, i in down:
                if not up or d + up[0][0] >= (best[0] if best else -1e-12):
                    break  # no later decrease can do better
                for c, j in up:
                    if d + c >= (best[0] if best else -1e-12):
                        break
                    if i != j and (
                        max_shift is None or shift + moved(i, -1) + moved(j, 1) <= max_shift
                    ):
                        best = (d + c, i, j)
                        break
        if best is None:
            return Genome(tuple(levels))
        _, i, j = best
        shift += moved(i, -1)
        levels[i] -= 1
        shift += moved(j, 1)
        levels[j] += 1


def layer_error(
    space, model, input_ids: torch.Tensor, *, log: Callable[[str], None] | None = print
) -> tuple[Genome, dict]:
    """The layer-error allocation of ``space`` (see the module docstring) and its summed
    relative error next to uniform's."""
    errors = layer_errors(model, space, input_ids, log=log)
    uniform = space.uniform_genome()
    genome = allocate(
        errors, space.spec, uniform, max_shift=space.config_.max_total_shift, centre=uniform
    )
    total = {
        "layer_error": sum(e[v] for e, v in zip(errors, genome.levels)),
        "uniform": sum(e[v] for e, v in zip(errors, uniform.levels)),
    }
    if log:
        log(
            f"layer-error: summed relative error {total['layer_error']:.4g} "
            f"(uniform {total['uniform']:.4g}), {space.total_shift(genome)} levels moved"
        )
    return genome, {"summed_error": total}


def compute(
    name: str, space, evaluator: Evaluator, data, *, seed: int = 0, tokens: int = 4096, log=print
) -> Genome:
    """The genome of baseline ``name`` (``uniform``, ``owl`` or ``layer-error``; OWL's grid
    is scored on ``tokens`` calibration tokens)."""
    if name == "uniform":
        return space.uniform_genome()
    if name == "layer-error":
        return layer_error(space, evaluator.model, data.input_ids, log=log)[0]
    if name == "owl":
        if space.config_.nm is not None:
            raise ValueError("OWL allocates unstructured sparsity; it has no N:M variant")
        return owl(space, evaluator, data, seed=seed, tokens=tokens, log=log)[0]
    raise ValueError(f"unknown sparsity baseline {name!r}; choose from uniform, owl, layer-error")
