"""Composite spaces: one genome made of per-dimension parts under a single cost budget.

A :class:`CompositeSpace` lays the units of several *parts* (e.g. "drop": one 0/1 unit per
block, "sparsity": a level per linear, "bits": a level per linear) side by side in one
:class:`~evosearch.genome.Genome`. The parts' own budgets (drop exactly ``k`` blocks, average
sparsity ``s``) are gone: a genome may hold any levels, and one budget binds them all, the
``cost`` of the whole genome (e.g. the bytes of the exported model) against a budget ``B``.

How that fits the level-switch machinery (:class:`~evosearch.genome.LevelSpec` keeps group sums
exact):

* every part unit is in group 0 together with *slack* units that hold ``S - sum(levels)``
  (``S``: the sum of the part units' maxima), so group 0's sum is always ``S`` and a level
  switch can raise or lower any unit, of any part, against any other;
* one *niche* unit in group 1 holds the index of the budget the genome is meant for, so a
  multi-budget search (one niche per budget, :class:`~evosearch.strategies.MultiBudgetEvoPress`)
  finds a genome's budget from its group sums, and moving an elite to a neighbouring budget is
  one budget step of group 1;
* :meth:`CompositeSpace.mutation` draws the moving unit part by part, so a part with few
  units (one per block) moves as often as one with many (one per linear);
* :meth:`CompositeSpace.repair` is the budget: it moves units of the *filling* parts (those
  whose levels buy bytes in small steps, e.g. bit-widths) one level at a time until the cost
  lies in ``[B - tolerance, B]``, where ``tolerance`` is the largest cost of one level step of
  a filling unit (other parts' units move only when no filling move helps, e.g. a block is
  restored when every kept layer is at the top bit-width). Strategies call it on every genome
  they make, so a mutation that drops a block (or restores one, or prunes a layer) becomes a
  *trade*: the bytes it frees or takes are given to, or taken from, the other dimensions.

The cost need not be a sum of independent per-part costs (a dropped block costs nothing
whatever its bit-widths): it is a function of all parts' levels, given by the space that builds
the composite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from evosearch.genome import Genome, LevelSpec
from evosearch.operators import level_switch_mutation, part_mutation

__all__ = ["CompositeSpace", "Part", "repair_levels"]

MAX_LEVEL = 36 * 36 - 1  # the largest level a genome key can hold


@dataclass(frozen=True)
class Part:
    """One dimension of a composite genome.

    Args:
        name: e.g. ``"drop"``, ``"sparsity"``, ``"bits"``.
        max_levels: highest level of each unit (0 freezes a unit: a dimension switched off).
        names: a name per unit (for reports).
        start: the levels a search starts from (e.g. nothing dropped, dense, top bit-width).
        fills: the repair moves this part's units to meet the budget (the other parts' only
            when no move of these helps).
        limit: most levels the part's units may hold together (e.g. blocks dropped at most);
            the repair lowers random units of the part until it holds. ``None``: no bound.
    """

    name: str
    max_levels: tuple[int, ...]
    names: tuple[str, ...]
    start: tuple[int, ...]
    fills: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        n = len(self.max_levels)
        if len(self.names) != n or len(self.start) != n:
            raise ValueError(f"part {self.name}: max_levels, names and start differ in length")
        if any(not 0 <= s <= m for s, m in zip(self.start, self.max_levels)):
            raise ValueError(f"part {self.name}: start levels outside 0..max_levels")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"part {self.name}: limit must be >= 0, got {self.limit}")


@dataclass(frozen=True)
class _Layout:
    """Where each part's units lie in the genome, then the slack units and the niche unit."""

    parts: tuple[Part, ...]
    offsets: tuple[int, ...] = field(init=False)
    n_part_units: int = field(init=False)
    slack_max: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        offsets, n = [], 0
        for p in self.parts:
            offsets.append(n)
            n += len(p.max_levels)
        total = sum(sum(p.max_levels) for p in self.parts)
        slack = [MAX_LEVEL] * (total // MAX_LEVEL)
        if total % MAX_LEVEL:
            slack.append(total % MAX_LEVEL)
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "n_part_units", n)
        object.__setattr__(self, "slack_max", tuple(slack) or (0,))

    @property
    def capacity(self) -> int:
        return sum(self.slack_max)

    @property
    def niche_unit(self) -> int:
        return self.n_part_units + len(self.slack_max)

    def span(self, name: str) -> range:
        for p, off in zip(self.parts, self.offsets):
            if p.name == name:
                return range(off, off + len(p.max_levels))
        raise KeyError(f"no part named {name!r}; parts: {[p.name for p in self.parts]}")


