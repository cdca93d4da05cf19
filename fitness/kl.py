"""KL divergence of a candidate from the dense model (EvoPress's default fitness).

The teacher is the dense model's next-token distribution on the calibration tokens. Storing it
in full costs ``vocab`` floats per token, and recomputing it from the cached final hidden states
costs a second LM-head pass per candidate. :class:`KLDivergence` instead keeps, per token, the
``k`` largest teacher log-probabilities, their token ids and the remaining mass as one bucket
(:class:`TopKTeacher`), and scores the candidate by the KL between the two distributions
coarsened to those ``k + 1`` outcomes. By the data-processing inequality this is a lower bound of
the full KL, never negative, and equal to it when ``k`` is the vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evosearch.arch import logit_cap, soft_cap
from evosearch.evaluation import Batch, Candidate
from evosearch.forward import DenseCache
from evosearch.registry import register_fitness

__all__ = ["DEFAULT_TOP_K", "KLDivergence", "TopKTeacher", "build_teacher", "topk_kl"]

# Chosen from experiments/throughput (SmolLM2-135M, WikiText-2): see its README.
DEFAULT_TOP_K = 256
_LOG_TINY = math.log(1e-30)  # floor of log q(rest) when the student's rest mass rounds to 0


@dataclass
class TopKTeacher:
    """The dense model's next-token distribution, kept as its top ``k`` tokens plus the rest.

    Attributes:
        log_probs: ``(N, T, k)`` float32 log-probabilities of the ``k`` likeliest tokens.
        indices: ``(N, T, k)`` their token ids (int32, or int64 for vocabularies over 2^31).
        log_rest: ``(N, T)`` float32 log of the remaining mass (``-inf`` when ``k`` = vocab).
    """

    log_probs: torch.Tensor
    indices: torch.Tensor
    log_rest: torch.Tensor

    @property
    def k(self) -> int:
        return self.log_probs.shape[-1]

    def bytes_per_token(self) -> int:
        """Bytes this cache holds per calibration token."""
        per = self.log_probs.element_size() + self.indices.element_size()
        return self.k * per + self.log_rest.element_size()

    def rows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_probs (n, k), indices (n, k), log_rest (n,))`` of the given sequences,
        flattened over their positions (``n = len(indices) * T``)."""
        k = self.k
        return (
            self.log_probs[indices].reshape(-1, k),
            self.indices[indices].reshape(-1, k).long(),
            self.log_rest[indices].reshape(-1),
        )


@torch.no_grad()
def build_teacher(
    head: torch.nn.Module,
    final_hidden: torch.Tensor,
    k: int,
    *,
    chunk_tokens: int = 1024,
    cap: float | None = None,
) -> TopKTeacher:
    """The top-``k`` teacher of the dense final hidden states ``(N, T, d)``, computed in float32
    in chunks of ``chunk_tokens`` positions (``k`` is capped at the vocabulary size); ``cap`` is
    the model's final logit soft-cap (Gemma 2/3), applied as its own forward does."""
    n, t, d = final_hidden.shape
    weight = head.weight
    flat = final_hidden.reshape(-1, d)
    log_probs, indices, rest = [], [], []
    for s in range(0, flat.shape[0], chunk_tokens):
        h = flat[s : s + chunk_tokens].to(device=weight.device, dtype=weight.dtype)
        logp = F.log_softmax(soft_cap(head(h).float(), cap), dim=-1)  # (c, V)
        top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
        rest.append(torch.logsumexp(logp.scatter(-1, top.indices, -math.inf), dim=-1).cpu())
        log_probs.append(top.values.cpu())
        indices.append(top.indices.cpu())
    vocab = logp.shape[-1]
    index_dtype = torch.int32 if vocab < 2**31 else torch.int64
    k = log_probs[0].shape[-1]
    return TopKTeacher(
        log_probs=torch.cat(log_probs).reshape(n, t, k),
        indices=torch.cat(indices).to(index_dtype).reshape(n, t, k),
        log_rest=torch.cat(rest).reshape(n, t),
    )


def topk_kl(
    log_p: torch.Tensor, indices: torch.Tensor, log_p_rest: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    """Per-position KL(p || q) over the teacher's ``k`` tokens plus the rest bucket, in float32.

    Args:
        log_p: ``(n, k)`` teacher log-probabilities; indices: ``(n, k)`` their token ids.
        log_p_rest: ``(n,)`` log of the teacher's remaining mass.
        logits: ``(n, V)`` student logits, any float dtype.

    Returns:
        ``(n,)`` float32, clamped at 0 against rounding.
    """
    z = logits.float() if logits.dtype != torch.float32 else logits.clone()  # (n, V), ours
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    log_q = z.gather(-1, indices) - lse  # (n, k)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    # log q(rest) from the tokens outside the top k themselves: 1 - sum(q_k) cancels badly
    # when the student is as peaked as the teacher
    z.scatter_(-1, indices, -math.inf)
    log_q_rest = (torch.logsumexp(z, dim=-1) - lse[:, 0]).clamp_min(_LOG_TINY)
    p_rest = log_p_rest.exp()
    rest = torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), torch.zeros_like(p_rest))
    return (kl + rest).clamp_min(0.0)


