"""Perplexity of a candidate on the calibration tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from evosearch.arch import head_logits
from evosearch.evaluation import Batch, Candidate
from evosearch.registry import register_fitness

__all__ = ["Perplexity", "nll_sum"]


def nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and token count for ``logits`` ``(B, T, V)``."""
    labels = input_ids[:, 1:].to(logits.device)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum"
    )
    return loss.item(), labels.numel()


class Perplexity:
    """``exp`` of the mean next-token NLL over the batch (each sequence predicts tokens 1..T-1).

    Additive: :meth:`partial` returns the summed NLL and its token count, so a batch split
    across workers combines exactly (:meth:`reduce` takes the ``exp`` of the pooled mean).

    Args:
        micro_batch: sequences per forward.
    """

    name = "ppl"
    direction = "minimize"
    additive = True

    def __init__(self, *, micro_batch: int = 4) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.micro_batch = micro_batch

    def prepare(self, model, input_ids, dense) -> None:
        """Nothing to cache: perplexity needs no teacher."""

    @torch.no_grad()
    def partial(self, candidate: Candidate, batch: Batch) -> tuple[float, float]:
        """``(summed next-token NLL, predicted tokens)`` over ``batch``; each sequence's sums
        are also appended to ``candidate.sequences`` when it is a list."""
        parts: list[tuple[float, float]] = []
        for mb in batch.split(self.micro_batch):
            logits = head_logits(candidate.model, candidate.final_hidden(mb))  # (b, T, V)
            labels = mb.input_ids[:, 1:].to(logits.device)
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels.reshape(-1),
                reduction="none",
            ).reshape(labels.shape)  # (b, T - 1)
            parts += [(t, float(nll.shape[1])) for t in nll.double().sum(-1).tolist()]
        if candidate.sequences is not None:
            candidate.sequences.extend(parts)
        return math.fsum(t for t, _ in parts), math.fsum(c for _, c in parts)

    def reduce(self, total: float, count: float) -> float:
        """The perplexity of a batch from its summed :meth:`partial` parts."""
        return math.exp(total / count)

    def __call__(self, candidate: Candidate, batch: Batch) -> float:
        return self.reduce(*self.partial(candidate, batch))


register_fitness("ppl", Perplexity)
register_fitness("perplexity", Perplexity)
