"""Pruning the linear layers of the blocks: calibration statistics, then score -> mask -> apply.

Every base pruner has the same shape, :class:`Pruner`: given a layer's dense weight ``(out, in)``,
its calibration statistics and a target (a sparsity, or an N:M pattern), return the pruned weight
with zeros in place. Score-based pruners (:class:`ScorePruner`: magnitude, Wanda, or any scoring
function such as a discovered symbolic metric) rank weights within each output row; SparseGPT
(:class:`SparseGPT`) also updates the remaining weights to compensate (Frantar & Alistarh 2023).

Statistics come from one pass of the *dense* model over calibration tokens
(:func:`collect_stats`), so pruned versions of different layers are independent and any
combination of them is a valid model (EvoPress, Sec. 3.2).

Example:
    >>> stats = collect_stats(model, input_ids)                     # doctest: +SKIP
    >>> pruner = PRUNERS["wanda"]()                                 # doctest: +SKIP
    >>> ref = block_linears(model)[0]                               # doctest: +SKIP
    >>> w = pruner.prune(ref.weight(model), stats[ref.name], sparsity=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from evosearch.arch import arch_for, get_blocks, get_submodule
from evosearch.forward import model_device

__all__ = [
    "PRUNERS",
    "LayerStats",
    "LinearRef",
    "Pruner",
    "ScorePruner",
    "SparseGPT",
    "block_linears",
    "collect_stats",
    "keep_mask",
    "parse_pattern",
    "prune_counts",
    "row_ranks",
    "set_weight_",
    "sparsity_of",
]


# -- where the linears are ---------------------------------------------------------------------


@dataclass(frozen=True)
class LinearRef:
    """One linear projection of one block.

    Attributes:
        name: module path from the model root, e.g. ``model.layers.3.self_attn.q_proj``.
        block: block index.
        kind: block-relative path, e.g. ``self_attn.q_proj`` (layers of one kind have one shape).
        shape: ``(out_features, in_features)``.
    """

    name: str
    block: int
    kind: str
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def module(self, model: nn.Module) -> nn.Module:
        return get_submodule(model, self.name)

    def weight(self, model: nn.Module) -> torch.Tensor:
        """The weight as ``(out, in)`` (GPT-2's ``Conv1D`` stores it transposed)."""
        return _weight_view(self.module(model))


def _weight_view(module: nn.Module) -> torch.Tensor:
    w = module.weight
    return w if isinstance(module, nn.Linear) else w.t()  # Conv1D: (in, out)


def set_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy an ``(out, in)`` weight into ``module`` in place (either storage layout)."""
    with torch.no_grad():
        _weight_view(module).copy_(weight.to(module.weight.dtype))


def block_linears(model: nn.Module) -> list[LinearRef]:
    """Every linear projection of every block, in block order then the architecture table's
    order (attention projections, then MLP projections)."""
    arch = arch_for(model)
    out = []
    for i, block in enumerate(get_blocks(model)):
        for kind in arch.attention_linears + arch.mlp_linears:
            w = _weight_view(get_submodule(block, kind))
            out.append(LinearRef(f"{arch.blocks}.{i}.{kind}", i, kind, tuple(w.shape)))
    return out


# -- calibration statistics ----------------------------------------------------------------------


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input and weight gradient.

    Attributes:
        n_tokens: tokens the statistics were accumulated over.
        x_sq: ``(in,)`` sum over tokens of each input channel squared; Wanda's
            ``||X_j||_2`` is ``x_sq.sqrt()``.
        hessian: ``(in, in)`` sum over tokens of ``x x^T`` (SparseGPT's ``H = 2 X X^T`` up to
            scale), or ``None`` when not collected.
        grad_sq: ``(out, in)`` sum over sequences of the squared loss gradient of the weight;
            GBLM's / Pruner-Zero's gradient magnitude ``G`` is ``grad_sq.sqrt()``. ``None``
            when not collected.
    """

    n_tokens: int
    x_sq: torch.Tensor
    hessian: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None

    @property
    def x_norm(self) -> torch.Tensor:
        """Wanda's per-input-channel activation norm ``||X_j||_2``, ``(in,)``."""
        return self.x_sq.sqrt()


def collect_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    hessian: bool = False,
    gradients: bool = False,
    micro_batch: int = 4,
    layers: Collection[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> dict[str, LayerStats]:
    """One pass of the dense model over ``input_ids`` ``(N, T)``, accumulating the input
    statistics of every block linear (or only of those named in ``layers``) and, with
    ``gradients``, squared weight gradients of the language-modelling loss, one backward per
    sequence as in GBLM. Input statistics are accumulated in ``dtype`` on the CPU. The model is
    left unchanged (gradients are cleared)."""
    refs = block_linears(model)
    if layers is not None:
        if unknown := sorted(set(layers) - {r.name for r in refs}):
            raise ValueError(f"not block linears of this model: {unknown}")
        refs = [r for r in refs if r.name in set(layers)]
    stats: dict[str, LayerStats] = {}
    for ref in refs:
        in_features = ref.shape[1]
        stats[ref.name] = LayerStats(
            0,
            torch.zeros(in_features, dtype=dtype),
            torch.zeros(in_features, in_features, dtype=dtype) if hessian else None,
        )

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(dtype)  # (tokens, in)
            s = stats[name]
            s.n_tokens += x.shape[0]
            s.x_sq += (x * x).sum(0).cpu()
            if s.hessian is not None:
                s.hessian += (x.t() @ x).cpu()

        return fn

    handles = [ref.module(model).register_forward_pre_hook(hook(ref.name)) for ref in refs]
    device = model_device(model)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], micro_batch):
                model(input_ids=input_ids[start : start + micro_batch].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if gradients:
        _collect_gradients(model, refs, input_ids, stats, progress)
    return stats


def _collect_gradients(model, refs, input_ids, stats, progress) -> None:
    device = model_device(model)
    params = [ref.module(model).weight for ref in refs]
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    sums = [torch.zeros(ref.shape) for ref in refs]
    model.eval()
    try:
        for n, ids in enumerate(input_ids):
            ids = ids[None].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, params)
            for s, g, ref in zip(sums, grads, refs):
                g = g if g.shape == ref.shape else g.t()
                s += g.detach().float().pow(2).cpu()
            if progress and (n + 1) % 16 == 0:
                progress(f"gradients: {n + 1}/{input_ids.shape[0]} sequences")
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    for s, ref in zip(sums, refs):
        stats[ref.name].grad_sq = s