def repair_levels(
    levels: list[int],
    *,
    total: int,
    delta: Callable[[Sequence[int], int, int], int],
    budget: int,
    tolerance: int,
    fill: Sequence[int],
    others: Sequence[int] = (),
    legal: Callable[[Sequence[int], int, int], bool],
    rng: np.random.Generator | None = None,
) -> bool:
    """Move units one level at a time until ``budget - tolerance <= cost <= budget``
    (``levels`` changed in place; ``total``: their cost now; ``delta(levels, u, step)``: the
    cost change of moving unit ``u`` by ``step``; ``legal(levels, u, step)``: whether that
    move stays in range); returns whether it got there.

    Each move goes the way the cost must: a ``fill`` unit when one can (e.g. a bit-width),
    else one of ``others`` (e.g. restoring a dropped block when every kept layer is at the
    top bit-width, or dropping one when every layer is at the lowest), and, under the window
    with no move that fits, an ``others`` move that overshoots for the ``fill`` units to
    correct. With ``rng`` the move is random among the candidates; without, it is the unit
    with the highest level (when the cost must fall) or the lowest (when it must rise),
    lowest index first: a deterministic repair that deals a budget out as evenly as the steps
    allow, for decoders that must map the same input to the same genome.
    """
    for _ in range(8 * (len(fill) + len(others)) + 64):
        if total > budget:
            room, down = 0, True
        elif total < budget - tolerance:
            room, down = budget - total, False
        else:
            return True
        move = _move(levels, delta, legal, fill, down, room, rng) or _move(
            levels, delta, legal, others, down, room, rng
        )
        if move is None and not down:  # overshoot with a coarse unit, then refill
            move = _move(levels, delta, legal, others, down, None, rng)
        if move is None:
            return False
        u, step, d = move
        levels[u] += step
        total += d
    return False


def _move(levels, delta, legal, units, down: bool, room: int | None, rng):
    """A move ``(unit, step, cost change)`` of ``units`` that lowers the cost (``down``) or
    raises it by at most ``room`` (``None``: by any amount), or ``None``."""
    options = []
    for u in units:
        for step in (-1, 1):
            if not legal(levels, u, step):
                continue
            d = delta(levels, u, step)
            if (d < 0) if down else (d > 0 and (room is None or d <= room)):
                options.append((u, step, d))
    if not options:
        return None
    if rng is not None:
        return options[int(rng.integers(len(options)))]
    sign = -1 if down else 1
    return min(options, key=lambda o: (sign * levels[o[0]], o[0]))


