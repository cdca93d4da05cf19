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

from evosearch.arch import get_blocks
from evosearch.data import TokenData
from evosearch.errors import CandidateError, UserError
from evosearch.estimate import Estimate, flip_rate, pooled
from evosearch.evaluation import (
    Batch,
    Candidate,
    Fitness,
    Reference,
    is_additive,
)
from evosearch.forward import (
    BlockStates,
    DenseCache,
    compute_dtype,
    model_device,
    resolve_dtype,
)
from evosearch.genome import Genome
from evosearch.rundir import RunDir
from evosearch.runners import InProcessRunner, Outcome, Runner
from evosearch.strategy import Strategy
from evosearch.surgery import apply_replacements
from evosearch.validate import fitness_value

__all__ = [
    "Evaluator",
    "SearchResult",
    "elite_estimate",
    "failure_kind",
    "sample_batch",
    "search",
    "selection_note",
    "selection_stats",
]


def failure_kind(record: dict) -> str:
    """``candidate`` when a failed evaluation is the genome's own fault (a non-finite fitness:
    final, replayed on resume), else ``environment`` (out of memory, an unreadable file:
    evaluated again on resume)."""
    if "failure" in record:
        return record["failure"]
    own = ("non-finite", "invalid candidate", "MetricError")  # MetricError: earlier logs
    return "candidate" if str(record.get("error", "")).startswith(own) else "environment"


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
    return Batch(tuple(idx), data.input_ids[idx], stage=stage)