# -- masks ---------------------------------------------------------------------------------------


def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``: at most ``n`` non-zeros in every ``m`` consecutive inputs."""
    if pattern is None or isinstance(pattern, tuple):
        if pattern is not None and not 0 < pattern[0] < pattern[1]:
            raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern[0]}:{pattern[1]}")
        return pattern
    try:
        n, m = (int(v) for v in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pattern must look like '2:4', got {pattern!r}") from None
    return parse_pattern((n, m))


def prune_counts(rows: int, cols: int, sparsity: float) -> torch.Tensor:
    """Weights to prune in each of ``rows`` rows so that exactly ``round(sparsity * rows *
    cols)`` are pruned in total, spread as evenly as possible (earlier rows take the extra)."""
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    total = round(sparsity * rows * cols)
    base, extra = divmod(total, rows)
    counts = torch.full((rows,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts


def keep_mask(
    scores: torch.Tensor,
    sparsity: float | None = None,
    *,
    pattern: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Boolean ``(out, in)`` mask of the weights to keep: in each row the lowest-scoring
    weights are pruned (ties broken by position), exactly ``prune_counts`` of them; with an
    N:M ``pattern``, the ``m - n`` lowest of every ``m`` consecutive weights of a row."""
    rows, cols = scores.shape
    if pattern is not None:
        n, m = pattern
        if cols % m:
            raise ValueError(f"{cols} input features are not divisible by M={m}")
        groups = scores.reshape(rows, cols // m, m)
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return mask.reshape(rows, cols)
    if sparsity is None:
        raise ValueError("give a sparsity or an N:M pattern")
    return row_ranks(scores) >= prune_counts(rows, cols, sparsity)[:, None]


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each weight's rank within its row, ascending by score, ties broken by position: the
    lowest ``k`` ranks of a row are its ``k`` weights to prune, at any sparsity. Returned as
    ``int16`` when rows are shorter than 32,768 (half the bytes of a float16 weight copy)."""
    rows, cols = scores.shape
    order = torch.argsort(scores, dim=1, stable=True)  # ascending: lowest first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, device=order.device).expand(rows, cols))
    return rank.to(torch.int16) if cols < 2**15 else rank.to(torch.int32)


# -- pruners -------------------------------------------------------------------------------------


class Pruner(Protocol):
    """A base pruner: returns the pruned weight ``(out, in)`` with zeros in place.

    Attributes:
        name: registry name, recorded with every database and result.
        needs_hessian / needs_gradients: which optional statistics :meth:`prune` reads.
    """

    name: str
    needs_hessian: bool
    needs_gradients: bool

    def prune(
        self,
        weight: torch.Tensor,
        stats: LayerStats,
        sparsity: float | None = None,
        *,
        pattern: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Must not modify ``weight``; the result has ``weight``'s dtype and device."""
        ...


ScoreFn = Callable[[torch.Tensor, LayerStats], torch.Tensor]


def magnitude_score(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """``|W|``."""
    return weight.abs()


def wanda_score(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (Sun et al. 2023, Eq. 1)."""
    return weight.abs() * stats.x_norm.to(weight.device, weight.dtype)[None, :]


@dataclass(frozen=True)
class ScorePruner:
    """Prunes the lowest-scoring weights of each row; ``score(weight, stats)`` returns an
    ``(out, in)`` score (higher = more important). Scores are computed in float32."""

    name: str
    score: ScoreFn
    needs_hessian: bool = False
    needs_gradients: bool = False

    def scores(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """The checked float32 ``(out, in)`` score of ``weight``."""
        scores = self.score(weight.detach().float(), stats)
        if scores.shape != weight.shape:
            raise ValueError(f"{self.name}: score shape {tuple(scores.shape)} != weight shape")
        if not torch.isfinite(scores).all():
            raise ValueError(f"{self.name}: the score has non-finite values")
        return scores

    def prune(self, weight, stats, sparsity=None, *, pattern=None):
        mask = keep_mask(self.scores(weight, stats), sparsity, pattern=pattern)
        return weight * mask.to(weight.dtype)


@dataclass(frozen=True, kw_only=True)
class SparseGPT:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1): prune columns left to right in blocks of
    ``block_size``, choosing the mask of each block by ``w^2 / [H^-1]_jj^2`` and spreading each
    pruned weight's error over the not-yet-visited columns with the inverse Hessian's
    Cholesky factor. ``damp`` is added to the Hessian's diagonal as a fraction of its mean.

    The mask is exact: each column block prunes its share of ``round(sparsity * numel)``
    (with an N:M pattern, ``m - n`` of every ``m`` inputs of each row)."""

    damp: float = 0.01
    block_size: int = 128
    name: str = "sparsegpt"
    needs_hessian: bool = True
    needs_gradients: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must lie in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def inverse_factor(self, stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, dead)``: the upper Cholesky factor of the damped inverse Hessian and the
        input channels that never fired (their weights are pruned first, at no cost)."""
        if stats.hessian is None:
            raise ValueError("SparseGPT needs Hessians: collect_stats(..., hessian=True)")
        h = stats.hessian.double() * (2.0 / max(stats.n_tokens, 1))
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        h += torch.eye(h.shape[0], dtype=h.dtype) * (self.damp * torch.diag(h).mean())
        inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inv, upper=True).float(), dead

    def prune(self, weight, stats, sparsity=None, *, pattern=None, factor=None):
        """``factor``: a precomputed :meth:`inverse_factor` (it depends only on the stats, so a
        level database computes it once per layer)."""
        if pattern is None and sparsity is None:
            raise ValueError("give a sparsity or an N:M pattern")
        u, dead = factor if factor is not None else self.inverse_factor(stats)
        w = weight.detach().float().cpu().clone()
        w[:, dead] = 0
        rows, cols = w.shape
        if pattern is not None and cols % pattern[1]:
            raise ValueError(f"{cols} input features are not divisible by M={pattern[1]}")
        total = 0 if pattern is not None else round(sparsity * rows * cols)
        done = 0
        for i1 in range(0, cols, self.block_size):
            i2 = min(i1 + self.block_size, cols)
            w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
            d = torch.diag(u1)
            err = torch.zeros_like(w1)
            keep = torch.ones_like(w1, dtype=torch.bool)
            if pattern is None:
                # this block's exact share of the total, by cumulative rounding
                n_block = round(total * i2 / cols) - done
                done += n_block
                if n_block:
                    cost = (w1 * w1 / (d * d)[None, :]).flatten()
                    keep.view(-1)[torch.topk(cost, n_block, largest=False).indices] = False
            for j in range(i2 - i1):
                if pattern is not None and j % pattern[1] == 0:
                    n, m = pattern
                    cost = w1[:, j : j + m] ** 2 / (d[j : j + m] ** 2)[None, :]
                    drop = torch.topk(cost, m - n, dim=1, largest=False).indices
                    keep[:, j : j + m].scatter_(1, drop, False)
                q = w1[:, j] * keep[:, j]
                e = (w1[:, j] - q) / d[j]
                w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
                w1[:, j] = q
                err[:, j] = e
            w[:, i1:i2] = w1
            w[:, i2:] -= err @ u[i1:i2, i2:]
        return w.to(weight.dtype).to(weight.device)


PRUNERS: dict[str, Callable[[], Pruner]] = {
    "magnitude": lambda: ScorePruner("magnitude", magnitude_score),
    "wanda": lambda: ScorePruner("wanda", wanda_score),
    "sparsegpt": SparseGPT,
}


def sparsity_of(weight: torch.Tensor) -> float:
    """Share of exact zeros in ``weight``."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)
