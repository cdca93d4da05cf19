"""The one loop that runs a search: ask the strategy, evaluate on shared batches, tell.

Strategies, spaces and fitnesses meet only here. Evaluations are memoised on
``(genome, batch)``, so a genome is never evaluated twice on the same tokens, and logged as they
finish, so a killed run resumes without repeating any finished evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from evosearch.data import TokenData
from evosearch.evaluation import Batch, Candidate, Fitness, is_additive
from evosearch.forward import DenseCache, compute_dtype, model_device, resolve_dtype
from evosearch.genome import Genome
from evosearch.run import RunDir
from evosearch.runners import InProcessRunner, Outcome, Runner
from evosearch.surgery import apply_replacements

__all__ = ["Evaluator", "SearchResult", "search", "sample_batch"]


def sample_batch(data: TokenData, tokens: int, *, seed: int, generation: int, stage: int) -> Batch:
    """The shared batch of one selection stage: ``ceil(tokens / seq_len)`` distinct sequences
    (all of them when that is more than there are), drawn from ``(seed, generation, stage)``
    alone, so it is the same for every candidate of the stage, on resume, and on any worker."""
    n = min(math.ceil(tokens / data.seq_len), data.n_sequences)
    if n == data.n_sequences:
        idx = list(range(n))
    else:
        rng = np.random.default_rng([seed, generation, stage])
        idx = sorted(rng.choice(data.n_sequences, size=n, replace=False).tolist())
    return Batch(tuple(idx), data.input_ids[idx])


@dataclass
class Evaluator:
    """Materialises candidates on the resident model and scores them, memoised.

    Args:
        model: the dense model; candidates are built by module replacement and undone.
        space: the search space.
        fitness: the fitness (lower is better after ``sign``).
        dense: dense activations for prefix reuse and teacher outputs, or ``None``.
        prefix_reuse: start each forward at the genome's first changed block.
        dtype: compute dtype of the candidates (:func:`~evosearch.forward.resolve_dtype`:
            ``"auto"``, ``"float32"``, ``"bfloat16"``, a ``torch.dtype``); ``None`` takes the
            dense cache's, so that prefix reuse stays exact (float32 without a cache).
            Lower precision runs under autocast: the fitness's own arithmetic (e.g. the KL) is
            done in float32 by the fitness.
    """

    model: nn.Module
    space: object
    fitness: Fitness
    dense: DenseCache | None = None
    prefix_reuse: bool = True
    cache: dict[tuple[str, str], float] = field(default_factory=dict)
    evaluations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    dtype: str | torch.dtype | None = field(default=None, kw_only=True)

    @property
    def sign(self) -> float:
        return -1.0 if getattr(self.fitness, "direction", "minimize") == "maximize" else 1.0

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype candidates are computed in (``dtype`` resolved for the model's device)."""
        if self.dtype is None and self.dense is not None:
            return self.dense.dtype
        return resolve_dtype(self.dtype or "float32", model_device(self.model))

    @property
    def additive(self) -> bool:
        """Whether the fitness is additive, so a runner may shard a candidate's batch."""
        return is_additive(self.fitness)

    @property
    def shard_rows(self) -> int:
        """Rows a shard of a batch is a multiple of: the fitness's micro batch, so a sharded
        evaluation computes exactly the micro batches an in-process one does."""
        return int(getattr(self.fitness, "micro_batch", 1))

    def _call(self, genome: Genome, batch: Batch, method: Callable):
        start = self.space.start_block(genome) if self.prefix_reuse else 0
        context = compute_dtype(model_device(self.model), self.compute_dtype)
        with apply_replacements(self.model, self.space.replacements(self.model, genome)), context:
            return method(Candidate(self.model, genome, start, self.dense), batch)

    def raw(self, genome: Genome, batch: Batch) -> float:
        """The fitness of ``genome`` on ``batch`` in its own direction, without memoisation."""
        return float(self._call(genome, batch, self.fitness))

    def outcome(self, genome: Genome, batch: Batch) -> Outcome:
        """Evaluate ``genome`` on ``batch`` without touching the cache or the counters; a
        ``RuntimeError``, ``ValueError``, CUDA out-of-memory or non-finite value becomes a
        failed :class:`~evosearch.runners.Outcome`. This is what a runner's worker calls."""
        return self._guarded(lambda: (self.raw(genome, batch), None, None))

    def partial_outcome(self, genome: Genome, batch: Batch) -> Outcome:
        """Like :meth:`outcome` for one shard of a batch of an additive fitness: the outcome
        carries the fitness's ``(total, count)``, which :meth:`combine` adds up."""

        def run() -> tuple[float, float, float]:
            total, count = self._call(genome, batch, self.fitness.partial)
            return self.fitness.reduce(total, count), float(total), float(count)

        return self._guarded(run)

    def combine(self, parts: list[Outcome]) -> Outcome:
        """One outcome from the :meth:`partial_outcome` of every shard of a batch: the fitness
        reduced from the summed parts (failed if any part failed); seconds add up."""
        seconds = sum(p.seconds for p in parts)
        error = next((p.error for p in parts if p.error is not None), None)
        if error is not None:
            return Outcome(math.nan, error, seconds)
        total, count = sum(p.total for p in parts), sum(p.count for p in parts)
        value = float(self.fitness.reduce(total, count))
        if not math.isfinite(value):
            return Outcome(math.nan, f"non-finite fitness {value}", seconds)
        return Outcome(value, None, seconds)

    def _guarded(self, run: Callable[[], tuple]) -> Outcome:
        t0 = time.perf_counter()
        total = count = None
        error = None
        try:
            value, total, count = run()
            if not math.isfinite(value):
                error = f"non-finite fitness {value}"
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as exc:
            value, error = math.nan, f"{type(exc).__name__}: {exc}"
        return Outcome(value, error, time.perf_counter() - t0, total, count)

    def record(self, genome: Genome, batch: Batch, outcome: Outcome) -> tuple[float, dict]:
        """Memoise ``outcome`` and count it; returns ``(value to minimise, log record)``."""
        error = outcome.error
        minimised = self.sign * outcome.value if error is None else math.inf
        self.cache[(genome.key(), batch.key())] = minimised
        self.evaluations += 1
        self.tokens += batch.n_tokens
        self.seconds += outcome.seconds
        record = {
            "genome": genome.key(),
            "batch": batch.key(),
            "tokens": batch.n_tokens,
            "value": outcome.value if error is None else None,
            "seconds": round(outcome.seconds, 4),
        }
        if error:
            record["error"] = error
        return minimised, record

    def __call__(self, genome: Genome, batch: Batch) -> tuple[float, dict | None]:
        """``(value, record)``: the value to minimise and a log record (``None`` if cached)."""
        key = (genome.key(), batch.key())
        if key in self.cache:
            return self.cache[key], None
        return self.record(genome, batch, self.outcome(genome, batch))


