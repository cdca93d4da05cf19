"""Expression trees as a search space: a symbolic metric is a pruned model.

A candidate is a :class:`~evosearch.gp.MetricGenome`; :class:`MetricSpace` materialises it for
the engine's :class:`~evosearch.engine.Evaluator` as pruned copies of every block linear
(module replacement, as every space does: score -> mask -> apply, the dense model untouched).
:mod:`evosearch.metric_search` runs it with the GP strategy on :func:`evosearch.engine.search`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from evosearch.gp import MetricGenome
from evosearch.pruning import LayerStats, block_linears, set_weight_
from evosearch.symbolic import MetricError, metric_pruner, to_math

__all__ = ["MetricSpace"]


class MetricSpace:
    """Expression trees as a search space: a :class:`~evosearch.gp.MetricGenome` is the model
    with every block linear pruned to the target by scoring its weights with the tree.

    :meth:`replacements` gives pruned copies of the block linears (the dense model is never
    changed, so nothing needs restoring); it raises :class:`~evosearch.symbolic.MetricError`,
    with the reason and the layer, for a metric whose scores are unusable (non-finite, constant
    in a row, shapes that do not broadcast), which the engine records as a failed evaluation.

    Args:
        stats: :func:`~evosearch.pruning.collect_stats` of every block linear (with gradients
            when a metric reads G).
        sparsity / pattern: the target (``pattern``, an ``(n, m)`` pair, wins).
    """

    name = "metric"

    def __init__(
        self,
        stats: dict[str, LayerStats],
        *,
        sparsity: float | None,
        pattern: tuple[int, int] | None = None,
    ) -> None:
        self.stats = stats
        self.sparsity = None if pattern else sparsity
        self.pattern = pattern

    def replacements(self, model: nn.Module, genome: MetricGenome) -> dict[str, nn.Module]:
        """Module path -> a copy of the block linear with the pruned weight."""
        pruner = metric_pruner(genome.canonical)
        out = {}
        for ref in block_linears(model):
            module = ref.module(model)
            try:
                pruned = pruner.prune(
                    ref.weight(model), self.stats[ref.name], self.sparsity, pattern=self.pattern
                )
            except MetricError as exc:
                raise MetricError(f"{exc} (layer {ref.name})") from None
            except RuntimeError as exc:  # e.g. terminal shapes that do not broadcast
                raise MetricError(f"evaluation failed: {exc} (layer {ref.name})") from None
            out[ref.name] = _with_weight(module, pruned)
        return out

    def start_block(self, genome: MetricGenome) -> int:
        """Every block changes."""
        return 0

    def describe(self, genome: MetricGenome) -> dict[str, Any]:
        """The canonical metric, its readable math and its size."""
        return {"metric": genome.key(), "math": to_math(genome.canonical), "size": _size(genome)}

    def summary(self) -> str:
        """One line saying what the space searches."""
        target = f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"{self.sparsity:.0%}"
        return f"metric space: every block linear pruned to {target} by a symbolic metric"


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A shallow copy of the linear ``module`` (``nn.Linear`` or GPT-2's ``Conv1D``) holding
    ``weight`` (``(out, in)``) instead of its own; other parameters are shared."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._parameters["weight"] = nn.Parameter(torch.empty_like(module.weight), requires_grad=False)
    set_weight_(new, weight)
    return new


def _size(genome: MetricGenome) -> int:
    return genome.canonical.size()
