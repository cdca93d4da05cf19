"""How sure the search is: a genome's fitness pooled over every sequence it was scored on, and
how often the final racing stage's decision would flip on a resampled batch.

Racing compares candidates on one shared batch per stage, so a printed per-batch value moves
with the batch as much as with the search. An additive fitness that gives its sums per sequence
(appended to ``candidate.sequences``: a token-weighted mean such as the KL, or a perplexity)
lets the search say more:

* :func:`pooled`: the elite's estimate over the union of the sequences of every batch it was
  scored on (a sequence scored twice counts once: its value is the same), with a standard error
  over sequences;
* :func:`flip_rate`: the share of bootstrap resamples of the final stage's sequences (the same
  resample for every candidate, as racing shares its batch) on which another candidate of that
  stage would rank first. Near 0: the stage was large enough to tell the winner; near
  ``1 - 1 / candidates``: a coin toss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Estimate", "flip_rate", "pooled", "ratio"]


def ratio(total: float, count: float) -> float:
    """The token-weighted mean ``total / count`` (the KL's ``reduce``)."""
    return total / count


@dataclass(frozen=True)
class Estimate:
    """A fitness pooled over sequences.

    Attributes:
        value: ``reduce(sum of totals, sum of counts)``.
        se: its standard error (``None`` with fewer than two sequences).
        tokens: the pooled count (tokens).
        sequences: how many sequences were pooled.
    """

    value: float
    se: float | None
    tokens: float
    sequences: int


def pooled(
    parts: Sequence[tuple[float, float]], reduce: Callable[[float, float], float] = ratio
) -> Estimate:
    """The fitness of ``parts`` (per-sequence ``(total, count)``) pooled, with its standard error.

    The per-token mean ``m = sum(total) / sum(count)`` is a ratio estimator; its standard error
    is ``sqrt(n / (n - 1) * sum((total_i - m count_i)^2)) / sum(count)`` (linearisation over
    the ``n`` sequences), carried through ``reduce`` by a central difference (for the KL, whose
    ``reduce`` is the mean itself, this is the standard error of the mean).
    """
    if not parts:
        raise ValueError("pooled() needs at least one sequence")
    totals = np.array([t for t, _ in parts], dtype=np.float64)
    counts = np.array([c for _, c in parts], dtype=np.float64)
    total, count = math.fsum(totals), math.fsum(counts)
    value = float(reduce(total, count))
    n = len(parts)
    if n < 2:
        return Estimate(value, None, count, n)
    m = total / count
    se_mean = math.sqrt(n / (n - 1) * float(np.sum((totals - m * counts) ** 2))) / count
    hi, lo = reduce((m + se_mean) * count, count), reduce((m - se_mean) * count, count)
    return Estimate(value, abs(hi - lo) / 2, count, n)


def flip_rate(
    candidates: Sequence[Sequence[tuple[float, float]]],
    rng: np.random.Generator,
    *,
    reduce: Callable[[float, float], float] = ratio,
    sign: float = 1.0,
    resamples: int = 200,
) -> float | None:
    """How often the first-ranked candidate changes when the stage's sequences are resampled.

    Args:
        candidates: each candidate's per-sequence ``(total, count)`` on the same sequences,
            in request order (ties go to the earlier one, as in racing).
        rng: the only source of randomness.
        reduce: the fitness's ``reduce``; sign: ``-1`` for a maximised fitness.
        resamples: bootstrap resamples (with replacement) of the sequences.

    Returns:
        The share of resamples whose winner is not the winner on the stage's own sequences;
        ``None`` with fewer than two candidates or two sequences.
    """
    if len(candidates) < 2:
        return None
    totals = np.array([[t for t, _ in c] for c in candidates], dtype=np.float64)  # (k, n)
    counts = np.array([[c for _, c in cand] for cand in candidates], dtype=np.float64)
    n = totals.shape[1]
    if n < 2:
        return None
    score = np.vectorize(lambda t, c: sign * reduce(t, c), otypes=[np.float64])
    winner = int(np.argmin(score(totals.sum(1), counts.sum(1))))
    idx = rng.integers(0, n, size=(resamples, n))  # (B, n), shared by every candidate
    values = score(totals[:, idx].sum(-1), counts[:, idx].sum(-1))  # (k, B)
    return float(np.mean(np.argmin(values, axis=0) != winner))
