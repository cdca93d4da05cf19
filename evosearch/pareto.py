"""Pareto fronts and hypervolume for minimised objectives."""

from __future__ import annotations

import numpy as np

__all__ = ["pareto_front", "hypervolume"]


def pareto_front(points) -> list[int]:
    """Indices of the non-dominated rows of ``points`` ``(n, m)`` (all objectives minimised).

    A row is dominated when another row is no worse in every objective and better in one;
    duplicate rows are kept once (the first).
    """
    p = np.asarray(points, dtype=float)
    keep: list[int] = []
    for i in range(len(p)):
        if not np.all(np.isfinite(p[i])):
            continue
        dominated = np.any(np.all(p <= p[i], axis=1) & np.any(p < p[i], axis=1))
        duplicate = any(np.array_equal(p[i], p[j]) for j in keep)
        if not dominated and not duplicate:
            keep.append(i)
    return keep


def hypervolume(points, reference) -> float:
    """Volume dominated by ``points`` ``(n, m)`` and bounded by ``reference`` ``(m,)``
    (all objectives minimised; points not strictly better than the reference in every
    objective contribute nothing). Exact, by slicing along the first objective."""
    ref = np.asarray(reference, dtype=float)
    p = np.asarray(points, dtype=float).reshape(-1, len(ref))
    p = p[np.all(p < ref, axis=1)]
    if len(p) == 0:
        return 0.0
    if len(ref) == 1:
        return float(ref[0] - p[:, 0].min())
    p = p[pareto_front(p)]
    order = np.argsort(p[:, 0])
    p = p[order]
    volume = 0.0
    for i in range(len(p)):
        upper = p[i + 1, 0] if i + 1 < len(p) else ref[0]
        width = upper - p[i, 0]
        if width > 0:
            volume += width * hypervolume(p[: i + 1, 1:], ref[1:])
    return float(volume)
