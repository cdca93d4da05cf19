"""Published depth-pruning heuristics, returning genomes of a :class:`LayerDropSpace`.

All of them respect ``space.allowed`` and drop exactly ``space.num_drop`` blocks (whole blocks;
for a sublayer space, the same blocks' attention and MLP).

* ShortGPT (Men et al., 2024): drop the blocks with the lowest Block Influence
  ``BI_i = 1 - E[cos(x_i, x_{i+1})]`` over calibration tokens.
* Angular distance (Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers", Sec. 3.2): drop the contiguous run of ``n`` blocks ``l..l+n-1`` minimising
  ``arccos(cos(x_l, x_{l+n})) / pi`` for the final token of each sequence, averaged.
* SLEB (Song et al., 2024): greedily remove, ``n`` times, the block whose removal gives the
  lowest calibration score (perplexity in the paper) given the blocks already removed.
* Drop-last-k: the last ``n`` allowed blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from evosearch.genome import Genome
from evosearch.registry import register_baseline
from search_spaces.layer_drop import LayerDropSpace

__all__ = [
    "BASELINES",
    "angular_distance",
    "block_influence",
    "calibration_boundaries",
    "drop_last",
    "influence_order",
    "shortgpt",
    "sleb",
]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def block_influence(boundaries: torch.Tensor) -> torch.Tensor:
    """ShortGPT Block Influence of every block from ``boundaries`` ``(L + 1, N, T, d)``."""
    n_blocks = boundaries.shape[0] - 1
    return torch.stack(
        [1 - _cosine(boundaries[i], boundaries[i + 1]).mean() for i in range(n_blocks)]
    )


def influence_order(boundaries: torch.Tensor, blocks=None) -> list[int]:
    """``blocks`` (default: all) by ShortGPT Block Influence, least influential first (ties:
    lower index first)."""
    bi = block_influence(boundaries)
    return sorted(range(len(bi)) if blocks is None else blocks, key=lambda i: (bi[i].item(), i))


def shortgpt(space: LayerDropSpace, boundaries: torch.Tensor) -> Genome:
    """Drop the ``num_drop`` allowed blocks with the lowest Block Influence."""
    order = influence_order(boundaries, space.allowed)
    return space.from_dropped(blocks=order[: space.num_drop])


def angular_distance(boundaries: torch.Tensor, n: int) -> torch.Tensor:
    """Mean angular distance between the final-token states ``x_l`` and ``x_{l+n}`` for every
    start ``l`` in ``0..L-n``, from ``boundaries`` ``(L + 1, N, T, d)``."""
    last = boundaries[:, :, -1]  # (L + 1, N, d)
    n_blocks = boundaries.shape[0] - 1
    return torch.stack(
        [
            (torch.arccos(_cosine(last[s], last[s + n]).clamp(-1, 1)) / torch.pi).mean()
            for s in range(n_blocks - n + 1)
        ]
    )


def angular(space: LayerDropSpace, boundaries: torch.Tensor) -> Genome:
    """Drop the contiguous run of ``num_drop`` allowed blocks with the smallest angular
    distance across it."""
    n = space.num_drop
    dist = angular_distance(boundaries, n)
    allowed = set(space.allowed)
    starts = [s for s in range(len(dist)) if all(i in allowed for i in range(s, s + n))]
    if not starts:
        raise ValueError(f"no contiguous run of {n} allowed blocks for the angular baseline")
    best = min(starts, key=lambda s: (dist[s].item(), s))
    return space.from_dropped(blocks=range(best, best + n))


def sleb(
    space: LayerDropSpace,
    score: Callable[[Genome], float],
    progress: Callable[[str], None] | None = None,
) -> Genome:
    """Greedy iterative removal: ``num_drop`` rounds, each trying every remaining allowed block
    and keeping the removal with the lowest ``score`` (lower is better)."""
    dropped: list[int] = []
    for step in range(space.num_drop):
        best_value, best_block = float("inf"), None
        for i in space.allowed:
            if i in dropped:
                continue
            value = score(space.from_dropped(blocks=dropped + [i]))
            if value < best_value or best_block is None:
                best_value, best_block = value, i
        dropped.append(best_block)
        if progress:
            progress(
                f"sleb step {step + 1}/{space.num_drop}: drop block {best_block} "
                f"(score {best_value:.4f})"
            )
    return space.from_dropped(blocks=dropped)


def drop_last(space: LayerDropSpace) -> Genome:
    """Drop the last ``num_drop`` allowed blocks."""
    return space.from_dropped(blocks=space.allowed[len(space.allowed) - space.num_drop :])


# name -> what the heuristic needs: "boundaries" (dense hidden states), "score" (a fitness
# callable on genomes) or nothing.
BASELINES: dict[str, str] = {
    "shortgpt": "boundaries",
    "angular": "boundaries",
    "sleb": "score",
    "last": "none",
}


def calibration_boundaries(problem) -> torch.Tensor:
    """Dense hidden states at every block boundary of the calibration data."""
    from evosearch.forward import compute_dense_cache

    if problem.dense.boundaries is not None:
        return problem.dense.boundaries
    return compute_dense_cache(problem.model, problem.data.input_ids).boundaries


def _sleb(problem, settings, log=print) -> Genome:
    """SLEB scored by perplexity on ``settings.sleb_tokens`` calibration tokens."""
    from evosearch.engine import Evaluator, sample_batch
    from evosearch.registry import fitness

    evaluator = Evaluator(
        problem.model, problem.space, fitness("ppl"), problem.dense, settings.prefix_reuse
    )
    tokens = settings.space.settings.sleb_tokens
    batch = sample_batch(problem.data, tokens, seed=settings.seed, generation=2**31 - 1, stage=0)
    return sleb(problem.space, lambda g: evaluator(g, batch)[0], progress=log)


register_baseline(
    "layer-drop", "shortgpt", lambda p, s, log=print: shortgpt(p.space, calibration_boundaries(p))
)
register_baseline(
    "layer-drop", "angular", lambda p, s, log=print: angular(p.space, calibration_boundaries(p))
)
register_baseline("layer-drop", "sleb", _sleb)
register_baseline("layer-drop", "last", lambda p, s, log=print: drop_last(p.space))
