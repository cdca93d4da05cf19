"""Allocations a sparsity search is compared with: uniform, and OWL.

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity", Sec. 3): a block's *outlier ratio*
``D_l`` is the share of its Wanda scores ``|W_ij| * ||X_j||`` above ``M`` times their mean;
blocks with more outliers are pruned less. The ratios are min-max scaled into
``[0, 2 * lambda]``, centred, and give each block the sparsity ``target + mean(r) - r_l``, so
the average stays at the target and sparsities span ``target +- lambda``. All linears of a
block share its sparsity. ``M`` and ``lambda`` are chosen by a grid search on calibration data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from evosearch.engine import Evaluator, sample_batch
from evosearch.genome import Genome
from evosearch.pruning import collect_stats

__all__ = ["OWL_LAMBDAS", "OWL_MS", "compute", "outlier_ratios", "owl_sparsities", "owl"]

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


def compute(
    name: str, space, evaluator: Evaluator, data, *, seed: int = 0, tokens: int = 4096, log=print
) -> Genome:
    """The genome of baseline ``name`` (``uniform`` or ``owl``; OWL's grid is scored on
    ``tokens`` calibration tokens)."""
    if name == "uniform":
        return space.uniform_genome()
    if name == "owl":
        if space.config_.nm is not None:
            raise ValueError("OWL allocates unstructured sparsity; it has no N:M variant")
        return owl(space, evaluator, data, seed=seed, tokens=tokens, log=log)[0]
    raise ValueError(f"unknown sparsity baseline {name!r}; choose from uniform, owl")
