"""Weight quantization of the block linears: score (quantizer parameters) -> codes -> apply.

A layer's weight ``W`` ``(out, in)`` is cut into groups of ``group_size`` consecutive input
columns per row (the last group of a row is shorter when ``in`` is not a multiple). Each
``(row, group)`` has an asymmetric min-max grid: ``scale = (max - min) / (2^b - 1)`` stored as
float16 and an integer ``zero`` in ``[0, 2^b - 1]``; a weight's *code* is
``clamp(round(w / scale) + zero, 0, 2^b - 1)`` and it dequantizes to ``(code - zero) * scale``
(the convention of GPTQ and of compressed-tensors' ``pack-quantized`` format, so an exported
file dequantizes to exactly the weights a search evaluated).

Two quantizers produce codes: round-to-nearest (:func:`rtn`) and GPTQ (:func:`gptq`, Frantar
et al. 2023, Alg. 1): columns are quantized left to right and each one's rounding error is
spread over the columns not yet visited with the Cholesky factor of the damped inverse Hessian
``H = 2 X X^T``, which the one calibration pass of :func:`evosearch.pruning.collect_stats`
provides. With ``act_order`` columns are visited by decreasing ``H_jj``; the group grids are
then fixed up front from the original weights ("static groups"), so groups stay contiguous
columns and export needs no column permutation.

Exact storage cost (:func:`bits_per_weight`): ``b`` bits per weight plus, per group, a float16
scale and a ``b``-bit zero point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evosearch.pruning import LayerStats

__all__ = [
    "Grid",
    "QuantizedWeight",
    "bits_per_weight",
    "dequantize",
    "gptq",
    "group_grid",
    "layer_bits",
    "quantize_codes",
    "rtn",
]

SCALE_BITS = 16  # float16 scale per group


@dataclass(frozen=True)
class QuantizedWeight:
    """One layer at one bit-width.

    Attributes:
        codes: ``(out, in)`` uint8 integer codes in ``[0, 2^bits - 1]``.
        scale: ``(out, n_groups)`` float16.
        zero: ``(out, n_groups)`` uint8 zero points.
        bits: the bit-width; group_size: input columns per group.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(out, in)`` the codes stand for."""
        return dequantize(self.codes, self.scale, self.zero, self.group_size)

    @property
    def grid(self) -> Grid:
        """The layer's grid without its codes."""
        return Grid(self.scale, self.zero, self.bits, self.group_size)