@dataclass
class Evaluator:
    """Materialises candidates on the resident model and scores them, memoised.

    Args:
        model: the dense model; candidates are built by module replacement and undone.
        space: the search space.
        fitness: the fitness (lower is better after ``sign``).
        dense: dense activations for prefix reuse and teacher outputs, or ``None``.
        prefix_reuse: start each forward at the genome's first changed block.
        parent_reuse: keep the hidden states of the request's parents (:meth:`reuse_parents`)
            on the current batch, and start each other genome at the first block where it
            differs from one of them (when the space has ``first_difference``); exact. Holds
            at most ``parent_bytes`` (``(L + 1) x d x 4`` bytes per token per parent).
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
    sequences: dict[tuple[str, str], tuple] = field(default_factory=dict)
    evaluations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    dtype: str | torch.dtype | None = field(default=None, kw_only=True)
    parent_reuse: bool = field(default=True, kw_only=True)
    parent_bytes: int = field(default=4 << 30, kw_only=True)
    _parents: tuple = field(default=(), init=False, repr=False)
    _states: dict = field(default_factory=dict, init=False, repr=False)  # key -> (genome, states)
    _states_batch: str | None = field(default=None, init=False, repr=False)

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

    def reuse_parents(self, parents, batch: Batch) -> None:
        """Called before the genomes of a request are evaluated on ``batch``: keep the hidden
        states of ``parents`` as they are evaluated (states kept for an earlier batch are
        dropped), so the other genomes start where they first differ from one of them."""
        if batch.key() != self._states_batch:
            self._states, self._states_batch = {}, batch.key()
        self._parents = tuple(parents) if self.parent_reuse else ()

    def _reference(self, genome: Genome, batch: Batch) -> Reference | None:
        """The kept parent ``genome`` shares the most leading blocks with, on ``batch``."""
        difference = getattr(self.space, "first_difference", None)
        if difference is None or batch.key() != self._states_batch:
            return None
        best = None
        for parent, states in self._states.values():
            block = difference(genome, parent)
            if best is None or block > best.block:
                best = Reference(block, states)
        return best

    def _keeper(self, genome: Genome, batch: Batch) -> BlockStates | None:
        """Fresh states to fill when ``genome`` is a parent and the budget has room."""
        if genome not in self._parents or batch.key() != self._states_batch:
            return None
        config = getattr(self.model, "config", None)
        width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
        need = (len(get_blocks(self.model)) + 1) * batch.n_tokens * width * 4
        held = sum(states.nbytes for _, states in self._states.values())
        return BlockStates() if held + need <= self.parent_bytes else None

    def _call(self, genome: Genome, batch: Batch, method: Callable) -> tuple:
        """``(method(candidate, batch), per-sequence sums)`` on the materialised candidate; the
        sums are those the fitness appended to ``candidate.sequences``, ``None`` unless it
        gave one per sequence of ``batch``."""
        start = self.space.start_block(genome) if self.prefix_reuse else 0
        context = compute_dtype(model_device(self.model), self.compute_dtype)
        reference, keep = self._reference(genome, batch), self._keeper(genome, batch)
        candidate = Candidate(self.model, genome, start, self.dense, reference, keep, [])
        with apply_replacements(self.model, self.space.replacements(self.model, genome)), context:
            value = method(candidate, batch)
        if keep is not None and keep.covers(batch.indices):
            self._states[genome.key()] = (genome, keep)
        parts = tuple(candidate.sequences)
        return value, parts if len(parts) == len(batch.indices) else None

    def raw(self, genome: Genome, batch: Batch) -> float:
        """The fitness of ``genome`` on ``batch`` in its own direction, without memoisation."""
        return self._scored(genome, batch)[0]

    def _scored(self, genome: Genome, batch: Batch) -> tuple[float, tuple | None]:
        """``(fitness, per-sequence sums or None)`` of ``genome`` on ``batch``; the sums are
        kept only when they reduce to the fitness's value (a subclass may change it)."""
        name = getattr(self.fitness, "name", type(self.fitness).__name__)
        try:
            value, parts = self._call(genome, batch, self.fitness)
        except KeyError as exc:  # e.g. a fitness reading a field the batch lacks
            raise UserError(
                "the fitness failed", f"fitness {name}", f"{type(exc).__name__}: {exc}"
            ) from exc
        value = fitness_value(value, name)
        if parts is not None and not (
            is_additive(self.fitness)
            and math.isclose(self.fitness.reduce(*_sums(parts)), value, rel_tol=1e-9)
        ):
            parts = None
        return value, parts

    def outcome(self, genome: Genome, batch: Batch) -> Outcome:
        """Evaluate ``genome`` on ``batch`` without touching the cache or the counters; a
        ``RuntimeError``, ``ValueError``, CUDA out-of-memory or non-finite value becomes a
        failed :class:`~evosearch.runners.Outcome`. This is what a runner's worker calls."""

        def run() -> tuple:
            value, parts = self._scored(genome, batch)
            return value, None, None, parts

        return self._guarded(run)

    def partial_outcome(self, genome: Genome, batch: Batch) -> Outcome:
        """Like :meth:`outcome` for one shard of a batch of an additive fitness: the outcome
        carries the fitness's ``(total, count)``, which :meth:`combine` adds up."""

        def run() -> tuple:
            (total, count), parts = self._call(genome, batch, self.fitness.partial)
            return self.fitness.reduce(total, count), float(total), float(count), parts

        return self._guarded(run)

    def combine(self, parts: list[Outcome]) -> Outcome:
        """One outcome from the :meth:`partial_outcome` of every shard of a batch: the fitness
        reduced from the summed parts (failed if any part failed); seconds add up."""
        seconds = sum(p.seconds for p in parts)
        error = next((p.error for p in parts if p.error is not None), None)
        if error is not None:
            return Outcome(math.nan, error, seconds)
        sequences = None
        if all(p.sequences is not None for p in parts):
            sequences = tuple(s for p in parts for s in p.sequences)
            total, count = _sums(sequences)  # exactly rounded: as in process
        else:
            total, count = sum(p.total for p in parts), sum(p.count for p in parts)
        value = float(self.fitness.reduce(total, count))
        if not math.isfinite(value):
            return Outcome(math.nan, f"non-finite fitness {value}", seconds)
        return Outcome(value, None, seconds, sequences=sequences)

    def _guarded(self, run: Callable[[], tuple]) -> Outcome:
        t0 = time.perf_counter()
        total = count = sequences = None
        error = None
        try:
            value, total, count, sequences = run()
            if not math.isfinite(value):
                error = f"non-finite fitness {value}"
        except UserError:
            raise
        except CandidateError as exc:
            value, error = math.nan, f"invalid candidate: {type(exc).__name__}: {exc}"
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as exc:
            value, error = math.nan, f"{type(exc).__name__}: {exc}"
        return Outcome(value, error, time.perf_counter() - t0, total, count, sequences)

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
            record["failure"] = failure_kind(record)
        elif outcome.sequences is not None:
            self.sequences[(genome.key(), batch.key())] = outcome.sequences
            record["sequences"] = [list(p) for p in outcome.sequences]
        return minimised, record

    def __call__(self, genome: Genome, batch: Batch) -> tuple[float, dict | None]:
        """``(value, record)``: the value to minimise and a log record (``None`` if cached)."""
        key = (genome.key(), batch.key())
        if key in self.cache:
            return self.cache[key], None
        return self.record(genome, batch, self.outcome(genome, batch))


