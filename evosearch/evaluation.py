"""What a fitness sees: a :class:`Candidate` model and a :class:`Batch` of tokens.

A fitness is any object with ``name``, ``direction`` and ``__call__(candidate, batch) -> float``
(optionally ``prepare``); a plain ``fn(model, batch) -> float`` is wrapped by :func:`as_fitness`.
A fitness whose value is a function of per-token sums (a token-weighted mean, a perplexity)
declares it by ``additive = True`` and :class:`AdditiveFitness`'s ``partial``/``reduce``; a
runner may then split one candidate's batch across workers and combine the parts exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from evosearch.arch import get_blocks
from evosearch.forward import BlockStates, DenseCache, capture_block_states, final_hidden
from evosearch.genome import Genome

__all__ = [
    "AdditiveFitness",
    "Batch",
    "Candidate",
    "CallableFitness",
    "Fitness",
    "Reference",
    "as_fitness",
    "is_additive",
    "measure_latency",
]


@dataclass(frozen=True)
class Batch:
    """Calibration sequences shared by every candidate of one selection stage.

    Attributes:
        indices: rows of the calibration data.
        input_ids: ``(B, T)`` token ids of those rows.
        stage: the racing stage the batch was drawn for (its fidelity), ``None`` outside a
            search (e.g. the final comparison on every token). Not part of :meth:`key`.
    """

    indices: tuple[int, ...]
    input_ids: torch.Tensor
    stage: int | None = None

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def key(self) -> str:
        return ",".join(map(str, self.indices))

    def split(self, micro_batch: int) -> Iterator[Batch]:
        for s in range(0, len(self.indices), micro_batch):
            yield self.rows(s, s + micro_batch)

    def rows(self, start: int, stop: int) -> Batch:
        """The sub-batch of this batch's sequences ``start:stop`` (a shard of it)."""
        return Batch(self.indices[start:stop], self.input_ids[start:stop])


@dataclass(frozen=True)
class Reference:
    """Another genome's hidden states on the batch (a parent's) and ``block``, the first block
    where the candidate's computation differs from that genome's."""

    block: int
    states: BlockStates


@dataclass
class Candidate:
    """A materialised candidate: the resident model with the genome's modules swapped in.

    Attributes:
        model: the model, valid only during the fitness call.
        genome: the candidate's genome.
        start_block: first block whose computation differs from the dense model's.
        dense: dense activations of the calibration data, or ``None``.
        reference: a parent's states, started from where that is later than ``start_block``.
        keep: when set, :meth:`final_hidden` adds the candidate's own states to it (it is a
            parent whose offspring follow on the same batch).
        sequences: when a list, an additive fitness appends the ``(total, count)`` of each
            sequence it scores, in batch order (:class:`AdditiveFitness`).
    """

    model: nn.Module
    genome: Genome
    start_block: int = 0
    dense: DenseCache | None = None
    reference: Reference | None = None
    keep: BlockStates | None = None
    sequences: list[tuple[float, float]] | None = None

    def final_hidden(self, batch: Batch) -> torch.Tensor:
        """Post-norm last hidden states ``(B, T, d)``, starting at the latest block whose input
        is cached (the dense model's or the reference's). Exact: the blocks before it compute
        for the candidate what they computed for that model."""
        rows = list(batch.indices)
        n = len(get_blocks(self.model))
        start, source = self._source(rows, n)
        dense, unchanged = self.dense, start >= n and self.keep is None
        if unchanged and dense is not None and source is dense.boundaries:
            return dense.final_hidden[rows]  # nothing changed: the dense output
        hidden = None if source is None else _states(source, start, rows)  # (B, T, d)
        if self.keep is None:
            return final_hidden(
                self.model, batch.input_ids, start_block=start, start_hidden=hidden
            )
        with capture_block_states(self.model, start) as captured:
            out = final_hidden(self.model, batch.input_ids, start_block=start, start_hidden=hidden)
        own = captured[0] if start < n else hidden.cpu()[None]  # (L + 1 - start, B, T, d)
        prefix = [_states(source, slice(0, start), rows)] if start else []
        self.keep.add(rows, torch.cat([*prefix, own]))
        return out

    def _source(self, rows: list[int], n: int) -> tuple[int, torch.Tensor | BlockStates | None]:
        """``(start block, cached states to start from)``: the reference's when it starts
        later than the dense prefix and holds ``rows``; ``(0, None)`` when nothing is cached."""
        start, source = 0, None
        dense = self.dense
        if dense is not None and dense.boundaries is not None and self.start_block > 0:
            start, source = min(self.start_block, n), dense.boundaries
        ref = self.reference
        if ref is not None and ref.block > start and ref.states.covers(rows):
            start, source = min(ref.block, n), ref.states
        return start, source


