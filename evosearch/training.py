"""A little training of a (pruned) model that keeps its structure: LoRA with masked inputs,
full fine-tuning of masked projections, optional distillation from the dense model.

Used twice: training-aware selection (DarwinLM, Tang et al. 2025, Sec. 3.3) trains each
candidate briefly *before* it is scored, on the resident model with the candidate's modules
swapped in; post-compression fine-tuning (``evosearch finetune``) trains a saved, physically
shrunk model. In both cases removed heads and channels cannot regrow: a
:class:`~evosearch.shrink.MaskedLinear` multiplies its weight by its mask in ``forward``, a
:class:`LoRALinear` on it masks the adapter's input columns the same way, and a shrunk model has
no weights for them at all.
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
from evosearch.shrink import MaskedLinear
from evosearch.surgery import apply_replacements

__all__ = ["LoRALinear", "TrainConfig", "lora_replacements", "token_loss", "train_"]

MODES = ("lora", "full")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How candidates (or a saved model) are trained.

    Args:
        mode: ``lora``: rank-``rank`` adapters on every projection of the trained blocks, base
            weights frozen; ``full``: the weights themselves (in a search: the candidate's own
            compensated output projections, which it already holds, so nothing of the resident
            model is copied; in ``finetune``: every block parameter of the shrunk model).
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
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        generator: torch.Generator,
        *,
        weight_mask: torch.Tensor | None = None,
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

    def delta(self) -> torch.Tensor:
        """The adapter's ``(out, in)`` weight update (zero on masked columns and entries)."""
        a = self.lora_a if self.mask is None else self.lora_a * self.mask
        d = self.scale * self.lora_b @ a
        return d if self.weight_mask is None else d * self.weight_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_mask is not None:  # the dense update, masked: (out, in)
            return self.base(x) + F.linear(x, self.delta())
        a = self.lora_a if self.mask is None else self.lora_a * self.mask
        return self.base(x) + self.scale * F.linear(F.linear(x, a), self.lora_b)


def lora_replacements(
    model: nn.Module, blocks: range | list[int], config: TrainConfig
) -> dict[str, LoRALinear]:
    """Module path -> :class:`LoRALinear` for every projection of ``blocks`` that is present
    (a dropped sublayer has none)."""
    arch = arch_for(model)
    generator = torch.Generator().manual_seed(config.seed)
    out: dict[str, LoRALinear] = {}
    all_blocks = get_blocks(model)
    for i in blocks:
        for rel in arch.attention_linears + arch.mlp_linears:
            try:
                module = get_submodule(all_blocks[i], rel)
            except AttributeError:  # inside a ZeroAttention / ZeroOutput stand-in
                continue
            if isinstance(module, (nn.Linear, MaskedLinear)):
                out[f"{arch.blocks}.{i}.{rel}"] = LoRALinear(
                    module, config.rank, config.alpha, generator
                )
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


def trainable_parameters(
    model: nn.Module, blocks, config: TrainConfig
) -> tuple[dict[str, nn.Module], list[nn.Parameter]]:
    """What a candidate trains: ``(replacements to apply, parameters)``.

    ``lora``: adapters on every projection of ``blocks``; ``full``: the weights of the
    :class:`~evosearch.shrink.MaskedLinear` output projections in ``blocks`` (the candidate's
    own modules), no replacements.
    """
    if config.mode == "lora":
        reps = lora_replacements(model, blocks, config)
        params = [p for m in reps.values() for p in (m.lora_a, m.lora_b)]
        return reps, params
    all_blocks = get_blocks(model)
    params = [
        m.weight for i in blocks for m in all_blocks[i].modules() if isinstance(m, MaskedLinear)
    ]
    return {}, params


@contextlib.contextmanager
def with_adapters(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Apply LoRA (or any) replacements for the duration of a candidate's training + scoring."""
    with apply_replacements(model, replacements):
        yield
