"""Dense activations cached once, and forwards that start part-way through the network.

EvoPress-style searches evaluate thousands of candidates on the same calibration sequences. Two
things are computed once from the dense model and reused:

* the hidden states entering every block and leaving the last one (``boundaries``), so a
  candidate whose first changed block is ``j`` starts its forward at block ``j`` instead of
  block 0 (they also feed the ShortGPT and angular-distance baselines);
* the dense model's final (post-norm) hidden states, from which a fitness builds its teacher
  (:class:`fitness.kl.KLDivergence` keeps the top-k log-probabilities of every token).

A search also keeps, for the current batch only, the hidden states of the genomes its offspring
were made from (:class:`BlockStates`): an offspring that first differs from its parent at block
``j`` starts there from the parent's states, which for level spaces (every layer pruned or
quantized, so the dense prefix is empty) saves the blocks before the first mutated one.

Candidates are computed in a configurable dtype (:func:`resolve_dtype`): ``"auto"`` is bfloat16
where the hardware runs it natively (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX) and
float32 elsewhere. Lower precision is applied by autocast (:func:`compute_dtype`), so weights
stay in float32, matmuls run in bf16 and the residual stream, norms and the hidden states cached
here stay in float32; the dense cache is computed in the same dtype as the candidates, so prefix
reuse stays exact.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from evosearch.arch import arch_for, get_blocks
from evosearch.surgery import InjectHidden, SkippedBlock, apply_replacements

__all__ = [
    "BlockStates",
    "DenseCache",
    "capture_block_states",
    "bf16_supported",
    "compute_dense_cache",
    "compute_dtype",
    "final_hidden",
    "model_device",
    "resolve_dtype",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16); without
    them bf16 matmuls are emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:  # not Linux: only the capability torch reports
        return torch.backends.cpu.get_cpu_capability() == "AVX512_BF16"
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (faster than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return False


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The compute dtype that ``dtype`` names on ``device``.

    Args:
        dtype: ``"auto"`` (bfloat16 where :func:`bf16_supported`, else float32), a name
            (``"float32"``, ``"bfloat16"``, ``"float16"``, or ``fp32``/``bf16``/``fp16``) or a
            ``torch.dtype``.
        device: where the candidates run.
    """
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {resolved}")
    return resolved


def compute_dtype(
    device: torch.device | str, dtype: torch.dtype
) -> contextlib.AbstractContextManager:
    """A context in which forwards on ``device`` compute in ``dtype``: autocast for bf16/fp16
    (weights and the residual stream stay float32), nothing for float32."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class DenseCache:
    """Dense activations on one :class:`~evosearch.data.TokenData`, kept on the CPU.

    Attributes:
        final_hidden: ``(N, T, d)`` post-norm last hidden states (input of the LM head).
        boundaries: ``(L + 1, N, T, d)``: ``boundaries[i]`` enters block ``i``,
            ``boundaries[L]`` leaves the last block (before the final norm); ``None`` when
            prefix reuse is off.
        dtype: the compute dtype the dense forward ran in; candidates reusing its prefix
            should run in the same one (:class:`~evosearch.engine.Evaluator` does by default).
        derived: what fitnesses derive from this cache in ``prepare`` (e.g. the KL's top-k
            teacher), keyed by the fitness and its settings; it travels with the cache to Ray
            workers, so they do not derive it again.
    """

    final_hidden: torch.Tensor
    boundaries: torch.Tensor | None
    dtype: torch.dtype = torch.float32
    derived: dict[str, Any] = field(default_factory=dict)

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
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    micro_batch: int = 4,
    prefix_reuse: bool = True,
    dtype: str | torch.dtype = "float32",
) -> DenseCache:
    """Run the dense model once over ``input_ids`` ``(N, T)`` and cache its activations.

    Args:
        micro_batch: sequences per forward.
        prefix_reuse: also keep the hidden states entering every block.
        dtype: compute dtype of the dense forward (:func:`resolve_dtype`), and by default that
            of the candidates scored against this cache (:class:`~evosearch.engine.Evaluator`);
            ``"auto"`` is bf16 where the hardware runs it natively (2.6-3x faster on CPUs with
            AVX512-BF16), ``"float32"`` the reference.
    """
    resolved = resolve_dtype(dtype, model_device(model))
    finals, inputs = [], []
    capture = capture_block_states(model, 0) if prefix_reuse else contextlib.nullcontext([])
    with capture as captured:
        for start in range(0, input_ids.shape[0], micro_batch):
            with compute_dtype(model_device(model), resolved):
                h = final_hidden(model, input_ids[start : start + micro_batch])
            finals.append(h.float().cpu())
        inputs = list(captured)  # one (L + 1, b, T, d) per micro batch
    boundaries = torch.cat(inputs, dim=1) if prefix_reuse else None
    return DenseCache(final_hidden=torch.cat(finals), boundaries=boundaries, dtype=resolved)


@contextlib.contextmanager
def capture_block_states(model: nn.Module, start: int) -> Iterator[list[torch.Tensor]]:
    """Within the context, every forward of ``model`` appends to the yielded list the hidden
    states entering blocks ``start .. L-1`` and leaving block ``L-1``, stacked
    ``(L + 1 - start, B, T, d)`` on the CPU.

    The hooks sit on whatever modules stand at those block positions when the context is
    entered (a dropped block's stand-in passes its input on), so enter it with the candidate's
    replacements applied; blocks before ``start`` may be replaced afterwards (a reused prefix).
    """
    blocks = list(get_blocks(model))[start:]
    captured: list[torch.Tensor] = []
    current: list[torch.Tensor] = []

    def grab_input(module, args, kwargs):
        current.append((args[0] if args else kwargs["hidden_states"]).detach().cpu())

    def grab_output(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        current.append(out.detach().cpu())
        captured.append(torch.stack(current))  # (L + 1 - start, B, T, d)
        current.clear()

    handles = [b.register_forward_pre_hook(grab_input, with_kwargs=True) for b in blocks]
    if blocks:
        handles.append(blocks[-1].register_forward_hook(grab_output, with_kwargs=True))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@dataclass
class BlockStates:
    """One genome's hidden states entering every block (and leaving the last) on some
    calibration rows: kept for a parent, on the current batch only, so that its offspring
    start their forward where they first differ from it.

    Attributes:
        rows: calibration row -> ``(L + 1, T, d)`` hidden states (on the CPU).
    """

    rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def covers(self, indices) -> bool:
        return all(i in self.rows for i in indices)

    def get(self, blocks: int | slice, indices) -> torch.Tensor:
        """States entering ``blocks`` on rows ``indices``: ``(B, T, d)`` for one block,
        ``(k, B, T, d)`` for a slice of ``k`` blocks."""
        parts = [self.rows[i][blocks] for i in indices]
        return torch.stack(parts, dim=1 if isinstance(blocks, slice) else 0)

    def add(self, indices, states: torch.Tensor) -> None:
        """Keep ``states`` ``(L + 1, B, T, d)`` of rows ``indices``."""
        for j, i in enumerate(indices):
            self.rows[i] = states[:, j].clone()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())


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
