"""Pure variation operators over :class:`~evosearch.genome.Genome` with an explicit ``rng``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evosearch.genome import Genome, LevelSpec

__all__ = [
    "anchored_step",
    "budget_step",
    "fill_budget",
    "level_switch_mutation",
    "local_neighbours",
    "local_switch",
    "mixed_mutation",
    "number_of_switches",
    "part_mutation",
    "random_genome",
    "steepest_exchange",
    "switch_neighbours",
]


def random_genome(spec: LevelSpec, rng: np.random.Generator) -> Genome:
    """A uniformly random budget-exact genome: each group's budget is dealt out one level at a
    time to a random unit that still has room."""
    levels = [0] * spec.n_units
    for group, budget in sorted(spec.budgets.items()):
        units = spec.units_of(group)
        for _ in range(budget):
            open_units = [u for u in units if levels[u] < spec.max_levels[u]]
            levels[open_units[int(rng.integers(len(open_units)))]] += 1
    return Genome(tuple(levels))


def number_of_switches(rng: np.random.Generator, high: int = 3) -> int:
    """EvoPress's count of level switches per mutation: min(U{1..high}, U{1..high})."""
    return int(min(rng.integers(1, high + 1), rng.integers(1, high + 1)))


def level_switch_mutation(
    genome: Genome, spec: LevelSpec, rng: np.random.Generator, n_switches: int = 1
) -> Genome:
    """EvoPress level-switch mutation (Sieberling et al., 2024, Sec. 3): ``n_switches`` times,
    raise one unit's level by one and lower another unit's level in the same group by one, so
    every group's budget stays exact. With ``spec.switch_size`` > 1, a switch moves that many
    levels, or as many as both units allow.

    Returns ``genome`` itself when no switch is possible (e.g. a budget of 0).
    """
    levels = list(genome.levels)
    groups = sorted(spec.budgets)
    for _ in range(n_switches):
        movable = []
        for g in groups:
            units = spec.units_of(g)
            down = [u for u in units if levels[u] > 0]
            up = [u for u in units if levels[u] < spec.max_levels[u]]
            if down and up and (len(down) > 1 or len(up) > 1 or down != up):
                movable.append((down, up))
        if not movable:
            break
        down, up = movable[int(rng.integers(len(movable)))]
        while True:
            i = down[int(rng.integers(len(down)))]
            j = up[int(rng.integers(len(up)))]
            if i != j:
                break
        size = min(spec.switch_size, levels[i], spec.max_levels[j] - levels[j])
        levels[i] -= size
        levels[j] += size
    return Genome(tuple(levels))


def local_switch(
    genome: Genome, spec: LevelSpec, rng: np.random.Generator, n_switches: int = 1
) -> Genome:
    """Locality mutation: ``n_switches`` times, a level switch (one unit down, another of its
    group up) whose receiving unit lies next to a unit that holds a level (the previous or
    the next of its group's units, in unit order). For layer drop, a dropped block moves to a
    kept block adjacent to a dropped one: it slides along, or joins, a run of dropped blocks,
    instead of landing anywhere. Each switch is drawn uniformly among such moves and moves
    ``spec.switch_size`` levels as far as both units allow, like
    :func:`level_switch_mutation`; every group's budget stays exact.

    Returns ``genome`` itself when no such switch is possible.
    """
    levels = list(genome.levels)
    for _ in range(n_switches):
        moves = _local_moves(levels, spec)
        if not moves:
            break
        i, j = moves[int(rng.integers(len(moves)))]
        size = min(spec.switch_size, levels[i], spec.max_levels[j] - levels[j])
        levels[i] -= size
        levels[j] += size
    return Genome(tuple(levels))


def _local_moves(levels: list[int], spec: LevelSpec) -> list[tuple[int, int]]:
    """Every ``(down, up)`` pair of a group whose ``up`` unit has room and is adjacent to a
    unit holding a level."""
    moves = []
    for g in sorted(spec.budgets):
        units = spec.units_of(g)
        near = set()
        for a, b in zip(units, units[1:]):
            if levels[a] > 0:
                near.add(b)
            if levels[b] > 0:
                near.add(a)
        up = [u for u in units if u in near and levels[u] < spec.max_levels[u]]
        moves += [(i, j) for i in units if levels[i] > 0 for j in up if i != j]
    return moves


def mixed_mutation(
    genome: Genome,
    spec: LevelSpec,
    rng: np.random.Generator,
    n_switches: int = 1,
    locality: float = 0.0,
) -> Genome:
    """``n_switches`` moves, each a :func:`local_switch` with probability ``locality`` and
    otherwise a random :func:`level_switch_mutation` switch. With ``locality=0`` it is
    :func:`level_switch_mutation` itself, drawing the same random numbers."""
    if locality <= 0:
        return level_switch_mutation(genome, spec, rng, n_switches)
    for _ in range(n_switches):
        if rng.random() < locality:
            genome = local_switch(genome, spec, rng)
        else:
            genome = level_switch_mutation(genome, spec, rng)
    return genome


