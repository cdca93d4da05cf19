"""Dense activations cached once, and forwards that start part-way through the network.

EvoPress-style searches evaluate thousands of candidates on the same calibration sequences. Two
things are computed once from the dense model and reused:

* the hidden states entering every block and leaving the last one (``boundaries``), so a
  candidate whose first changed block is ``j`` starts its forward at block ``j`` instead of
  block 0 (they also feed the ShortGPT and angular-distance baselines);
* the dense model's final (post-norm) hidden states, from which teacher logits are recomputed on
  the fly by the LM head, instead of storing ``vocab_size`` logits per token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from evosearch.arch import arch_for, get_blocks
from evosearch.surgery import InjectHidden, SkippedBlock, apply_replacements

__all__ = ["DenseCache", "compute_dense_cache", "final_hidden", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class DenseCache:
    """Dense activations on one :class:`~evosearch.data.TokenData`, kept on the CPU.

    Attributes:
        final_hidden: ``(N, T, d)`` post-norm last hidden states (input of the LM head).
        boundaries: ``(L + 1, N, T, d)``: ``boundaries[i]`` enters block ``i``,
            ``boundaries[L]`` leaves the last block (before the final norm); ``None`` when
            prefix reuse is off.
    """

    final_hidden: torch.Tensor
    boundaries: torch.Tensor | None

    @property
    def n_blocks(self) -> int | None:
        return None if self.boundaries is None else self.boundaries.shape[0] - 1

    def teacher_bytes_per_token(self) -> int:
        """Bytes the teacher cache holds per token (the final hidden state)."""
        return self.final_hidden.shape[-1] * self.final_hidden.element_size()

    def prefix_bytes_per_token(self) -> int:
        """Bytes held per token for prefix reuse (one hidden state per block)."""
        if self.boundaries is None:
            return 0
        return (
            self.boundaries.shape[0] * self.boundaries.shape[-1] * (self.boundaries.element_size())
        )


@torch.no_grad()
def compute_dense_cache(
    model: nn.Module, input_ids: torch.Tensor, *, micro_batch: int = 4, prefix_reuse: bool = True
) -> DenseCache:
    """Run the dense model once over ``input_ids`` ``(N, T)`` and cache its activations."""
    blocks = get_blocks(model)
    captured: list[torch.Tensor] = []
    handles = []
    if prefix_reuse:

        def grab_input(module, args, kwargs):
            captured.append((args[0] if args else kwargs["hidden_states"]).detach().cpu())

        def grab_output(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            captured.append(out.detach().cpu())

        handles = [b.register_forward_pre_hook(grab_input, with_kwargs=True) for b in blocks]
        handles.append(blocks[-1].register_forward_hook(grab_output, with_kwargs=True))
    finals, inputs = [], []
    try:
        for start in range(0, input_ids.shape[0], micro_batch):
            captured.clear()
            finals.append(final_hidden(model, input_ids[start : start + micro_batch]).cpu())
            if prefix_reuse:
                inputs.append(torch.stack(captured))  # (L + 1, b, T, d)
    finally:
        for h in handles:
            h.remove()
    boundaries = torch.cat(inputs, dim=1) if prefix_reuse else None
    return DenseCache(final_hidden=torch.cat(finals), boundaries=boundaries)


@contextlib.contextmanager
def start_at_block(model: nn.Module, block: int, hidden: torch.Tensor | None) -> Iterator[None]:
    """Within the context, the model's forward skips blocks ``0..block-1`` and enters block
    ``block`` with ``hidden`` (the dense hidden states there, ``(B, T, d)``)."""
    if block <= 0 or hidden is None:
        yield
        return
    path = arch_for(model).blocks
    replacements = {f"{path}.{i}": SkippedBlock() for i in range(block - 1)}
    replacements[f"{path}.{block - 1}"] = InjectHidden(hidden)
    with apply_replacements(model, replacements):
        yield


def final_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    start_block: int = 0,
    start_hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Post-norm last hidden states ``(B, T, d)`` of ``model`` on ``input_ids`` ``(B, T)``,
    optionally starting at ``start_block`` from the given hidden states."""
    device = model_device(model)
    if start_hidden is not None:
        start_hidden = start_hidden.to(device)
    with torch.no_grad(), start_at_block(model, start_block, start_hidden):
        out = model.base_model(input_ids=input_ids.to(device), use_cache=False)
    return out.last_hidden_state