class KLDivergence:
    """Token-weighted mean of KL(p_dense || q_candidate) over every position of the batch.

    Additive: a batch's value is ``total / tokens`` of its parts' :meth:`partial` sums, so a
    batch may be split across workers and combined exactly (:mod:`evosearch.runners`); the sums
    are also given per sequence (``candidate.sequences``).

    Args:
        micro_batch: sequences per candidate forward.
        top_k: teacher tokens kept per position (:class:`TopKTeacher`, ``k × 8 + 4`` bytes per
            token); ``None`` recomputes the full teacher distribution from the cached final
            hidden states with a second LM-head pass per micro batch (the reference evaluator).
        chunk_tokens: positions whose student logits ``(chunk_tokens, vocab)`` are scored at
            once; bounds the memory of the top-k path. Small chunks stay in the CPU's cache:
            256 scored SmolLM2's logits in half the time of 1024 (experiments/throughput).
    """

    name = "kl"
    direction = "minimize"
    additive = True

    def __init__(
        self,
        *,
        micro_batch: int = 4,
        top_k: int | None = DEFAULT_TOP_K,
        chunk_tokens: int = 256,
    ) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (full vocabulary), got {top_k}")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.micro_batch = micro_batch
        self.top_k = top_k
        self.chunk_tokens = chunk_tokens
        self._dense: DenseCache | None = None
        self._teacher: TopKTeacher | None = None
        self._head_cast: tuple[tuple, torch.Tensor] | None = None  # (key, low-precision weight)
        self._cap: float | None = None  # the model's final logit soft-cap (Gemma 2/3)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_head_cast"] = None  # rebuilt where it is used
        return state

    def prepare(self, model, input_ids: torch.Tensor, dense: DenseCache) -> None:
        """Called once before the search with the dense model's cached activations; builds the
        top-k teacher (or takes it from ``dense.derived``, where it is also left for workers)."""
        self._dense = dense
        self._cap = logit_cap(model)
        if self.top_k is None:
            return
        key = f"kl.top{self.top_k}"
        if key not in dense.derived:
            head = model.get_output_embeddings()
            dense.derived[key] = build_teacher(
                head, dense.final_hidden, self.top_k, chunk_tokens=self.chunk_tokens, cap=self._cap
            )
        self._teacher = dense.derived[key]

    def teacher_bytes_per_token(self) -> int:
        """Bytes per calibration token of the teacher this fitness reads."""
        if self._teacher is not None:
            return self._teacher.bytes_per_token()
        return self._dense.teacher_bytes_per_token() if self._dense is not None else 0

    @torch.no_grad()
    def partial(self, candidate: Candidate, batch: Batch) -> tuple[float, float]:
        """``(sum of per-token KL, tokens)`` over ``batch``; each sequence's sums (in float64)
        are also appended to ``candidate.sequences`` when it is a list."""
        if self._dense is None:
            raise RuntimeError("KLDivergence.prepare() must run before evaluating candidates")
        head = candidate.model.get_output_embeddings()
        parts: list[tuple[float, float]] = []
        for mb in batch.split(self.micro_batch):
            hidden = candidate.final_hidden(mb)  # (b, T, d)
            if self._teacher is None:
                kl = self._full_kl(head, hidden, mb)
            else:
                kl = self._topk_kl(head, hidden, mb)
            kl = kl.reshape(len(mb.indices), -1)  # (b, T)
            parts += [(t, float(kl.shape[1])) for t in kl.double().sum(-1).tolist()]
        if candidate.sequences is not None:
            candidate.sequences.extend(parts)
        return math.fsum(t for t, _ in parts), math.fsum(c for _, c in parts)

    def reduce(self, total: float, count: float) -> float:
        """The fitness of a batch from its summed :meth:`partial` parts."""
        return total / count

    def __call__(self, candidate: Candidate, batch: Batch) -> float:
        return self.reduce(*self.partial(candidate, batch))

    def _full_kl(self, head, hidden: torch.Tensor, mb: Batch) -> torch.Tensor:
        """``(b, T)`` KL against teacher logits recomputed by the head (the reference path)."""
        student = soft_cap(head(hidden).float(), self._cap)  # (b, T, V)
        teacher_h = self._dense.final_hidden[list(mb.indices)].to(student.device)
        teacher = soft_cap(head(teacher_h.to(head.weight.dtype)).float(), self._cap)
        log_p = F.log_softmax(teacher, dim=-1)
        log_q = F.log_softmax(student, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def _topk_kl(self, head, hidden: torch.Tensor, mb: Batch) -> torch.Tensor:
        """``(b * T,)`` top-k KL, scoring ``chunk_tokens`` positions of student logits at a
        time so the full ``(b, T, vocab)`` logits never exist."""
        log_p, idx, log_rest = self._teacher.rows(list(mb.indices))
        flat = hidden.reshape(-1, hidden.shape[-1])  # (b * T, d)
        device = flat.device
        out = []
        for s in range(0, flat.shape[0], self.chunk_tokens):
            e = s + self.chunk_tokens
            logits = soft_cap(self._logits(head, flat[s:e]), self._cap)  # (c, V)
            out.append(
                topk_kl(
                    log_p[s:e].to(device), idx[s:e].to(device), log_rest[s:e].to(device), logits
                )
            )
        return torch.cat(out)

    def _logits(self, head, hidden: torch.Tensor) -> torch.Tensor:
        """``head(hidden)``; under autocast with the head's weight cast once and kept (autocast
        casts a frozen weight again on every call: 28M values per chunk for SmolLM2)."""
        device = hidden.device.type
        if not torch.is_autocast_enabled(device):
            return head(hidden)
        dtype = torch.get_autocast_dtype(device)
        weight = head.weight
        key = (weight.data_ptr(), weight._version, weight.device, dtype)
        if self._head_cast is None or self._head_cast[0] != key:
            self._head_cast = (key, weight.detach().to(dtype))
        bias = None if head.bias is None else head.bias.to(dtype)
        return F.linear(hidden.to(dtype), self._head_cast[1], bias)


register_fitness("kl", KLDivergence)