def part_mutation(
    genome: Genome,
    spec: LevelSpec,
    parts: Sequence[Sequence[int]],
    rng: np.random.Generator,
    n_switches: int = 1,
) -> Genome:
    """A level switch whose moving unit is drawn part by part: ``n_switches`` times, a part
    (a list of units, e.g. a composite genome's "drop", "sparsity" and "bits" units) is drawn
    uniformly among those with a legal move, then a unit of it and a direction (one level up
    or down) uniformly among its legal moves, and a partner unit of the same group moves one
    level the other way, so every group's sum stays exact.

    :func:`level_switch_mutation` draws units uniformly, so a part with few units (30 blocks
    beside 420 per-linear levels) would rarely move; here each part moves as often as any
    other. Returns ``genome`` itself when nothing can move."""
    levels = list(genome.levels)
    top = spec.max_levels
    for _ in range(n_switches):
        moves = [
            [(u, s) for u in part for s in (-1, 1) if 0 <= levels[u] + s <= top[u]]
            for part in parts
        ]
        moves = [m for m in moves if m]
        if not moves:
            break
        options = moves[int(rng.integers(len(moves)))]
        u, step = options[int(rng.integers(len(options)))]
        partners = [
            v for v in spec.units_of(spec.groups[u]) if v != u and 0 <= levels[v] - step <= top[v]
        ]
        if not partners:
            continue
        v = partners[int(rng.integers(len(partners)))]
        levels[u] += step
        levels[v] -= step
    return Genome(tuple(levels))


def local_neighbours(genome: Genome, spec: LevelSpec) -> list[Genome]:
    """Every genome one :func:`local_switch` away from ``genome``, in unit order: for layer
    drop, each dropped block moved to each kept block next to a dropped one (at most ``2k``
    targets, so far fewer than :func:`switch_neighbours` once the drops form runs)."""
    return [
        _switched(genome.levels, spec, i, j) for i, j in _local_moves(list(genome.levels), spec)
    ]


def _switched(levels, spec: LevelSpec, i: int, j: int) -> Genome:
    size = min(spec.switch_size, levels[i], spec.max_levels[j] - levels[j])
    moved = list(levels)
    moved[i] -= size
    moved[j] += size
    return Genome(tuple(moved))


def switch_neighbours(genome: Genome, spec: LevelSpec) -> list[Genome]:
    """Every genome one level switch away from ``genome`` (one unit down a step, another of
    its group up a step, as :func:`level_switch_mutation` makes them), in unit order: the
    whole neighbourhood a local search or a final polish of the elite examines. For dropping
    ``k`` of ``n`` blocks there are ``k * (n - k)``."""
    levels = genome.levels
    out = []
    for g in sorted(spec.budgets):
        units = spec.units_of(g)
        for i in units:
            for j in units:
                if i != j and levels[i] > 0 and levels[j] < spec.max_levels[j]:
                    out.append(_switched(levels, spec, i, j))
    return out


def budget_step(
    genome: Genome,
    spec: LevelSpec,
    rng: np.random.Generator,
    delta: int | dict[int, int],
    guide: Genome | None = None,
) -> Genome:
    """Move group budgets by ``delta`` levels (an ``int`` for every group, or ``{group:
    delta}``): one level at a time, a random unit of the group that has room gains a level
    (``delta > 0``) or a random unit above level 0 loses one (``delta < 0``).

    This is how a multi-budget search carries a good genome to a neighbouring budget (e.g.
    the best set of 6 dropped blocks plus one more block is a strong guess for 7). With a
    ``guide`` (a good genome on the far side of the move, e.g. the best at 9 when moving from
    6 to 7), a level is added only where the guide's level is higher (removed only where it is
    lower) while such units remain: the child interpolates between the two neighbours.

    Raises:
        ValueError: a group has no unit left to move, or ``delta`` names an unknown group.
    """
    deltas = delta if isinstance(delta, dict) else dict.fromkeys(spec.budgets, delta)
    if unknown := sorted(set(deltas) - set(spec.groups)):
        raise ValueError(f"budget_step: unknown groups {unknown}")
    levels = list(genome.levels)
    for g in sorted(deltas):
        sign = 1 if deltas[g] > 0 else -1
        units = spec.units_of(g)
        for _ in range(abs(deltas[g])):
            if sign > 0:
                movable = [u for u in units if levels[u] < spec.max_levels[u]]
            else:
                movable = [u for u in units if levels[u] > 0]
            if guide is not None:
                toward = [u for u in movable if sign * (guide.levels[u] - levels[u]) > 0]
                movable = toward or movable
            if not movable:
                raise ValueError(f"group {g} has no unit whose level can move by {sign}")
            levels[movable[int(rng.integers(len(movable)))]] += sign
    return Genome(tuple(levels))


