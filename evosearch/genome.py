"""Genomes: one integer level per compression unit, with budgets kept exact per group.

Every search space in evosearch encodes a candidate as a :class:`Genome` over a :class:`LevelSpec`:
a unit is a block, a sublayer or a linear layer; its level says how much of it is compressed
(0 = untouched). Units are partitioned into groups, and the sum of levels in each group is fixed
by the budget. Level steps are chosen by each space so that one step costs the same in every unit
of a group, which is what makes EvoPress's level-switch mutation budget-preserving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["Genome", "LevelSpec"]


@dataclass(frozen=True)
class Genome:
    """An immutable, hashable assignment of one level per unit."""

    levels: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))

    def key(self) -> str:
        """A short stable string identifying the genome (used in logs and caches): one base-36
        digit per level, or, when a level exceeds 35, ``"~"`` and two digits per level."""
        if all(0 <= v < 36 for v in self.levels):
            return "".join(_DIGITS[v] for v in self.levels)
        if not all(0 <= v < 36 * 36 for v in self.levels):
            raise ValueError(f"levels must lie in 0..{36 * 36 - 1}, got {self.levels}")
        return "~" + "".join(_DIGITS[v // 36] + _DIGITS[v % 36] for v in self.levels)

    @classmethod
    def from_key(cls, key: str) -> Genome:
        if key.startswith("~"):
            return cls(tuple(int(key[i : i + 2], 36) for i in range(1, len(key), 2)))
        return cls(tuple(int(c, 36) for c in key))

    def to_json(self) -> str:
        return json.dumps(list(self.levels))


_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True, kw_only=True)
class LevelSpec:
    """The shape of a genome: per-unit level range, unit groups and each group's level budget.

    Args:
        max_levels: highest allowed level of each unit (0 freezes a unit).
        groups: group id of each unit; level switches only move levels within a group.
        budgets: required sum of levels per group id.
        names: human-readable unit names, for reports.
        switch_size: levels one mutation switch moves (as far as both units allow); a space
            whose levels are finer than its natural step (e.g. a sparsity range's aligned
            ladders) sets it so a switch moves about as many weights as one natural step.
    """

    max_levels: tuple[int, ...]
    groups: tuple[int, ...]
    budgets: dict[int, int] = field(hash=False)
    names: tuple[str, ...] = ()
    switch_size: int = 1

    def __post_init__(self) -> None:
        n = len(self.max_levels)
        if n == 0:
            raise ValueError("a LevelSpec needs at least one unit")
        if len(self.groups) != n:
            raise ValueError(f"groups has {len(self.groups)} entries, max_levels has {n}")
        if self.names and len(self.names) != n:
            raise ValueError(f"names has {len(self.names)} entries, max_levels has {n}")
        if any(m < 0 for m in self.max_levels):
            raise ValueError("max_levels must be >= 0")
        if self.switch_size < 1:
            raise ValueError(f"switch_size must be >= 1, got {self.switch_size}")
        if extra := sorted(set(self.budgets) - set(self.groups)):
            raise ValueError(
                f"budgets name groups without units: {', '.join(f'group {g}' for g in extra)}"
            )
        for g in set(self.groups):
            if g not in self.budgets:
                raise ValueError(f"group {g} has no budget")
            capacity = sum(m for m, gg in zip(self.max_levels, self.groups) if gg == g)
            if not 0 <= self.budgets[g] <= capacity:
                raise ValueError(
                    f"budget {self.budgets[g]} of group {g} is impossible: its units allow "
                    f"0..{capacity}"
                )

    @property
    def n_units(self) -> int:
        return len(self.max_levels)

    def units_of(self, group: int) -> list[int]:
        return [i for i, g in enumerate(self.groups) if g == group]

    def group_total(self, levels: tuple[int, ...] | list[int], group: int) -> int:
        """The levels of ``group``'s units in ``levels``, summed (its budget when valid)."""
        return sum(levels[i] for i in self.units_of(group))

    def is_valid(self, genome: Genome) -> bool:
        """True when ``genome`` respects every unit's range and every group's budget exactly."""
        if len(genome.levels) != self.n_units:
            return False
        if any(not 0 <= v <= m for v, m in zip(genome.levels, self.max_levels)):
            return False
        return all(self.group_total(genome.levels, g) == b for g, b in self.budgets.items())
