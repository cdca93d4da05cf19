"""A little training of a compressed model that keeps its structure, in every space: LoRA or
full updates, optional distillation from the dense model.

One code path (:func:`structured`, then :func:`train_`) serves training-aware selection
(DarwinLM, Tang et al. 2025, Sec. 3.3: each candidate trains briefly *before* it is scored, on
the resident model with the candidate's modules swapped in) and healing (a saved model trains
before it is emitted, :mod:`evosearch.healing`). Whatever the space, the structure cannot
change:

* dropped blocks and sublayers have no linears to train (skipped blocks and zero stand-ins);
* removed heads and channels cannot regrow: a :class:`~evosearch.shrink.MaskedLinear`
  multiplies its weight by its mask in ``forward``, a :class:`LoRALinear` on it masks the
  adapter's input columns, and a shrunk model has no weights for them at all;
* exact zeros (unstructured or N:M sparsity) stay zero: full updates are re-masked after every
  step, LoRA updates are masked elementwise;
* quantized linears (a :class:`~evosearch.quant.Grid` in their ``quant_grid`` attribute) stay
  on their grid: the forward sees the fake-quantized weight (straight-through), and the weight
  is projected onto the grid at the end, so scales, zero points and bit-widths never change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evosearch.arch import arch_for, get_blocks, get_submodule, head_logits
from evosearch.forward import model_device, start_at_block
from evosearch.quant import Grid
from evosearch.shrink import MaskedLinear

__all__ = [
    "FakeQuantLinear",
    "LoRALinear",
    "TrainConfig",
    "Trainable",
    "block_linears",
    "lora_replacements",
    "quant_grids",
    "structured",
    "token_loss",
    "train_",
    "zero_masks",
]

MODES = ("lora", "full")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How candidates (or a saved model) are trained.

    Args:
        mode: ``lora``: rank-``rank`` adapters on every projection of the trained blocks, base
            weights frozen (merged at the end of healing, discarded after scoring a
            candidate); ``full``: the weights themselves (in a search: the output projections
            of the candidate's changed blocks, restored after scoring; in healing: every block
            parameter). Either way the structure is kept (module docstring).
        rank: LoRA rank; alpha: LoRA scale numerator (scale ``alpha / rank``).
        lr: AdamW learning rate; micro_batch: sequences per step.
        distill: loss = KL(dense teacher || student) per token instead of next-token
            cross-entropy.
        seed: seeds adapter initialisation and the choice of training sequences.
    """

    mode: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-4
    micro_batch: int = 1
    distill: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B A x`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)`` (Hu et al.
    2021); ``B`` starts at zero, so the wrapped layer starts unchanged. When ``base`` is a
    :class:`~evosearch.shrink.MaskedLinear` the adapter reads only its kept input columns.

    Args:
        base: the frozen layer (not copied).
        rank, alpha: adapter rank and scale numerator.
        generator: seeds ``A``.
        weight_mask: ``(out, in)`` 0/1 mask of the base weight's kept entries (unstructured or
            N:M sparsity): the update is masked elementwise, so merging it keeps the zeros.
        grid: the base weight's quantization grid: the forward uses the fake-quantized merged
            weight, so what trains is the model :meth:`merged` gives.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        generator: torch.Generator,
        *,
        weight_mask: torch.Tensor | None = None,
        grid: Grid | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        a = torch.randn(rank, w.shape[1], generator=generator) / math.sqrt(w.shape[1])
        self.lora_a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        mask = getattr(base, "mask", None)
        self.register_buffer("mask", None if mask is None else mask.clone())
        if weight_mask is not None:
            weight_mask = weight_mask.to(device=w.device, dtype=w.dtype)
        self.register_buffer("weight_mask", weight_mask)
        self.scale = alpha / rank
        self.grid = grid

    def delta(self) -> torch.Tensor:
        """The adapter's ``(out, in)`` weight update (zero on masked columns and entries)."""
        a = self.lora_a if self.mask is None else self.lora_a * self.mask
        d = self.scale * self.lora_b @ a
        return d if self.weight_mask is None else d * self.weight_mask

    def merged(self) -> torch.Tensor:
        """The base weight plus the update, on the base's grid when it has one."""
        w = self.base.weight + self.delta().to(self.base.weight.dtype)
        return w if self.grid is None else self.grid.project(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:  # quantization-aware: (out, in), straight-through
            w = self.grid.fake_quant(self.base.weight + self.delta())
            return F.linear(x, w, self.base.bias)
        if self.weight_mask is not None:  # the dense update, masked: (out, in)
            return self.base(x) + F.linear(x, self.delta())
        a = self.lora_a if self.mask is None else self.lora_a * self.mask
        return self.base(x) + self.scale * F.linear(F.linear(x, a), self.lora_b)


class FakeQuantLinear(nn.Module):
    """``base`` with its weight fake-quantized onto ``grid`` in the forward (straight-through
    gradient to the latent float weight, which full updates train)."""

    def __init__(self, base: nn.Module, grid: Grid) -> None:
        super().__init__()
        self.base, self.grid = base, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.grid.fake_quant(self.base.weight), self.base.bias)


def block_linears(
    model: nn.Module, blocks: range | list[int] | None = None
) -> dict[str, nn.Module]:
    """Module path -> every linear (``nn.Linear``, ``MaskedLinear`` or GPT-2 ``Conv1D``) of
    ``blocks`` (default: all) that is present (a dropped sublayer or block has none)."""
    prefix = arch_for(model).blocks
    all_blocks = get_blocks(model)
    out = {}
    for i in range(len(all_blocks)) if blocks is None else blocks:
        for name, module in all_blocks[i].named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
                continue
            if isinstance(module, (nn.Linear, MaskedLinear)) or hasattr(module, "nf"):
                out[f"{prefix}.{i}.{name}"] = module
    return out


@torch.no_grad()
def zero_masks(
    model: nn.Module, blocks: range | list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Weight path -> bool mask of the non-zero entries, for every linear of ``blocks`` with at
    least one exact zero (sparsity lives here). Left out: quantized linears (their zeros are the
    zero-point code, which training may move like any other code) and width's
    :class:`~evosearch.shrink.MaskedLinear` (its removed columns are masked in ``forward``, and
    its LoRA stays low-rank)."""
    out = {}
    for path, module in block_linears(model, blocks).items():
        w = module.weight
        kept_otherwise = isinstance(module, MaskedLinear) or hasattr(module, "quant_grid")
        if not kept_otherwise and bool((w == 0).any()):
            out[f"{path}.weight"] = w != 0
    return out


def quant_grids(model: nn.Module, blocks: range | list[int] | None = None) -> dict[str, Grid]:
    """Module path -> :class:`~evosearch.quant.Grid` of every quantized linear of ``blocks``
    (its ``quant_grid`` attribute). A linear marked quantized in a format without a grid
    (``quant_grid`` set to another value, e.g. a GGUF type) cannot be trained on its grid.

    Raises:
        ValueError: for such a linear.
    """
    out = {}
    for path, module in block_linears(model, blocks).items():
        grid = getattr(module, "quant_grid", None)
        if grid is None:
            continue
        if not isinstance(grid, Grid):
            raise ValueError(
                f"{path} is quantized as {grid!r}, which has no fixed grid to train on; "
                "training keeps bit-widths only for the integer (compressed-tensors) format"
            )
        out[path] = grid
    return out


def lora_replacements(
    model: nn.Module,
    blocks: range | list[int],
    config: TrainConfig,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    grids: dict[str, Grid] | None = None,
) -> dict[str, LoRALinear]:
    """Module path -> :class:`LoRALinear` for every projection of ``blocks`` that is present
    (a dropped sublayer has none); ``masks`` (weight path -> non-zero mask) and ``grids``
    (module path -> grid) keep sparse and quantized weights so."""
    arch = arch_for(model)
    generator = torch.Generator().manual_seed(config.seed)
    out: dict[str, LoRALinear] = {}
    all_blocks = get_blocks(model)
    masks, grids = masks or {}, grids or {}
    for i in blocks:
        for rel in arch.attention_linears + arch.mlp_linears:
            try:
                module = get_submodule(all_blocks[i], rel)
            except AttributeError:  # inside a ZeroAttention / ZeroOutput stand-in
                continue
            path = f"{arch.blocks}.{i}.{rel}"
            if isinstance(module, (nn.Linear, MaskedLinear)):
                mask = masks.get(f"{path}.weight")
                out[path] = LoRALinear(
                    module, config.rank, config.alpha, generator,
                    weight_mask=None if mask is None else mask.to(module.weight.dtype),
                    grid=grids.get(path),
                )  # fmt: skip
    return out


def token_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None
) -> torch.Tensor:
    """Mean per-token loss of ``logits`` ``(B, T, V)``: KL(teacher || student) when
    ``teacher_logits`` are given, else next-token cross-entropy on ``input_ids`` ``(B, T)``."""
    if teacher_logits is None:  # next-token cross-entropy
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1)
        )
    log_p = F.log_softmax(teacher_logits.float(), -1)
    log_q = F.log_softmax(logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@contextlib.contextmanager
def _trainable(params: list[nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def train_(
    model: nn.Module,
    params: list[nn.Parameter],
    input_ids: torch.Tensor,
    config: TrainConfig,
    *,
    teacher: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
    start_block: int = 0,
    start_hidden: torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
    after_step: Callable[[], None] | None = None,
    lr_factor: Callable[[int], float] | None = None,
    autocast: bool = False,
) -> list[float]:
    """Train ``params`` of ``model`` in place, one AdamW step per micro batch of ``input_ids``
    ``(N, T)`` (one pass; the caller picks ``N`` from its token budget).

    Args:
        teacher: ``fn(input_ids, rows) -> teacher logits`` for distillation (``None``: plain
            next-token loss); ``rows`` index ``input_ids``.
        start_block, start_hidden: begin every forward at ``start_block`` from the dense
            hidden states ``(N, T, d)`` there (blocks before it are unchanged and frozen).
        after_step: called after every optimiser step, e.g. to re-apply a sparsity mask.
        lr_factor: ``fn(step) -> factor`` of ``config.lr`` for step ``0, 1, …`` (a schedule;
            ``None``: constant).
        autocast: forward passes (student and teacher) in bfloat16 autocast; the loss and
            the parameters stay float32.

    Returns:
        The loss of every step. The model is left in eval mode; only ``params`` changed.
    """
    device = model_device(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
    losses = []
    was_training = model.training
    model.train()
    try:
        with _trainable(params):
            for s in range(0, input_ids.shape[0], config.micro_batch):
                rows = list(range(s, min(s + config.micro_batch, input_ids.shape[0])))
                ids = input_ids[rows].to(device)
                hidden = None if start_hidden is None else start_hidden[rows].to(device)
                with amp, start_at_block(model, start_block, hidden):
                    h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                    logits = head_logits(model, h)
                target = None
                if teacher is not None:
                    with amp, torch.no_grad():
                        target = teacher(input_ids, rows)
                loss = token_loss(logits, ids, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if lr_factor is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = config.lr * lr_factor(len(losses))
                optimizer.step()
                if after_step is not None:
                    after_step()
                losses.append(loss.item())
                if progress:
                    progress(f"step {len(losses)}: loss {losses[-1]:.4f}")
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return losses


_FULL_PARAMS = ("outputs", "linears", "blocks")


@dataclass
class Trainable:
    """What one training run updates, and how it keeps the structure (see :func:`structured`).

    Attributes:
        replacements: modules swapped in while training (and while scoring a candidate):
            LoRA adapters, or fake-quant wrappers of quantized linears under full updates.
        params: the parameters AdamW updates.
        remask: ``(weight, 0/1 mask)`` of sparse weights under full updates, re-applied after
            every step (:meth:`after_step`).
        project: ``(weight, grid)`` of quantized weights under full updates, projected onto
            the grid by :meth:`finish_`.
    """

    replacements: dict[str, nn.Module]
    params: list[nn.Parameter]
    remask: list[tuple[nn.Parameter, torch.Tensor]]
    project: list[tuple[nn.Parameter, Grid]]

    @torch.no_grad()
    def after_step(self) -> None:
        """Zero the pruned entries again (the optimiser step moved them)."""
        for w, mask in self.remask:
            w.mul_(mask)

    @torch.no_grad()
    def finish_(self) -> None:
        """Make the training permanent without the replacements: merge LoRA updates (masked,
        onto the grid) into their base weights and project fully trained quantized weights
        onto their grids."""
        for rep in self.replacements.values():
            if isinstance(rep, LoRALinear):
                rep.base.weight.copy_(rep.merged())
        for w, grid in self.project:
            w.copy_(grid.project(w))


def structured(
    model: nn.Module,
    blocks: range | list[int],
    config: TrainConfig,
    *,
    full_params: str = "outputs",
    masks: dict[str, torch.Tensor] | None = None,
    grids: dict[str, Grid] | None = None,
) -> Trainable:
    """What training ``blocks`` of ``model`` updates, keeping its structure (module docstring).

    Args:
        config: ``lora``: adapters on every projection of ``blocks`` (masked elementwise where
            the weight has zeros, fake-quantized where it has a grid); ``full``: the weights
            themselves.
        full_params: under ``full``: ``outputs`` (the weights of the output projections of
            ``blocks``, ``o_proj`` and ``down_proj`` or their kin: what width pruning
            compensates; training-aware selection), ``linears`` (the weights of every linear
            of ``blocks``) or ``blocks`` (every parameter of ``blocks``; healing).
        masks, grids: the zeros and grids to keep (default: read from ``blocks`` now, see
            :func:`zero_masks` and :func:`quant_grids`).
    """
    masks = zero_masks(model, blocks) if masks is None else masks
    grids = quant_grids(model, blocks) if grids is None else grids
    if config.mode == "lora":
        reps = lora_replacements(model, blocks, config, masks=masks, grids=grids)
        params = [p for m in reps.values() for p in (m.lora_a, m.lora_b)]
        return Trainable(reps, params, [], [])
    if full_params not in _FULL_PARAMS:
        raise ValueError(f"full_params must be one of {_FULL_PARAMS}, got {full_params!r}")
    linears = block_linears(model, blocks)
    if full_params == "blocks":
        all_blocks = get_blocks(model)
        found = {id(p): p for i in blocks for p in all_blocks[i].parameters()}
        params = list(found.values())
    elif full_params == "outputs":
        arch = arch_for(model)
        outputs = (arch.attention_linears[-1], arch.mlp_linears[-1])  # sorted last
        # "model.layers.3.self_attn.o_proj" -> "self_attn.o_proj"
        rel = {k: k[len(arch.blocks) + 1 :].partition(".")[2] for k in linears}
        params = [m.weight for k, m in linears.items() if rel[k] in outputs]
    else:
        params = [m.weight for m in linears.values()]
    weights = {f"{k}.weight": m.weight for k, m in linears.items()}
    remask = [(weights[k], m.to(weights[k].dtype)) for k, m in masks.items() if k in weights]
    reps = {k: FakeQuantLinear(linears[k], g) for k, g in grids.items() if k in linears}
    project = [(linears[k].weight, g) for k, g in grids.items() if k in linears]
    return Trainable(reps, params, remask, project)
