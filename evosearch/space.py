"""The search-space protocol every space in ``search_spaces/`` implements."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import nn

from evosearch.genome import Genome, LevelSpec

__all__ = ["SearchSpace", "first_changed_block"]


@runtime_checkable
class SearchSpace(Protocol):
    """A family of compressed versions of one model, encoded as :class:`Genome` levels.

    Attributes:
        name: registry name (e.g. ``"layer-drop"``).
        spec: unit ranges, groups and budgets of the genomes.

    Optional methods the strategies use where a space has them: ``is_feasible(genome) ->
    bool`` (a bound beyond the group budgets; infeasible genomes are never evaluated) and
    ``repair(genome, rng=None) -> Genome`` (applied to every new genome first, e.g. to spend a
    budget a mutation left unspent; with ``rng=None`` it must be deterministic, as Optuna's
    decoded genomes need), and ``initial_genome(rng) -> Genome`` (a genome for a search's
    initial population, where a structured start beats :meth:`random_genome`; e.g. a sublayer
    drop that starts from whole blocks).
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

    # Optional: ``first_difference(a, b) -> int``, the first block whose computation differs
    # between two genomes (the number of blocks when none does; see
    # :func:`first_changed_block`). With it, offspring start from their parent's hidden states
    # there (:class:`~evosearch.engine.Evaluator`'s ``parent_reuse``).

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


def first_changed_block(a: Genome, b: Genome, unit_blocks, n_blocks: int) -> int:
    """The first block holding a unit whose level differs between ``a`` and ``b`` (``n_blocks``
    when none does): what a space's ``first_difference`` returns.

    Args:
        unit_blocks: the block of each unit; a unit before the blocks (the token embedding) is
            block 0, one that computes nothing (a budget slack unit) is ``None``.
    """
    changed = [
        blk for x, y, blk in zip(a.levels, b.levels, unit_blocks) if x != y and blk is not None
    ]
    return max(0, min(changed)) if changed else n_blocks