class CompositeSpace:
    """The genome, budget and repair of a space made of :class:`Part` s (see the module
    docstring). A concrete space subclasses it and adds materialisation (``replacements``,
    ``start_block``, ``save``) and its own ``describe`` / ``metrics``.

    Args:
        parts: the dimensions, in genome order.
        cost: ``cost({part name: its levels}) -> int``, the one budgeted quantity.
        delta: ``delta(levels, u, step) -> int``: the cost change of moving unit ``u`` of the
            parts' concatenated ``levels`` by ``step`` (the repair's hot loop; default: two
            calls of ``cost``).
        budgets: one budget per niche (one for a single-budget search).
        tolerance: how far under its budget a genome may stay (one level step of the
            costliest filling unit, so the repair can always get there).
        niche: the niche of the space's own spec (a single-budget search's budget).
        labels: a label per niche (default: the budgets).
    """

    def __init__(
        self,
        parts: Sequence[Part],
        *,
        cost: Callable[[Mapping[str, tuple[int, ...]]], int],
        delta: Callable[[Sequence[int], int, int], int] | None = None,
        budgets: Sequence[int],
        tolerance: int,
        niche: int = 0,
        labels: Sequence[str] | None = None,
    ) -> None:
        if not budgets:
            raise ValueError("a composite space needs at least one budget")
        if not 0 <= niche < len(budgets):
            raise ValueError(f"niche {niche} is not one of the {len(budgets)} budgets")
        if len({p.name for p in parts}) != len(parts):
            raise ValueError("part names must be distinct")
        self.parts = tuple(parts)
        self.layout = _Layout(self.parts)
        self.part_cost = cost
        self.budgets = tuple(int(b) for b in budgets)
        self.tolerance = int(tolerance)
        self.labels = tuple(labels) if labels else tuple(str(b) for b in self.budgets)
        lay = self.layout
        self.spec = LevelSpec(
            max_levels=(
                *(m for p in self.parts for m in p.max_levels),
                *lay.slack_max,
                len(self.budgets) - 1,
            ),
            groups=(0,) * (lay.n_part_units + len(lay.slack_max)) + (1,),
            budgets={0: lay.capacity, 1: niche},
            names=(
                *(f"{p.name}:{n}" for p in self.parts for n in p.names),
                *(f"slack.{i}" for i in range(len(lay.slack_max))),
                "budget",
            ),
        )
        self._fill = [u for p in self.parts if p.fills for u in lay.span(p.name)]
        self._others = [u for p in self.parts if not p.fills for u in lay.span(p.name)]
        self._part_of = [p for p in self.parts for _ in p.max_levels]
        self._movable = [list(lay.span(p.name)) for p in self.parts if any(p.max_levels)]
        self._delta = delta or self._delta_by_cost

    def _delta_by_cost(self, levels: Sequence[int], u: int, step: int) -> int:
        moved = list(levels)
        moved[u] += step
        return self.part_cost(self._by_part(moved)) - self.part_cost(self._by_part(levels))

    # -- encoding -------------------------------------------------------------------------

    def split(self, genome: Genome) -> dict[str, tuple[int, ...]]:
        """Each part's levels in ``genome``."""
        lv = genome.levels
        return {p.name: tuple(lv[i] for i in self.layout.span(p.name)) for p in self.parts}

    def join(self, levels: Mapping[str, Sequence[int]], niche: int | None = None) -> Genome:
        """The genome of the parts' ``levels`` at ``niche`` (default: the spec's), slack
        filled in (first slack units first, so equal parts give equal genomes)."""
        flat = [int(v) for p in self.parts for v in levels[p.name]]
        if len(flat) != self.layout.n_part_units:
            raise ValueError(f"need {self.layout.n_part_units} part levels, got {len(flat)}")
        rest = self.layout.capacity - sum(flat)
        slack = []
        for top in self.layout.slack_max:
            slack.append(min(top, rest))
            rest -= slack[-1]
        niche = self.spec.budgets[1] if niche is None else niche
        return Genome((*flat, *slack, niche))

    def niche(self, genome: Genome) -> int:
        """The index of the budget ``genome`` is meant for."""
        return genome.levels[self.layout.niche_unit]

    def cost(self, genome: Genome) -> int:
        """The budgeted quantity of ``genome`` (e.g. its bytes)."""
        return self.part_cost(self.split(genome))

    def budget(self, genome: Genome) -> int:
        return self.budgets[self.niche(genome)]

    def range_budgets(self) -> tuple[list[dict[int, int]], list[str]]:
        """The niches of a multi-budget search: group budgets and a label per budget."""
        cap = self.layout.capacity
        return [{0: cap, 1: k} for k in range(len(self.budgets))], list(self.labels)

    # -- budget ---------------------------------------------------------------------------

    def is_feasible(self, genome: Genome) -> bool:
        """Within every unit's range and part limit, and ``budget - tolerance <= cost <=
        budget`` for its niche."""
        if not self.spec.is_valid(_as_own_niche(self.spec, genome)):
            return False
        levels = self.split(genome)
        if any(p.limit is not None and sum(levels[p.name]) > p.limit for p in self.parts):
            return False
        b = self.budget(genome)
        return b - self.tolerance <= self.part_cost(levels) <= b

    def repair(self, genome: Genome, rng: np.random.Generator | None = None) -> Genome:
        """``genome`` within its part limits and brought into its budget's window by moving
        the filling parts (see :func:`repair_levels`), slack recomputed; the genome itself
        when the window cannot be reached (the strategy then skips it as infeasible)."""
        levels = list(genome.levels[: self.layout.n_part_units])
        for p in self.parts:
            if p.limit is None:
                continue
            span = self.layout.span(p.name)
            while sum(levels[i] for i in span) > p.limit:
                up = [i for i in span if levels[i] > 0]
                levels[up[int(rng.integers(len(up))) if rng is not None else -1]] -= 1
        niche = self.niche(genome)
        ok = repair_levels(
            levels,
            total=self.part_cost(self._by_part(levels)),
            delta=self._delta,
            budget=self.budgets[niche],
            tolerance=self.tolerance,
            fill=self._fill,
            others=self._others,
            legal=self._legal,
            rng=rng,
        )
        return self.join(self._by_part(levels), niche) if ok else genome

    def _legal(self, levels: Sequence[int], u: int, step: int) -> bool:
        """Whether unit ``u`` may move by ``step``: its range, and its part's limit."""
        if not 0 <= levels[u] + step <= self.spec.max_levels[u]:
            return False
        part = self._part_of[u]
        if step > 0 and part.limit is not None:
            return sum(levels[i] for i in self.layout.span(part.name)) < part.limit
        return True

    def _by_part(self, flat: Sequence[int]) -> dict[str, tuple[int, ...]]:
        return {p.name: tuple(flat[i] for i in self.layout.span(p.name)) for p in self.parts}

    def mutation(
        self, genome: Genome, spec: LevelSpec, rng: np.random.Generator, n_switches: int = 1
    ) -> Genome:
        """The strategies' mutation in this space: :func:`~evosearch.operators.part_mutation`
        over the parts that can move, so a block is dropped or restored as often as a
        bit-width or a sparsity level moves; the repair then trades the bytes it freed or took
        with the filling part."""
        return part_mutation(genome, spec, self._movable, rng, n_switches)

    # -- genomes --------------------------------------------------------------------------

    def start_genome(self, niche: int | None = None) -> Genome:
        """The parts' start levels, deterministically repaired to ``niche``'s budget."""
        niche = self.spec.budgets[1] if niche is None else niche
        start = self.join({p.name: p.start for p in self.parts}, niche)
        return self.repair(start)

    def random_genome(self, rng: np.random.Generator) -> Genome:
        """The start genome after ``U(1, n)`` random level switches (``n``: part units),
        repaired to the budget."""
        genome = self.start_genome()
        n = int(rng.integers(1, self.layout.n_part_units + 1))
        return self.repair(level_switch_mutation(genome, self.spec, rng, n), rng)


def _as_own_niche(spec: LevelSpec, genome: Genome) -> Genome:
    """``genome`` with its niche unit's level checked against the widest budget, so that
    :meth:`LevelSpec.is_valid` (which holds group 1 to the spec's own niche) accepts a genome
    of any niche: only the ranges and group 0's sum are checked."""
    levels = list(genome.levels)
    if len(levels) != spec.n_units or not 0 <= levels[-1] <= spec.max_levels[-1]:
        return Genome((-1,))
    levels[-1] = spec.budgets[1]
    return Genome(tuple(levels))