@dataclass(frozen=True)
class Grid:
    """A layer's fixed quantization grid: per ``(row, group)`` a float16 ``scale`` and a
    uint8 ``zero`` (each ``(out, n_groups)``), ``bits`` and ``group_size``. Training a
    quantized layer (healing, training-aware selection) keeps the grid and moves the codes:
    the forward sees :meth:`fake_quant` of a latent float weight, which is projected onto the
    grid at the end (quantization-aware training with a straight-through estimator, Bengio et
    al. 2013; the scales stay fixed, unlike LSQ)."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The uint8 codes of ``weight`` ``(out, in)`` rounded onto this grid."""
        w = weight.to(self.scale.device)
        return quantize_codes(w, self.scale, self.zero, self.bits, self.group_size)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """The nearest point of the grid to ``weight`` (clamped to the codes' range)."""
        codes = self.codes(weight.detach())
        out = dequantize(codes, self.scale, self.zero, self.group_size)
        return out.to(device=weight.device, dtype=weight.dtype)

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        """``project(weight)`` in the forward, identity in the backward (straight-through)."""
        return weight + (self.project(weight) - weight).detach()

    def contains(self, weight: torch.Tensor) -> bool:
        """Whether every entry of ``weight`` lies exactly on the grid."""
        return bool(torch.equal(self.project(weight), weight.detach()))

    def same(self, other: Grid) -> bool:
        """Whether ``other`` is this grid (bits, group size, scales and zero points)."""
        return (
            (self.bits, self.group_size) == (other.bits, other.group_size)
            and torch.equal(self.scale.cpu(), other.scale.cpu())
            and torch.equal(self.zero.cpu(), other.zero.cpu())
        )


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def layer_bits(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Exact storage bits of an ``(out, in)`` layer: codes, float16 scales, ``bits``-bit zeros."""
    rows, cols = shape
    return rows * cols * bits + rows * n_groups(cols, group_size) * (SCALE_BITS + bits)


def bits_per_weight(shape: tuple[int, int], bits: int, group_size: int) -> float:
    """:func:`layer_bits` per weight (``bits + (16 + bits) / group_size`` when groups fit)."""
    return layer_bits(shape, bits, group_size) / (shape[0] * shape[1])


def _expand(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """``(out, n_groups)`` -> ``(out, cols)``: each group's value on its columns."""
    return t.repeat_interleave(group_size, dim=1)[:, :cols]


def group_grid(
    weight: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale float16, zero uint8)``, each ``(out, n_groups)``, of ``weight``. The
    range always contains 0 (as in GPTQ), so a zero weight is exact; the scale is rounded to
    float16 before the zero point is chosen, so codes match the stored scale."""
    w = weight.detach().float()
    rows, cols = w.shape
    pad = n_groups(cols, group_size) * group_size - cols
    lo_src = torch.nn.functional.pad(w, (0, pad), value=0.0).view(rows, -1, group_size)
    lo = lo_src.amin(-1).clamp(max=0)
    hi = lo_src.amax(-1).clamp(min=0)
    maxq = 2**bits - 1
    scale = ((hi - lo) / maxq).clamp(min=1e-8).half()
    scale = torch.where(scale == 0, torch.full_like(scale, 2**-14), scale)  # float16 underflow
    zero = torch.round(-lo / scale.float()).clamp(0, maxq).to(torch.uint8)
    return scale, zero


def quantize_codes(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """The uint8 codes of ``weight`` ``(out, cols)`` on the grid ``(scale, zero)`` (given for
    these columns' groups)."""
    cols = weight.shape[1]
    s = _expand(scale.float(), group_size, cols)
    z = _expand(zero.float(), group_size, cols)
    return torch.clamp(torch.round(weight.float() / s) + z, 0, 2**bits - 1).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``(codes - zero) * scale`` per group, float32 ``(out, in)``."""
    cols = codes.shape[1]
    s = _expand(scale.float(), group_size, cols)
    z = _expand(zero.float(), group_size, cols)
    return (codes.float() - z) * s


def rtn(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Asymmetric min-max round-to-nearest."""
    scale, zero = group_grid(weight, bits, group_size)
    codes = quantize_codes(weight, scale, zero, bits, group_size)
    return QuantizedWeight(codes, scale, zero, bits, group_size)


def inverse_factor(stats: LayerStats, damp: float, act_order: bool):
    """``(U, perm, dead)``: the upper Cholesky factor of the damped inverse Hessian (in the
    visiting order ``perm``) and the input channels that never fired. Depends only on the
    statistics, so a level database computes it once per layer for all bit-widths."""
    if stats.hessian is None:
        raise ValueError("GPTQ needs Hessians: collect_stats(..., hessian=True)")
    h = stats.hessian.double() * (2.0 / max(stats.n_tokens, 1))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    h += torch.eye(h.shape[0], dtype=h.dtype) * (damp * torch.diag(h).mean())
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True).float(), perm, dead


def gptq(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    factor: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
    *,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ codes of ``weight`` ``(out, in)`` given ``factor`` = :func:`inverse_factor`.

    Without act-order, a group's grid is set from the error-updated weights when its first
    column is reached (as in the reference implementation); with it, every grid is set from
    the original weights first (static groups)."""
    u, perm, dead = factor
    w = weight.detach().float().cpu().clone()
    w[:, dead] = 0
    rows, cols = w.shape
    scale = torch.zeros(rows, n_groups(cols, group_size), dtype=torch.float16)
    zero = torch.zeros(rows, n_groups(cols, group_size), dtype=torch.uint8)
    if perm is not None:
        scale, zero = group_grid(w, bits, group_size)
        w = w[:, perm]
    order = perm if perm is not None else torch.arange(cols)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    maxq = 2**bits - 1
    # whole groups per block, so a group's grid sees its columns' updates from earlier blocks
    block_size = max(group_size, block_size // group_size * group_size)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = int(order[i1 + j])
            g = col // group_size
            if perm is None and col % group_size == 0:
                s, z = group_grid(w1[:, j : j + group_size], bits, group_size)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, g].float(), zero[:, g].float()
            q = torch.clamp(torch.round(w1[:, j] / s) + z, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            e = (w1[:, j] - (q - z) * s) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return QuantizedWeight(codes, scale, zero, bits, group_size)