def _sums(parts) -> tuple[float, float]:
    """``(total, count)`` of per-sequence sums, exactly rounded (the same for any split)."""
    return math.fsum(t for t, _ in parts), math.fsum(c for _, c in parts)


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
    strategy: Strategy,
    evaluator: Evaluator,
    data: TokenData,
    *,
    seed: int = 0,
    run: RunDir | None = None,
    resume: bool = False,
    progress: Callable[[str], None] | None = print,
    runner: Runner | None = None,
    max_seconds: float | None = None,
) -> SearchResult:
    """Run ``strategy`` (any :class:`~evosearch.strategy.Strategy`) to completion, evaluating
    its requests with ``evaluator`` on ``data``.

    ``runner`` decides where the genomes of a request are evaluated (default: in this process
    on ``evaluator``'s model; :class:`~evosearch.runners.RayRunner` for a Ray cluster). The
    engine keeps the memo, the log and the order: values reach the strategy, and records the
    log, in request order, so the trajectory does not depend on the runner.

    With ``run``, every evaluation is appended to ``run/evaluations.jsonl`` and the strategy
    state is checkpointed atomically after each generation; with ``resume`` both are loaded
    first, so nothing that finished is evaluated again and the trajectory is unchanged.

    With ``max_seconds``, the search ends within that wall time (a resumed run counts the
    seconds of its earlier sessions): after each generation, when the next one and the
    strategy's ``finishing_tokens()`` (e.g. EvoPress's polish) would not fit at the seconds per
    token measured so far and padded by 10 %, the strategy's ``finish()`` ends its evolution
    (a strategy without one simply stops there). The time is a prediction: a run whose last
    generations slow down by more than the padding can still overshoot, and its trajectory
    depends on the machine's speed.
    """
    log, stats, clock = [], {}, _Deadline(max_seconds, evaluator.tokens)
    if run is not None and resume:
        log, stats, clock.spent, clock.stopped = _resume(strategy, evaluator, run, progress)
    runner = runner if runner is not None else InProcessRunner()
    t_start = time.perf_counter()
    report = _Progress(strategy, evaluator, progress, max_seconds)
    while not clock.stopped and (request := strategy.ask()) is not None:
        batch = sample_batch(
            data, request.tokens, seed=seed, generation=request.generation, stage=request.stage
        )
        values = _evaluate(request, batch, evaluator, runner, run, log, progress)
        strategy.tell(request, values)
        if strategy.generation != request.generation:  # a generation just finished
            stats[request.generation] = selection_stats(
                strategy, evaluator, request, batch, data.seq_len, seed=seed
            )
            report(request, stats[request.generation])
            clock.after_generation(strategy, evaluator, progress)
            if run is not None:
                state = {"strategy": strategy.state_dict(), "selection": _by_str(stats)}
                run.write_checkpoint({**state, **clock.state()})
    best, best_value = strategy.best
    history = [
        {**h, "value": evaluator.sign * h["value"], **stats.get(h["generation"], {})}
        for h in strategy.history
    ]
    return SearchResult(
        best=best,
        best_value=evaluator.sign * best_value,
        history=history,
        evaluations=log,
        n_evaluations=evaluator.evaluations,
        tokens=evaluator.tokens,
        seconds=time.perf_counter() - t_start,
    )


def selection_stats(
    strategy: Strategy,
    evaluator: Evaluator,
    request,
    batch: Batch,
    seq_len: int,
    *,
    seed: int = 0,
    resamples: int = 200,
) -> dict:
    """What the progress line and the history report about a finished generation's selection
    (:mod:`evosearch.estimate`): the elite's fitness pooled over every sequence it has been
    scored on (``elite_value``, ``elite_se``, ``elite_tokens``) and, when the fitness gives
    per-sequence sums, the share of resamples of the last stage's sequences on which another
    of its candidates would rank first (``flip_rate``). ``request`` and ``batch``: the
    generation's last stage."""
    out: dict = {}
    best = strategy.best
    if best is not None and (est := elite_estimate(evaluator, best[0], seq_len)) is not None:
        out.update(elite_value=est.value, elite_se=est.se, elite_tokens=est.tokens)
    distinct = dict.fromkeys(g.key() for g in request.genomes)
    parts = [evaluator.sequences.get((g, batch.key())) for g in distinct]
    if evaluator.additive and (parts := [p for p in parts if p is not None]):
        rng = np.random.default_rng([seed, request.generation, 24])
        reduce = evaluator.fitness.reduce
        rate = flip_rate(parts, rng, reduce=reduce, sign=evaluator.sign, resamples=resamples)
        if rate is not None:
            out["flip_rate"] = rate
    return out