def _states(source: torch.Tensor | BlockStates, blocks: int | slice, rows: list[int]):
    """States entering ``blocks`` on ``rows`` of the dense boundaries ``(L + 1, N, T, d)`` or
    of a :class:`BlockStates`: ``(B, T, d)`` for one block, ``(k, B, T, d)`` for a slice."""
    if isinstance(source, BlockStates):
        return source.get(blocks, rows)
    return source[blocks, rows]


@runtime_checkable
class Fitness(Protocol):
    """The fitness protocol.

    ``prepare(model, input_ids, dense)`` is called once, before any candidate, with the dense
    model and all calibration tokens; it may cache teacher outputs and must not change the model.
    ``__call__`` is called once per candidate and batch, and must not change the model either.
    """

    name: str
    direction: str  # "minimize" or "maximize"

    def __call__(self, candidate: Candidate, batch: Batch) -> float: ...


@runtime_checkable
class AdditiveFitness(Protocol):
    """A fitness whose value on a batch is ``reduce(total, count)`` of sums over its tokens.

    ``partial(candidate, batch)`` returns ``(total, count)`` for ``batch``; the parts of a
    batch split into shards add up (``sum(totals), sum(counts)``) to the whole batch's, so
    ``reduce`` of the sums equals the value on the whole batch (up to float rounding).
    """

    name: str
    direction: str
    additive: bool

    def __call__(self, candidate: Candidate, batch: Batch) -> float: ...

    def partial(self, candidate: Candidate, batch: Batch) -> tuple[float, float]: ...

    def reduce(self, total: float, count: float) -> float: ...

    # Optional: append each sequence's ``(total, count)`` to ``candidate.sequences`` (when it
    # is a list), in batch order. With them the search pools a genome's sequences over every
    # batch it was scored on (an estimate with a standard error) and resamples the final
    # stage's sequences (how often its decision would flip): evosearch.estimate.


def is_additive(fitness) -> bool:
    """Whether ``fitness`` declares itself additive (``additive = True``, with ``partial``
    and ``reduce``), so that its batches may be sharded."""
    return (
        bool(getattr(fitness, "additive", False))
        and callable(getattr(fitness, "partial", None))
        and callable(getattr(fitness, "reduce", None))
    )


class CallableFitness:
    """Wraps a user's ``fn(model, batch) -> float``.

    ``batch`` is the :class:`Batch` (``batch.input_ids`` is a ``(B, T)`` tensor). The model is
    the fully materialised candidate, run from the first block.
    """

    def __init__(
        self,
        fn: Callable[[nn.Module, Batch], float],
        *,
        name: str | None = None,
        direction: str = "minimize",
    ) -> None:
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")
        self.direction = direction

    def __call__(self, candidate: Candidate, batch: Batch) -> float:
        with torch.no_grad():
            return float(self.fn(candidate.model, batch))


def as_fitness(obj) -> Fitness:
    """Return ``obj`` if it already follows the :class:`Fitness` protocol, else wrap a callable
    ``fn(model, batch) -> float``."""
    if hasattr(obj, "direction") and hasattr(obj, "name") and callable(obj):
        return obj
    if callable(obj):
        return CallableFitness(obj)
    raise TypeError(f"a fitness must be callable, got {type(obj).__name__}")


@torch.inference_mode()
def measure_latency(model: nn.Module, input_ids: torch.Tensor, *, repeats: int = 5) -> float:
    """Median wall-clock seconds of one forward of ``model`` on ``input_ids`` (after one
    warm-up forward; CUDA work is synchronised), on the device of the model's parameters.

    A measured objective, so it carries the machine's noise: the median of ``repeats`` runs
    damps it, and it only means something on the hardware the compressed model will run on.
    """
    import time

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = next(model.parameters()).device
    ids = input_ids.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
