"""Allocations a quantization search is compared with (or starts from): uniform and greedy.

Greedy: each layer's output error at each rung, ``tr(dW H dW^T) / tokens`` on the calibration
tokens (stored in the level database when it is built, so it costs no extra pass), is treated as
independent of the other layers, and the sum over layers is minimised by steepest exchange from
the uniform allocation: while some level switch (one layer down a rung, another of its group up
one) lowers the sum and keeps the budget, make the best one; bits left over (layers of different
sizes) are then spent by the space's repair. Unlike the search it never runs the
model; like HAWQ-style allocations it ignores how errors interact across layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from evosearch.genome import Genome
from evosearch.operators import steepest_exchange
from evosearch.registry import register_baseline

__all__ = ["BASELINES", "compute", "greedy"]

BASELINES = ("uniform", "greedy")


def greedy(
    space,
    errors: Sequence[Sequence[float]] | None = None,
    *,
    log: Callable[[str], None] | None = print,
) -> Genome:
    """The greedy allocation (see the module docstring) over ``errors[unit][level]``
    (default: the database's :meth:`~search_spaces.quantization.QuantSpace.level_errors`)."""
    errors = errors if errors is not None else space.level_errors()
    spec, cfg = space.spec, space.config_
    levels = list(space.uniform_genome().levels)
    cost = [[cfg.unit_bits(u.shape, k) for k in range(len(cfg.levels))] for u in space.units]
    errors = list(errors)
    for top in spec.max_levels[len(space.units) :]:  # a mix_sizes space's cost-free slack
        errors.append([0.0] * (top + 1))
        cost.append([0] * (top + 1))
    slack = [space.budget_bits - sum(c[v] for c, v in zip(cost, levels))]  # bits unspent

    def spent(levels: list[int], i: int, j: int) -> int:  # bits when i goes down and j up
        freed = cost[i][levels[i]] - cost[i][levels[i] - 1]
        return cost[j][levels[j] + 1] - cost[j][levels[j]] - freed

    def on_move(levels: list[int], i: int, j: int) -> None:
        slack[0] -= spent(levels, i, j)

    moves = steepest_exchange(
        errors, spec, levels, allowed=lambda lv, i, j: spent(lv, i, j) <= slack[0], on_move=on_move
    )
    genome = space.repair(Genome(tuple(levels)))  # bits the exchange left unspent
    if log:
        uniform = space.uniform_genome().levels
        log(
            f"greedy: summed layer error {sum(e[v] for e, v in zip(errors, levels)):.4g} "
            f"(uniform {sum(e[v] for e, v in zip(errors, uniform)):.4g}) after {moves} "
            f"switches, {space.metrics(genome)['bits_per_weight']:.4f} bits per weight"
        )
    return genome


def compute(name: str, space, *, log: Callable[[str], None] | None = print) -> Genome:
    """The genome of baseline ``name`` (``uniform`` or ``greedy``)."""
    if name == "uniform":
        return space.uniform_genome()
    if name == "greedy":
        return greedy(space, log=log)
    raise ValueError(f"unknown quantization baseline {name!r}; choose from {', '.join(BASELINES)}")


def _registered(name: str):
    def run(problem, settings, log=print) -> Genome:
        return compute(name, problem.space, log=log)

    return run


for _name in BASELINES:
    register_baseline("quantization", _name, _registered(_name))