@dataclass
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        best: best genome found; best_value: its fitness (own direction) at the last stage.
        history: per-generation best; evaluations: every logged evaluation.
    """

    best: Genome
    best_value: float
    history: list[dict]
    evaluations: list[dict]
    n_evaluations: int
    tokens: int
    seconds: float


def search(
    strategy,
    evaluator: Evaluator,
    data: TokenData,
    *,
    seed: int = 0,
    run: RunDir | None = None,
    resume: bool = False,
    progress: Callable[[str], None] | None = print,
    runner: Runner | None = None,
) -> SearchResult:
    """Run ``strategy`` to completion, evaluating its requests with ``evaluator`` on ``data``.

    ``runner`` decides where the genomes of a request are evaluated (default: in this process
    on ``evaluator``'s model; :class:`~evosearch.runners.RayRunner` for a Ray cluster). The
    engine keeps the memo, the log and the order: values reach the strategy, and records the
    log, in request order, so the trajectory does not depend on the runner.

    With ``run``, every evaluation is appended to ``run/evaluations.jsonl`` and the strategy
    state is checkpointed atomically after each generation; with ``resume`` both are loaded
    first, so nothing that finished is evaluated again and the trajectory is unchanged.
    """
    log: list[dict] = []
    if run is not None and resume:
        log = run.evaluations()
        for rec in log:
            value = math.inf if rec.get("value") is None else evaluator.sign * rec["value"]
            evaluator.cache[(rec["genome"], rec["batch"])] = value
        state = run.checkpoint()
        if state is not None:
            strategy.load_state_dict(state["strategy"])
            if progress:
                progress(
                    f"resuming at generation {strategy.generation} with {len(log)} logged "
                    "evaluations"
                )
    runner = runner if runner is not None else InProcessRunner()
    t_start = time.perf_counter()
    evals_at_gen, t_gen = evaluator.evaluations, time.perf_counter()
    name = getattr(evaluator.fitness, "name", "fitness")
    while (request := strategy.ask()) is not None:
        batch = sample_batch(
            data, request.tokens, seed=seed, generation=request.generation, stage=request.stage
        )
        todo: dict[str, Genome] = {}  # not yet memoised, distinct, in request order
        for genome in request.genomes:
            if (genome.key(), batch.key()) not in evaluator.cache:
                todo.setdefault(genome.key(), genome)
        pending = list(todo.values())
        n_done = 0
        for genome, outcome in zip(pending, runner.evaluate(evaluator, pending, batch)):
            n_done += 1
            _, record = evaluator.record(genome, batch, outcome)
            record.update(generation=request.generation, stage=request.stage)
            log.append(record)
            if run is not None:
                run.append_evaluation(record)
        if n_done != len(pending):
            raise RuntimeError(f"the runner returned {n_done} outcomes for {len(pending)} genomes")
        values = [evaluator.cache[(g.key(), batch.key())] for g in request.genomes]
        if all(math.isinf(v) for v in values):
            errors = [r.get("error") for r in log if r.get("error")]
            raise RuntimeError(
                f"every candidate of generation {request.generation} stage {request.stage} "
                f"failed; first error: {errors[0] if errors else 'unknown'}"
            )
        strategy.tell(request, values)
        if strategy.generation != request.generation:  # a generation just finished
            if run is not None:
                run.write_checkpoint({"strategy": strategy.state_dict()})
            if progress:
                now = time.perf_counter()
                done = evaluator.evaluations - evals_at_gen
                rate = done / max(now - t_gen, 1e-9)
                _, best_value = strategy.best
                note = getattr(strategy, "progress_note", None)
                progress(
                    f"gen {request.generation:3d}/{strategy.config.generations}  "
                    f"best {name} {evaluator.sign * best_value:.4f} "
                    f"@{request.tokens} tok  evals {evaluator.evaluations} (+{done}, "
                    f"{rate:.2f}/s)  tokens {evaluator.tokens / 1e6:.2f}M  "
                    f"{now - t_start:.0f}s" + (f"  {note(evaluator.sign)}" if note else "")
                )
                evals_at_gen, t_gen = evaluator.evaluations, now
    best, best_value = strategy.best
    return SearchResult(
        best=best,
        best_value=evaluator.sign * best_value,
        history=[{**h, "value": evaluator.sign * h["value"]} for h in strategy.history],
        evaluations=log,
        n_evaluations=evaluator.evaluations,
        tokens=evaluator.tokens,
        seconds=time.perf_counter() - t_start,
    )
