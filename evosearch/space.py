"""The search-space protocol every space in ``search_spaces/`` implements."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import nn

from evosearch.genome import Genome, LevelSpec

__all__ = ["SearchSpace"]


@runtime_checkable
class SearchSpace(Protocol):
    """A family of compressed versions of one model, encoded as :class:`Genome` levels.

    Attributes:
        name: registry name (e.g. ``"layer-drop"``).
        spec: unit ranges, groups and budgets of the genomes.

    Optional methods the strategies use where a space has them: ``is_feasible(genome) ->
    bool`` (a bound beyond the group budgets; infeasible genomes are never evaluated) and
    ``repair(genome) -> Genome`` (applied to every new genome first, e.g. to spend a budget a
    mutation left unspent; it must be deterministic).
    """

    name: str
    spec: LevelSpec

    def random_genome(self, rng: np.random.Generator) -> Genome:
        """A random genome that meets the budget exactly."""
        ...

    def replacements(self, model: nn.Module, genome: Genome) -> dict[str, nn.Module]:
        """Module path -> stand-in module that turn the dense ``model`` into the candidate.
        Called once per candidate; must not change ``model``."""
        ...

    def start_block(self, genome: Genome) -> int:
        """Index of the first block whose computation differs from the dense model's (the
        number of blocks when nothing changes); earlier blocks' outputs are reused."""
        ...

    def describe(self, genome: Genome) -> dict[str, Any]:
        """A JSON-able, human-readable description of the genome."""
        ...

    def metrics(self, genome: Genome) -> dict[str, float]:
        """Compression measures of the genome (parameters, sparsity, ...), for records,
        reports and multi-objective searches."""
        ...

    def summary(self) -> str:
        """One line saying what the space searches (for logs)."""
        ...

    def config(self) -> dict[str, Any]:
        """The JSON-able settings that rebuild the space."""
        ...

    def save(self, model: nn.Module, tokenizer, genome: Genome, out_dir: str) -> None:
        """Write the compressed model for ``genome`` to ``out_dir`` (``model`` stays dense)."""
        ...