def anchored_step(
    genome: Genome,
    spec: LevelSpec,
    rng: np.random.Generator,
    source: Genome,
    target: Genome,
    guide: Genome | None = None,
) -> Genome:
    """Move ``genome`` from the budget of the reference genome ``source`` to that of
    ``target`` by keeping its offset from the reference: ``genome - source + target``, each
    level clipped to its unit's range. Clipping can leave a group off ``target``'s budget;
    :func:`budget_step` (with ``guide``) then makes it exact.

    With each sparsity's uniform allocation as the reference, a good allocation at 60 %
    (which layers are pruned more or less than uniform) becomes the same pattern at 65 %.
    """
    levels = tuple(
        min(max(v - a + b, 0), top)
        for v, a, b, top in zip(genome.levels, source.levels, target.levels, spec.max_levels)
    )
    deltas = {}
    for g in sorted(spec.budgets):
        if gap := spec.group_total(target.levels, g) - spec.group_total(levels, g):
            deltas[g] = gap
    if not deltas:
        return Genome(levels)
    return budget_step(Genome(levels), spec, rng, deltas, guide)


def fill_budget(
    levels: tuple[int, ...] | list[int],
    costs,
    errors,
    spare: float,
    max_levels: tuple[int, ...] | list[int],
    *,
    max_raises: int | None = None,
) -> tuple[list[int], float]:
    """Spend ``spare`` budget on upgrades, best first: while some unit's next level costs no
    more than what is left and lowers its error, raise the unit with the largest error drop
    per unit of cost (ties: the lowest index). Pure and deterministic.

    This repairs a genome whose costs differ per unit (e.g. bits of layers of different
    sizes), so mutations that free budget do not leave it unspent.

    Args:
        levels: each unit's level.
        costs: ``costs[u][k]``, the cost of unit ``u`` at level ``k`` (increasing in ``k``).
        errors: ``errors[u][k]``, the error of unit ``u`` at level ``k``.
        spare: the budget left to spend.
        max_levels: each unit's highest level.
        max_raises: at most this many levels are added in all (``None``: no bound).

    Returns:
        The new levels and the budget still unspent.
    """
    levels = list(levels)
    for _ in range(len(levels) * 64 if max_raises is None else max_raises):
        best: tuple[float, int] | None = None
        for u, v in enumerate(levels):
            if v >= max_levels[u]:
                continue
            price = costs[u][v + 1] - costs[u][v]
            gain = errors[u][v] - errors[u][v + 1]
            if price > spare or gain <= 0:
                continue
            ratio = gain / price if price > 0 else float("inf")
            if best is None or ratio > best[0]:
                best = (ratio, u)
        if best is None:
            return levels, spare
        u = best[1]
        spare -= costs[u][levels[u] + 1] - costs[u][levels[u]]
        levels[u] += 1
    return levels, spare


def steepest_exchange(
    errors,
    spec: LevelSpec,
    levels: list[int],
    *,
    allowed=None,
    on_move=None,
) -> int:
    """Lower ``sum_i errors[i][levels[i]]`` by level switches within each group (one unit
    down a level, another of its group up one), always making the best one, until none
    lowers the sum; exact when each unit's errors are convex in its level, a local optimum
    otherwise. ``levels`` is changed in place; returns the number of switches.

    ``allowed(levels, i, j)`` may refuse the switch of ``i`` down and ``j`` up (a budget the
    group structure does not hold by itself); ``on_move(levels, i, j)`` is told each switch
    before it is made, e.g. to keep that budget's running total.
    """
    moves = 0
    while (best := _best_exchange(errors, spec, levels, allowed)) is not None:
        i, j = best
        if on_move is not None:
            on_move(levels, i, j)
        levels[i] -= 1
        levels[j] += 1
        moves += 1
    return moves


def _best_exchange(errors, spec: LevelSpec, levels: list[int], allowed):
    """``(down, up)`` units of the switch that lowers the summed error most, or ``None``."""
    best: tuple[float, int, int] | None = None
    for g in sorted(spec.budgets):
        units = spec.units_of(g)
        down = sorted(
            (errors[u][levels[u] - 1] - errors[u][levels[u]], u) for u in units if levels[u]
        )
        up = sorted(
            (errors[u][levels[u] + 1] - errors[u][levels[u]], u)
            for u in units
            if levels[u] < spec.max_levels[u]
        )
        for d, i in down:
            if not up or d + up[0][0] >= (best[0] if best else -1e-12):
                break  # no later (costlier) decrease can do better
            for c, j in up:
                if d + c >= (best[0] if best else -1e-12):
                    break
                if i != j and (allowed is None or allowed(levels, i, j)):
                    best = (d + c, i, j)
                    break
    return None if best is None else best[1:]
