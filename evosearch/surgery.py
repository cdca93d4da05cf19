"""Module replacement: drop blocks or sublayers of one resident model without copying it.

A candidate is materialised by swapping modules in place (``apply_replacements``) and restored
afterwards, so the search keeps exactly one model in memory and never patches a ``forward``.
The stand-in modules below only rely on what every decoder block of the supported architectures
does with its children: a block maps ``hidden_states -> hidden_states``; attention returns
``(output, weights)``; an MLP (or OPT's ``fc1``/``fc2``) returns a tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from evosearch.arch import set_submodule

__all__ = [
    "SkippedBlock",
    "InjectHidden",
    "ZeroAttention",
    "ZeroOutput",
    "apply_replacements",
    "zero_output_for",
]


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class SkippedBlock(nn.Module):
    """A removed decoder block: returns its input hidden states unchanged."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return _hidden_states(args, kwargs)


class InjectHidden(nn.Module):
    """Stands in for the last block of a reused prefix: ignores its input and returns the dense
    model's cached hidden states at that point, so the forward continues from there."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden  # (B, T, d), not a buffer: never saved, never moved

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class ZeroAttention(nn.Module):
    """A dropped attention sublayer: contributes zero to the residual stream."""

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(_hidden_states(args, kwargs)), None


class ZeroOutput(nn.Module):
    """A dropped MLP (or one of its linears): returns zeros with ``out_features`` channels."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def zero_output_for(module: nn.Module) -> ZeroOutput:
    """A :class:`ZeroOutput` with the output width of ``module`` (a linear, Conv1D or MLP)."""
    for attr in ("out_features", "nf"):  # nn.Linear, GPT-2 Conv1D
        if hasattr(module, attr):
            return ZeroOutput(int(getattr(module, attr)))
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) or hasattr(m, "nf")]
    if not linears:
        raise TypeError(f"cannot infer the output width of {type(module).__name__}")
    last = linears[-1]
    return ZeroOutput(int(getattr(last, "out_features", getattr(last, "nf", 0))))


@contextlib.contextmanager
def apply_replacements(root: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    """Temporarily replace submodules of ``root`` (dotted path -> module) and restore them."""
    originals: list[tuple[str, nn.Module]] = []
    try:
        for path, new in replacements.items():
            originals.append((path, set_submodule(root, path, new)))
        yield
    finally:
        for path, old in reversed(originals):
            set_submodule(root, path, old)