def elite_estimate(evaluator: Evaluator, genome, seq_len: int) -> Estimate | None:
    """``genome``'s fitness pooled over the distinct sequences of every batch it has been
    scored on (per-sequence sums; without them, each batch's value weighted by its tokens)."""
    key = genome.key()
    scored = [b for (g, b), v in evaluator.cache.items() if g == key and math.isfinite(v)]
    if not scored:
        return None
    if evaluator.additive and all((key, b) in evaluator.sequences for b in scored):
        rows: dict[str, tuple[float, float]] = {}
        for b in scored:
            for row, part in zip(b.split(","), evaluator.sequences[(key, b)]):
                rows.setdefault(row, part)
        return pooled(list(rows.values()), evaluator.fitness.reduce)
    batches = []  # e.g. a worker's fitness that gives no per-sequence sums
    for b in scored:
        tokens = len(b.split(",")) * seq_len
        batches.append((evaluator.sign * evaluator.cache[(key, b)] * tokens, tokens))
    return pooled(batches)


class _Deadline:
    """The wall-clock budget of :func:`search` (none when ``seconds`` is ``None``).

    The seconds still needed (the next generation and the finishing tokens) are predicted
    from what was measured, then padded by ``margin``, so a generation up to that much slower
    than the last one does not overshoot the budget."""

    margin = 0.1

    def __init__(self, seconds: float | None, tokens: int) -> None:
        self.seconds, self.spent, self.stopped = seconds, 0.0, False
        self.t0 = self.t_gen = time.perf_counter()
        self.tokens = self.tokens_gen = tokens  # the evaluator's count at the start

    def elapsed(self) -> float:
        """Seconds of this search so far, earlier sessions of a resumed run included."""
        return self.spent + time.perf_counter() - self.t0

    def state(self) -> dict:
        return {"seconds": self.elapsed(), "stopped": self.stopped}

    def after_generation(self, strategy: Strategy, evaluator: Evaluator, progress) -> None:
        """Finish ``strategy`` (or stop) when its next generation and its finishing tokens,
        padded by ``margin``, would not fit in the budget at the slower of this session's and
        the last generation's seconds per token."""
        now, tokens = time.perf_counter(), evaluator.tokens
        gen_seconds, gen_tokens = now - self.t_gen, tokens - self.tokens_gen
        self.t_gen, self.tokens_gen = now, tokens
        if self.seconds is None or strategy.done:
            return
        rates = [gen_seconds / max(gen_tokens, 1), (now - self.t0) / max(tokens - self.tokens, 1)]
        finishing = getattr(strategy, "finishing_tokens", lambda: 0)() * max(rates)
        if self.elapsed() + (gen_seconds + finishing) * (1 + self.margin) <= self.seconds:
            return
        if hasattr(strategy, "finish"):
            strategy.finish()
        else:
            self.stopped = True
        if progress:
            what = "stopping" if self.stopped or strategy.done else "finishing"
            progress(
                f"time budget: {what} at {self.elapsed():.0f}s of {self.seconds:.0f}s "
                f"(a generation takes about {gen_seconds:.0f}s)"
            )


def _by_str(stats: dict[int, dict]) -> dict[str, dict]:
    return {str(g): v for g, v in stats.items()}


