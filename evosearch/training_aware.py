"""Training-aware selection (DarwinLM, Tang et al. 2025, Sec. 3.3): train each candidate for a
stage-specific number of tokens, then score it with an inner fitness (KL by default).

The fidelity is given, not guessed: the engine's shared batch carries its racing stage, and
``schedule`` maps the stage index to its training tokens, so training grows across stages as the
scoring batch does. A batch without a stage (the final all-token comparison) trains as much as
the last stage.

Every space trains through the same code as healing (:func:`evosearch.training.structured`
and :func:`~evosearch.training.train_`), so a candidate trains keeping the structure it will be
emitted with: dropped blocks and sublayers have nothing to train, pruned weights stay zero
(LoRA updates masked elementwise, full updates re-masked after every step), removed widths stay
removed, quantized linears stay on their grid (fake-quantized forward). Select it in any space
with ``selection_training`` in the config (CLI: ``--train-tokens 2048,8192``).

Memory per candidate: ``lora`` adds rank-``r`` adapters to every projection of the changed
blocks (``r (in + out)`` parameters per projection; a dense ``(out, in)`` update for sparse or
quantized ones, whose update is masked or fake-quantized) plus AdamW's two moments of them;
nothing of the resident model is copied or changed. ``full`` trains the output projections
(``o_proj`` / ``down_proj``) of the changed blocks in place, as width pruning compensates them,
and restores them after scoring: a copy of them plus two AdamW moments. Activations for
backpropagation through the blocks from the first changed one are on top.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from evosearch.arch import get_blocks, head_logits
from evosearch.evaluation import Batch, Candidate
from evosearch.forward import DenseCache
from evosearch.surgery import apply_replacements
from evosearch.training import TrainConfig, structured, train_

__all__ = ["TrainingAware"]


class TrainingAware:
    """Wraps a fitness: ``value = inner(candidate trained for schedule[batch.stage] tokens)``.

    The candidate's adapters are discarded and its fully trained weights restored after
    scoring: the resident model (and a space's cached modules) never change. Training
    sequences are calibration sequences outside the stage's scoring batch when there are
    enough, chosen from ``(seed, training tokens)`` alone, so every candidate of a stage trains
    on the same tokens and results are reproducible.

    Args:
        inner: the fitness after training (e.g. :class:`~fitness.kl.KLDivergence`).
        schedule: racing stage index -> training tokens, one entry per stage.
        config: how to train (:class:`~evosearch.training.TrainConfig`); with ``distill`` the
            teacher logits come from the dense cache (no second model in memory).
    """

    direction = "minimize"

    def __init__(self, inner, schedule: dict[int, int], config: TrainConfig) -> None:
        if not schedule:
            raise ValueError("schedule needs at least one (stage -> training tokens)")
        if any(t < 0 for t in schedule.values()):
            raise ValueError(f"training tokens must be >= 0, got {schedule}")
        self.inner, self.schedule, self.config = inner, dict(schedule), config
        self.name = f"{getattr(inner, 'name', 'fitness')}+train"
        self.direction = getattr(inner, "direction", "minimize")
        self._ids: torch.Tensor | None = None
        self._dense: DenseCache | None = None

    def prepare(self, model, input_ids: torch.Tensor, dense: DenseCache) -> None:
        self._ids, self._dense = input_ids, dense
        if hasattr(self.inner, "prepare"):
            self.inner.prepare(model, input_ids, dense)

    def train_tokens(self, batch: Batch) -> int:
        """Training tokens for the racing stage ``batch`` belongs to (the last stage's when
        the batch has none)."""
        last = self.schedule[max(self.schedule)]
        return last if batch.stage is None else self.schedule.get(batch.stage, last)

    def training_rows(self, batch: Batch, tokens: int) -> list[int]:
        """Calibration rows to train on, ``ceil(tokens / seq_len)`` of them: rows outside
        ``batch`` (all rows if ``batch`` holds every one), repeated when there are too few."""
        n_all, seq_len = self._ids.shape
        n = math.ceil(tokens / seq_len)
        outside = [i for i in range(n_all) if i not in set(batch.indices)]
        pool = outside if outside else list(range(n_all))
        rng = np.random.default_rng([self.config.seed, tokens])
        rows: list[int] = []
        while len(rows) < n:  # more tokens than the pool holds: further passes, reshuffled
            rows += rng.permutation(pool)[: n - len(rows)].tolist()
        return rows

    def __call__(self, candidate: Candidate, batch: Batch) -> float:
        if self._ids is None:
            raise RuntimeError("TrainingAware.prepare() must run before evaluating candidates")
        tokens = self.train_tokens(batch)
        model, start = candidate.model, candidate.start_block
        blocks = range(start, len(get_blocks(model)))
        if tokens == 0 or not blocks:
            return self.inner(candidate, batch)
        # trained weights: neither a parent's states nor this candidate's are valid for others
        candidate = dataclasses.replace(candidate, reference=None, keep=None)
        rows = self.training_rows(batch, tokens)
        ids = self._ids[rows]
        dense = self._dense
        start_hidden = None
        if start > 0 and dense is not None and dense.boundaries is not None:
            start_hidden = dense.boundaries[start, rows]
        else:
            start = 0
            blocks = range(0, len(get_blocks(model)))
        teacher = None
        if self.config.distill and dense is not None:

            def teacher(_ids, sub, rows=rows):
                h = dense.final_hidden[[rows[j] for j in sub]]
                return head_logits(model, h)

        plan = structured(model, blocks, self.config)
        saved = [p.detach().clone() for p in plan.params] if self.config.mode == "full" else []
        try:
            with apply_replacements(model, plan.replacements):
                if plan.params:
                    train_(
                        model,
                        plan.params,
                        ids,
                        self.config,
                        teacher=teacher,
                        start_block=start,
                        start_hidden=start_hidden,
                        after_step=plan.after_step,
                    )
                with torch.no_grad():  # scored as trained: masked, on the grid
                    return self.inner(candidate, batch)
        finally:
            with torch.no_grad():
                for p, value in zip(plan.params, saved):
                    p.copy_(value)
