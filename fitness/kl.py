"""KL divergence of a candidate from the dense model (EvoPress's default fitness)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evosearch.evaluation import Batch, Candidate
from evosearch.forward import DenseCache
from evosearch.registry import register_fitness

__all__ = ["KLDivergence"]


class KLDivergence:
    """Token-weighted mean of KL(p_dense || q_candidate) over every position of the batch.

    The teacher is not stored as logits: ``prepare`` receives the dense model's final hidden
    states (``d`` floats per token) and teacher logits are recomputed by the LM head per micro
    batch, which costs one extra head matmul but keeps the cache ``vocab/d`` times smaller.

    Args:
        micro_batch: sequences per forward; bounds the ``(b, T, vocab)`` logits in memory.
    """

    name = "kl"
    direction = "minimize"

    def __init__(self, *, micro_batch: int = 4) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.micro_batch = micro_batch
        self._dense: DenseCache | None = None

    def prepare(self, model, input_ids: torch.Tensor, dense: DenseCache) -> None:
        """Called once before the search with the dense model's cached activations."""
        self._dense = dense

    @torch.no_grad()
    def __call__(self, candidate: Candidate, batch: Batch) -> float:
        if self._dense is None:
            raise RuntimeError("KLDivergence.prepare() must run before evaluating candidates")
        head = candidate.model.get_output_embeddings()
        total, count = 0.0, 0
        for mb in batch.split(self.micro_batch):
            student = head(candidate.final_hidden(mb)).float()  # (b, T, V)
            teacher_h = self._dense.final_hidden[list(mb.indices)].to(student.device)
            teacher = head(teacher_h.to(head.weight.dtype)).float()  # (b, T, V)
            log_p = F.log_softmax(teacher, dim=-1)
            log_q = F.log_softmax(student, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (b, T)
            total += kl.sum().item()
            count += kl.numel()
        return total / count


register_fitness("kl", KLDivergence)