def _resume(
    strategy: Strategy, evaluator: Evaluator, run: RunDir, progress
) -> tuple[list[dict], dict[int, dict], float, bool]:
    """Load a run's evaluation log into the memo (environment failures are evaluated again)
    and the strategy's checkpoint; returns the log, the selection stats per generation, the
    seconds the search has run and whether its time budget stopped it."""
    log = run.evaluations()
    for rec in log:
        if rec.get("error") and failure_kind(rec) == "environment":
            evaluator.cache.pop((rec["genome"], rec["batch"]), None)
            continue  # an out-of-memory or unreadable file: evaluate it again
        value = math.inf if rec.get("value") is None else evaluator.sign * rec["value"]
        evaluator.cache[(rec["genome"], rec["batch"])] = value
        if rec.get("sequences") is not None:
            parts = tuple(tuple(p) for p in rec["sequences"])
            evaluator.sequences[(rec["genome"], rec["batch"])] = parts
    state = run.checkpoint()
    if state is not None:
        try:
            strategy.load_state_dict(state["strategy"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UserError(
                "cannot resume from the checkpoint",
                run.file("checkpoint.json"),
                f"it does not fit this strategy ({type(exc).__name__}: {exc}); rerun "
                "with --overwrite to start over",
            ) from None
        if progress:
            progress(
                f"resuming at generation {strategy.generation} with {len(log)} logged evaluations"
            )
    state = state or {}
    stats = {int(g): v for g, v in state.get("selection", {}).items()}
    return log, stats, float(state.get("seconds", 0.0)), bool(state.get("stopped", False))


def _evaluate(request, batch: Batch, evaluator: Evaluator, runner, run, log, progress) -> list:
    """Evaluate the request's genomes not yet memoised on ``batch`` (each once, in request
    order), log them, and return every genome's value to minimise."""
    todo: dict[str, Genome] = {}  # not yet memoised, distinct, in request order
    for genome in request.genomes:
        if (genome.key(), batch.key()) not in evaluator.cache:
            todo.setdefault(genome.key(), genome)
    pending = list(todo.values())
    evaluator.reuse_parents(getattr(request, "parents", ()), batch)
    n_done = 0
    for genome, outcome in zip(pending, runner.evaluate(evaluator, pending, batch)):
        n_done += 1
        _, record = evaluator.record(genome, batch, outcome)
        record.update(generation=request.generation, stage=request.stage)
        if record.get("error") and progress:
            progress(f"evaluation failed ({record['failure']}): {record['error']}")
        log.append(record)
        if run is not None:
            run.append_evaluation(record)
    if n_done != len(pending):
        raise RuntimeError(f"the runner returned {n_done} outcomes for {len(pending)} genomes")
    values = [evaluator.cache[(g.key(), batch.key())] for g in request.genomes]
    if all(math.isinf(v) for v in values):
        errors = [r.get("error") for r in log if r.get("error")]
        raise UserError(
            "the search stopped",
            f"generation {request.generation} stage {request.stage}",
            f"every candidate failed; first error: {errors[0] if errors else 'unknown'}; "
            "fix the cause and rerun with --resume (such failures are retried)",
        )
    return values


class _Progress:
    """The progress line printed after each generation (nothing without ``progress``)."""

    def __init__(self, strategy: Strategy, evaluator: Evaluator, progress, max_seconds=None):
        self.strategy, self.evaluator, self.progress = strategy, evaluator, progress
        self.of_seconds = "" if max_seconds is None else f" of {max_seconds:.0f}s"
        self.t_start = self.t_gen = time.perf_counter()
        self.evals_at_gen = evaluator.evaluations
        self.name = getattr(evaluator.fitness, "name", "fitness")

    def __call__(self, request, stats: dict | None = None) -> None:
        if not self.progress:
            return
        ev, strategy = self.evaluator, self.strategy
        now = time.perf_counter()
        done = ev.evaluations - self.evals_at_gen
        rate = done / max(now - self.t_gen, 1e-9)
        _, best_value = strategy.best
        note = getattr(strategy, "progress_note", None)
        total = getattr(getattr(strategy, "config", None), "generations", "?")
        self.progress(
            f"gen {request.generation:3d}/{total}  best {self.name} {ev.sign * best_value:.4f} "
            f"@{request.tokens} tok{selection_note(stats or {})}  evals {ev.evaluations} "
            f"(+{done}, {rate:.2f}/s)  tokens {ev.tokens / 1e6:.2f}M  {now - self.t_start:.0f}s"
            + self.of_seconds
            + (f"  {note(ev.sign)}" if note else "")
        )
        self.evals_at_gen, self.t_gen = ev.evaluations, now


def selection_note(stats: dict) -> str:
    """The progress line's part from :func:`selection_stats`, e.g.
    ``"  elite 0.7301 ± 0.0123 (6144 tok)  flip 12%"`` (empty without stats)."""
    out = ""
    if "elite_value" in stats:
        se = stats.get("elite_se")
        spread = "" if se is None else f" ± {se:.4f}"
        out += f"  elite {stats['elite_value']:.4f}{spread} ({stats['elite_tokens']:.0f} tok)"
    if "flip_rate" in stats:
        out += f"  flip {100 * stats['flip_rate']:.0f}%"
    return out
