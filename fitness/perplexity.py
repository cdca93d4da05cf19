"""Perplexity of a candidate on the calibration tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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

    Args:
        micro_batch: sequences per forward.
    """

    name = "ppl"
    direction = "minimize"

    def __init__(self, *, micro_batch: int = 4) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.micro_batch = micro_batch

    def prepare(self, model, input_ids, dense) -> None:
        """Nothing to cache: perplexity needs no teacher."""

    @torch.no_grad()
    def __call__(self, candidate: Candidate, batch: Batch) -> float:
        head = candidate.model.get_output_embeddings()
        total, count = 0.0, 0
        for mb in batch.split(self.micro_batch):
            s, n = nll_sum(head(candidate.final_hidden(mb)), mb.input_ids)
            total += s
            count += n
        return math.exp(total / count)


register_fitness("ppl", Perplexity)
register_fitness("perplexity", Perplexity)
