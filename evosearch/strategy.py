"""The strategy protocol: what :func:`evosearch.engine.search` needs from a search strategy.

A strategy proposes genomes and learns from their fitness; it never touches a model, data, a
runner or a file. The engine drives every strategy through the same four calls, so EvoPress,
multi-budget EvoPress, random search, the Optuna samplers and genetic programming run on one
loop, with one memo, log, checkpoint and set of runners::

    while (request := strategy.ask()) is not None:      # None once strategy.done
        values = [fitness(g, request.tokens) for g in request.genomes]
        strategy.tell(request, values)                   # lower is better; inf = failed
        if strategy.generation != request.generation:   # a generation just finished
            checkpoint(strategy.state_dict())

A genome is any frozen, hashable object with a ``key() -> str`` that identifies it (the engine
memoises and logs on it): :class:`~evosearch.genome.Genome` for the level spaces,
:class:`~evosearch.gp.MetricGenome` for expression trees. Two genomes with the same key are
evaluated once.

``evosearch.testing.strategy`` holds the contract checks every strategy passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["Request", "Stage", "Strategy"]


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One selection stage: every candidate is scored on ``tokens`` calibration tokens (the same
    tokens for all of them) and the best ``survivors`` go on."""

    tokens: int
    survivors: int

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"Stage.tokens must be >= 1, got {self.tokens}")
        if self.survivors < 1:
            raise ValueError(f"Stage.survivors must be >= 1, got {self.survivors}")

    @classmethod
    def parse(cls, text: str) -> tuple[Stage, ...]:
        """``"2048:2,16384:1"`` -> two stages (the command-line form); a one-line
        ``ValueError`` names a malformed one."""
        try:
            pairs = [[int(x) for x in part.split(":")] for part in text.split(",")]
        except ValueError:
            pairs = []
        if not pairs or any(len(pair) != 2 for pair in pairs):
            raise ValueError(
                f"stages must look like 2048:2,16384:1 (tokens:survivors), got {text!r}"
            )
        return tuple(cls(tokens=t, survivors=s) for t, s in pairs)


@dataclass(frozen=True)
class Request:
    """Genomes to evaluate now, all on the same ``tokens`` of generation ``generation``'s data
    for stage ``stage`` (the engine draws that batch from ``(seed, generation, stage)``).

    ``parents``: genomes of the request that the others were made from, listed first in
    ``genomes``; the evaluator may keep their hidden states on the batch and start the others'
    forwards where they first differ (a speed-up only: values are the same without it).
    """

    generation: int
    stage: int
    tokens: int
    genomes: tuple[Any, ...]
    parents: tuple[Any, ...] = ()


@runtime_checkable
class Strategy(Protocol):
    """An ask/tell search strategy (minimises; the engine flips a maximised fitness).

    Attributes:
        generation: the generation being asked (0 for the initial population); it moves on
            in the :meth:`tell` that finishes a generation, which is how the engine knows to
            checkpoint.
        history: one JSON-able dict per finished generation with at least ``generation``,
            ``best`` (the best genome's key), ``value`` (its fitness) and ``tokens``.
    """

    generation: int
    history: list[dict]

    @property
    def done(self) -> bool:
        """True once every generation has been told; :meth:`ask` then returns ``None``."""
        ...

    @property
    def best(self) -> tuple[Any, float] | None:
        """``(genome, value)`` of the best genome told so far (at the highest fidelity it was
        compared at), or ``None`` before the first generation has finished."""
        ...

    def ask(self) -> Request | None:
        """The genomes to evaluate next, or ``None`` when done. Called again without a
        :meth:`tell` in between, it returns the same request; it must not consume the values
        of an earlier request."""
        ...

    def tell(self, request: Request, values: Sequence[float]) -> None:
        """The fitness of ``request.genomes``, in order (lower is better; ``inf`` marks a failed
        evaluation). ``request`` must be the latest :meth:`ask`'s; a wrong request or number of
        values raises ``RuntimeError`` / ``ValueError`` and changes nothing."""
        ...

    def state_dict(self) -> dict:
        """JSON-able state, valid between generations (right after the :meth:`tell` that
        finished one): :meth:`load_state_dict` of it into a strategy built with the same
        arguments continues exactly as this one would."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into a freshly built strategy."""
        ...
