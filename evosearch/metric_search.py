"""Search a symbolic pruning metric by genetic programming (Pruner-Zero, Dong et al. 2024).

Metric search is one more space and strategy on the one search loop,
:func:`evosearch.engine.search`: the candidates are expression trees
(:class:`~evosearch.gp.MetricGenome`, keyed by their canonical form), the strategy is
:class:`~evosearch.gp.GeneticProgramming`, and :class:`MetricSpace` materialises a tree as the
model with every block linear pruned to the target by that metric (per-row ranking, or N:M
groups). The engine's :class:`~evosearch.engine.Evaluator` scores it by KL from the dense model
or perplexity on the calibration tokens; W, X and G are computed once. The engine memoises on
the canonical form, so equivalent metrics are evaluated once, and a metric with non-finite or
constant scores is a failed evaluation whose reason is kept.

:func:`run_metric_search` builds the config's model, data, space and strategy, runs the engine
(any :class:`~evosearch.runners.Runner`), then ranks, re-checks on held-out tokens and writes.

A run directory holds:

* ``config.json``: the :class:`MetricSearchConfig` (checked on resume).
* ``evaluations.jsonl`` / ``checkpoint.json``: the engine's log (one line per evaluated
  canonical metric, flushed as it finishes) and the strategy's state after each generation
  (:class:`~evosearch.run.RunDir`). A killed run resumes (``resume=True``) from them and
  evaluates nothing twice; a run directory of the earlier loop (``history.jsonl`` alone)
  resumes too.
* ``history.jsonl``: one line per proposed metric in proposal order (expression, canonical
  form, fitness or rejection reason, whether the memo answered), written when the search ends.
* ``leaderboard.json`` / ``leaderboard.md``: the best distinct metrics with their fitness and,
  with ``holdout_sequences``, their fitness on held-out calibration text.
* ``best_metric.json``: the best metric (expression, readable math, JSON tree); it loads back
  with ``get_pruner("best_metric.json")`` as a base pruner. With ``holdout_sequences`` the best
  is the leaderboard entry with the lowest held-out fitness: the search fitness of a few
  thousand tokens cannot separate metrics that differ in a handful of mask decisions, and the
  held-out check keeps a metric that merely fits the search tokens from being reported.
* ``results.json``: everything above plus per-generation statistics, memo counts and timings.
* ``study.db``: the same evaluations as an Optuna study (:class:`MetricRecord`), for
  ``optuna-dashboard``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evosearch.data import DataSpec, TokenData, load_token_data
from evosearch.engine import Evaluator, search
from evosearch.evaluation import Batch
from evosearch.forward import DenseCache, compute_dense_cache
from evosearch.gp import GeneticProgramming, GPConfig, Grammar, MetricGenome
from evosearch.metric_space import MetricSpace
from evosearch.pruning import LayerStats, block_linears, collect_stats, parse_pattern
from evosearch.record import OptunaRecord
from evosearch.rundir import RunConfigMismatch, RunDir
from evosearch.runners import Runner
from evosearch.symbolic import (
    BINARY,
    KNOWN_METRICS,
    TERMINALS,
    UNARY,
    MetricError,
    Node,
    parse,
    save_metric,
    to_math,
)
from evosearch.validate import check_fields, resolve_device

__all__ = [
    "MetricRecord",
    "MetricSearchConfig",
    "MetricSpace",
    "MetricWorker",
    "run_metric_search",
]


@dataclass(frozen=True, kw_only=True)
class MetricSearchConfig:
    """One metric search.

    Args:
        model: built-in name (``smollm2-135m``), local directory, ``.gguf`` or hub id.
        data: calibration source (a local ``.txt``/``.raw``/``.jsonl`` file, a hub alias, or
            ``generated``); the fitness and the W/X/G statistics use the same tokens.
        text_field: JSON key of the text in a ``.jsonl`` file.
        n_sequences / seq_len: calibration tokens (random windows, ``data_seed``).
        sparsity: share of each row's weights pruned (per-row ranking, exact counts).
        pattern: ``"N:M"`` semi-structured target instead of ``sparsity`` (e.g. ``"2:4"``).
        fitness: ``kl`` (KL from the dense model, token mean) or ``ppl``; both minimised.
        population / generations / tournament_size / crossover_rate / subtree_mutation_rate /
            point_mutation_rate / elitism / init_depth: GP parameters (:class:`GPConfig`).
        max_depth / max_size: limits of every tree.
        const_prob / const_range: ephemeral random constants in random trees (see
            :class:`~evosearch.gp.Grammar`).
        terminals / unary / binary: the grammar (names from ``symbolic.TERMINALS`` / ``OPS``).
        seed_metrics: known metric names (``symbolic.KNOWN_METRICS``) or expressions placed in
            the initial population; those reading terminals outside the grammar are skipped.
        seed: seeds the GP (and nothing else: calibration windows use ``data_seed``).
        leaderboard_size: distinct metrics in the leaderboard.
        holdout_sequences: after the search, the leaderboard and the seed metrics are scored
            again on this many further windows of ``seq_len`` tokens (drawn with seed
            ``data_seed + 1``, so other windows than the search's; the statistics stay the
            search's), and the best metric is the leaderboard's lowest there. 0 skips it.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """

    model: str = "smollm2-135m"
    data: str = "generated"
    text_field: str = "text"
    n_sequences: int = 8
    seq_len: int = 256
    data_seed: int = 0
    sparsity: float = 0.5
    pattern: str | None = None
    fitness: str = "kl"
    population: int = 16
    generations: int = 8
    tournament_size: int = 3
    crossover_rate: float = 0.7
    subtree_mutation_rate: float = 0.2
    point_mutation_rate: float = 0.2
    elitism: int = 2
    init_depth: int = 4
    max_depth: int = 6
    max_size: int = 20
    const_prob: float = 0.1
    const_range: tuple[float, float] = (0.01, 10000.0)
    terminals: tuple[str, ...] = ("W", "X", "G")
    unary: tuple[str, ...] = UNARY
    binary: tuple[str, ...] = BINARY
    seed_metrics: tuple[str, ...] = tuple(KNOWN_METRICS)
    seed: int = 0
    leaderboard_size: int = 10
    holdout_sequences: int = 8
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_fields(self)  # types, naming the key
        for name in ("terminals", "unary", "binary", "seed_metrics", "const_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must lie in (0, 1), got {self.sparsity}")
        parse_pattern(self.pattern)  # raises for a bad pattern
        if self.fitness not in ("kl", "ppl"):
            raise ValueError(f"fitness must be 'kl' or 'ppl', got {self.fitness!r}")
        if self.n_sequences < 1:
            raise ValueError(f"n_sequences must be >= 1, got {self.n_sequences}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.leaderboard_size < 1:
            raise ValueError(f"leaderboard_size must be >= 1, got {self.leaderboard_size}")
        if self.holdout_sequences < 0:
            raise ValueError(f"holdout_sequences must be >= 0, got {self.holdout_sequences}")
        self.gp_config()  # validates the GP parameters and the grammar
        for s in self.seed_metrics:
            if s not in KNOWN_METRICS:
                parse(s)

    @property
    def target(self) -> str:
        """``"50%"`` or ``"2:4"``."""
        return self.pattern if self.pattern else f"{self.sparsity:.0%}"

    def grammar(self) -> Grammar:
        return Grammar(
            terminals=self.terminals,
            unary=self.unary,
            binary=self.binary,
            max_depth=self.max_depth,
            max_size=self.max_size,
            const_prob=self.const_prob,
            const_range=self.const_range,
        )

    def gp_config(self) -> GPConfig:
        """The GP strategy's settings; every tree is scored on all calibration tokens."""
        return GPConfig(
            population=self.population,
            generations=self.generations,
            tournament_size=self.tournament_size,
            crossover_rate=self.crossover_rate,
            subtree_mutation_rate=self.subtree_mutation_rate,
            point_mutation_rate=self.point_mutation_rate,
            elitism=self.elitism,
            init_depth=self.init_depth,
            tokens=self.n_sequences * self.seq_len,
            grammar=self.grammar(),
        )

    def seed_trees(self) -> dict[str, Node]:
        """The seed metrics that fit the grammar, by name (an expression names itself)."""
        out = {}
        for s in self.seed_metrics:
            tree = parse(KNOWN_METRICS.get(s, s))
            if tree.terminals() <= set(self.terminals) and self.grammar().fits(tree):
                out[s] = tree
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MetricSearchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown metric-search config keys: {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# -- setup ---------------------------------------------------------------------------------------


@dataclass
class _Setup:
    """What a metric search scores with: the model, its calibration tokens and statistics,
    the prepared fitness and its dense cache."""

    model: nn.Module
    tokenizer: Any
    spec: DataSpec
    data: TokenData
    stats: dict[str, LayerStats]
    fitness: Any
    dense: DenseCache | None
    timings: dict[str, float]


def _scoring_on(model: nn.Module, kind: str, input_ids: torch.Tensor):
    """A fitness of ``kind`` prepared on ``input_ids`` (with the dense model's cache as its
    teacher), and the cache."""
    from evosearch import registry

    fitness = registry.fitness(kind)
    dense = compute_dense_cache(model, input_ids, prefix_reuse=False)
    fitness.prepare(model, input_ids, dense)
    return fitness, dense


def _set_up(config: MetricSearchConfig, log: Callable[[str], None]) -> _Setup:
    """Load the model and calibration tokens, collect W/X/G and prepare the fitness."""
    from evosearch.models import load_model

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model, device=resolve_device(config.device))
    timings["load_model_s"] = time.perf_counter() - t0
    pattern = parse_pattern(config.pattern)
    if pattern is not None:
        bad = sorted({r.shape[1] for r in block_linears(model) if r.shape[1] % pattern[1]})
        if bad:
            raise ValueError(f"pattern {config.pattern}: input widths {bad} are not divisible")
    t0 = time.perf_counter()
    spec = DataSpec(
        source=config.data,
        n_sequences=config.n_sequences,
        seq_len=config.seq_len,
        seed=config.data_seed,
        text_field=config.text_field,
    )
    data = load_token_data(spec, tokenizer, model)
    log(f"calibration: {data.description}")
    needs_g = any(TERMINALS[t].needs_gradients for t in config.terminals)
    stats = collect_stats(model, data.input_ids, gradients=needs_g, progress=log)
    timings["stats_s"] = time.perf_counter() - t0
    log(
        f"statistics W, X{', G' if needs_g else ''} of {len(stats)} layers "
        f"({timings['stats_s']:.1f}s)"
    )
    t0 = time.perf_counter()
    fitness, dense = _scoring_on(model, config.fitness, data.input_ids)
    timings["dense_s"] = time.perf_counter() - t0
    return _Setup(model, tokenizer, spec, data, stats, fitness, dense, timings)


def _evaluator(config: MetricSearchConfig, setup: _Setup) -> Evaluator:
    """The engine's evaluator on the metric space of ``setup``'s statistics."""
    space = MetricSpace(
        setup.stats, sparsity=config.sparsity, pattern=parse_pattern(config.pattern)
    )
    return Evaluator(setup.model, space, setup.fitness, setup.dense, prefix_reuse=False)


@dataclass(frozen=True)
class MetricWorker:
    """The evaluator factory of a :class:`~evosearch.runners.RayRunner` worker: it loads the
    model, the calibration tokens and their statistics from ``config`` again (all
    deterministic, so every worker scores a metric exactly as this process would).

    Example::

        with RayRunner(MetricWorker(config), config=RayRunnerConfig(workers=2)) as runner:
            run_metric_search(config, "runs/metric", runner=runner)
    """

    config: MetricSearchConfig

    def __call__(self) -> Evaluator:
        return _evaluator(self.config, _set_up(self.config, lambda line: None))


# -- run directory -------------------------------------------------------------------------------


class MetricRecord(OptunaRecord):
    """The Optuna study record of a metric search (``study.db``): a trial per evaluated metric
    with its fitness, and the canonical expression, readable math and tree size as user
    attributes. A tree has no fixed parameters, so the trials have none."""

    def add(self, record: dict[str, Any]) -> None:
        """Store one evaluation record (as the engine logs it) as a finished trial."""
        import optuna

        genome = MetricGenome.from_key(record["genome"])
        attrs: dict[str, Any] = {"record": json.dumps(record)}
        attrs.update({k: record[k] for k in ("genome", "tokens", "seconds") if k in record})
        attrs.update(math=to_math(genome.canonical), size=genome.canonical.size())
        value = record.get("value")
        ok = value is not None and math.isfinite(value)
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
            value=value if ok else None,
            params={},
            distributions={},
            user_attrs=attrs,
            intermediate_values={int(record["tokens"]): value} if ok else None,
        )
        self.study.add_trial(trial)


def _start_run(config: MetricSearchConfig, out: Path, resume: bool) -> RunDir:
    """The run directory, created, or checked to hold the same config when resuming."""
    if resume and not (out / "config.json").is_file():
        raise FileNotFoundError(f"nothing to resume: {out / 'config.json'} not found")
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    run = RunDir(out, record=MetricRecord(storage, out.resolve().name))
    try:
        run.start(config.to_dict(), resume=resume)
    except RunConfigMismatch as exc:
        raise ValueError(f"--resume with a different config ({exc})") from None
    except FileExistsError:
        raise FileExistsError(
            f"{out} already holds a metric search; use --resume or a new --out"
        ) from None
    return run


def _adopt_history(run: RunDir, batch: Batch) -> int:
    """Turn the ``history.jsonl`` of a run killed under the earlier loop (which had no
    ``evaluations.jsonl``) into the engine's log, so that it resumes without re-scoring;
    returns the evaluations adopted."""
    history, log = run.file("history.jsonl"), run.file("evaluations.jsonl")
    if not history.is_file() or log.exists():
        return 0
    records = []
    for line in history.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by a kill: it is scored again
        if rec.get("memo_hit"):
            continue
        entry = {
            "genome": rec["canonical"],
            "batch": batch.key(),
            "tokens": batch.n_tokens,
            "value": rec["fitness"],
            "seconds": round(rec["seconds"], 4),
            "generation": rec["generation"],
            "stage": 0,
        }
        if rec.get("rejected") is not None:
            entry["error"] = f"MetricError: {rec['rejected']}"
        records.append(entry)
    for entry in records:
        run.append_evaluation(entry)
    return len(records)


# -- after the search ----------------------------------------------------------------------------


@dataclass
class _Trace:
    """The search as proposals: what the history, the leaderboard and the counts read.

    Attributes:
        history: one record per proposed metric (the rows of ``history.jsonl``).
        memo: canonical key -> (fitness or ``None``, rejection reason or ``None``).
        first_expr: canonical key -> the expression it was first proposed as.
        seconds: evaluation time of every distinct metric, summed.
    """

    history: list[dict[str, Any]]
    memo: dict[str, tuple[float | None, str | None]]
    first_expr: dict[str, str]
    seconds: float


def _trace(strategy: GeneticProgramming, log: list[dict], seed_names: dict[str, str]) -> _Trace:
    """Replay the strategy's proposals against the engine's log (``log``: its evaluations)."""
    evaluated = {r["genome"]: r for r in log}
    trace = _Trace([], {}, {}, sum(r["seconds"] for r in evaluated.values()))
    for gen in strategy.history:
        for index, expression in enumerate(gen["proposed"]):
            key = MetricGenome(parse(expression)).key()
            rec = {
                "generation": gen["generation"],
                "index": index,
                "expression": expression,
                "canonical": key,
                "seed_metric": seed_names.get(key) if gen["generation"] == 0 else None,
            }
            hit = key in trace.memo
            if not hit:
                done = evaluated[key]
                reason = done.get("error")
                if reason is not None:
                    reason = reason.removeprefix("invalid candidate: ")
                    reason = reason.removeprefix(f"{MetricError.__name__}: ")
                trace.memo[key] = (done["value"] if reason is None else None, reason)
                trace.first_expr[key] = expression
            rec["seconds"] = 0.0 if hit else evaluated[key]["seconds"]
            rec["fitness"], rec["rejected"] = trace.memo[key]
            rec["memo_hit"] = hit
            trace.history.append(rec)
    return trace


def _generations(strategy: GeneticProgramming, trace: _Trace) -> list[dict[str, Any]]:
    """Per-generation statistics of the proposals and the best so far."""
    out = []
    for gen in strategy.history:
        rows = [r for r in trace.history if r["generation"] == gen["generation"]]
        finite = [r["fitness"] for r in rows if r["fitness"] is not None]
        out.append(
            {
                "generation": gen["generation"],
                "proposed": len(rows),
                "rejected": len(rows) - len(finite),
                "generation_best": min(finite) if finite else None,
                "generation_median": float(np.median(finite)) if finite else None,
                "best": gen["value"] if math.isfinite(gen["value"]) else None,
                "best_metric": gen["best"],
            }
        )
    return out


def _leaderboard(
    trace: _Trace, seed_names: dict[str, str], size_limit: int
) -> list[dict[str, Any]]:
    """The best distinct metrics: lowest fitness first, among equal fitness the smallest
    tree; metrics with bit-identical fitness (in practice the same mask) share a row."""
    ranked = sorted((v, parse(k).size(), k) for k, (v, _) in trace.memo.items() if v is not None)
    if not ranked:
        raise MetricError("every metric was rejected; see history.jsonl for the reasons")
    board: list[dict[str, Any]] = []
    for v, size, k in ranked:
        if board and board[-1]["fitness"] == v:
            board[-1]["same_fitness"].append(k)
            continue
        if len(board) == size_limit:
            break
        board.append(
            {
                "rank": len(board) + 1,
                "fitness": v,
                "metric": k,
                "math": to_math(parse(k)),
                "first_proposed_as": trace.first_expr.get(k, k),
                "known_metric": seed_names.get(k),
                "size": size,
                "same_fitness": [],
            }
        )
    return board


def _holdout(
    config: MetricSearchConfig,
    setup: _Setup,
    space: MetricSpace,
    keys: dict[str, str],
    log: Callable[[str], None],
) -> tuple[str, dict[str, float | None]]:
    """Score the metrics ``keys`` (name -> canonical key) on ``holdout_sequences`` other
    windows (seed ``data_seed + 1``); returns the held-out data's description and name ->
    fitness (``None``: rejected)."""
    held = load_token_data(
        replace(setup.spec, n_sequences=config.holdout_sequences, seed=config.data_seed + 1),
        setup.tokenizer,
        setup.model,
    )
    log(f"held-out check of the leaderboard and the seed metrics: {held.description}")
    fitness, dense = _scoring_on(setup.model, config.fitness, held.input_ids)
    evaluator = Evaluator(setup.model, space, fitness, dense, prefix_reuse=False)
    batch = Batch(tuple(range(held.n_sequences)), held.input_ids)
    values: dict[str, float | None] = {}
    by_key: dict[str, float | None] = {}
    for name, key in keys.items():
        if key not in by_key:
            outcome = evaluator.outcome(MetricGenome.from_key(key), batch)
            by_key[key] = outcome.value if outcome.error is None else None
            shown = "rejected" if by_key[key] is None else f"{by_key[key]:.4f}"
            log(f"  held-out {config.fitness} {shown}: {to_math(parse(key))}")
        values[name] = by_key[key]
    return held.description, values


def _write_outputs(
    out: Path,
    config: MetricSearchConfig,
    setup: _Setup,
    board: list[dict[str, Any]],
    best_row: dict[str, Any],
    holdout: tuple[str | None, dict[str, float | None]],
) -> None:
    """``best_metric.json`` and the leaderboard files."""
    save_metric(
        parse(best_row["metric"]),
        out / "best_metric.json",
        fitness=best_row["fitness"],
        fitness_kind=config.fitness,
        holdout_fitness=best_row.get("holdout_fitness"),
        target=config.target,
        model=config.model,
        calibration=setup.data.description,
        holdout=holdout[0],
    )
    (out / "leaderboard.json").write_text(json.dumps(board, indent=1) + "\n")
    (out / "leaderboard.md").write_text(_leaderboard_md(board, config, holdout[1]))


def _counts(trace: _Trace, replayed: int) -> dict[str, Any]:
    proposed = len(trace.history)
    hits = sum(r["memo_hit"] for r in trace.history)
    return {
        "proposed": proposed,
        "evaluated": proposed - hits,
        "memo_hits": hits,
        "rejected": sum(r["rejected"] is not None and not r["memo_hit"] for r in trace.history),
        "replayed": replayed,
        "distinct_metrics": len(trace.memo),
        "memo_saved_share": hits / max(proposed, 1),
    }


# -- the search ----------------------------------------------------------------------------------


def run_metric_search(
    config: MetricSearchConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Run a metric search on :func:`evosearch.engine.search` and write its run directory (see
    the module docstring).

    Args:
        config: the search.
        out_dir: run directory; must not hold a previous search unless ``resume``.
        resume: continue the search in ``out_dir`` (same config), re-scoring nothing.
        log: progress lines.
        runner: where metrics are evaluated (default: in this process); a
            :class:`~evosearch.runners.RayRunner` with a :class:`MetricWorker` factory spreads
            them over Ray workers; results do not depend on the runner.

    Returns:
        The contents of ``results.json``.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    run = _start_run(config, out, resume)
    seeds = config.seed_trees()
    if skipped := [s for s in config.seed_metrics if s not in seeds]:
        log(f"seed metrics outside the grammar, skipped: {skipped}")
    setup = _set_up(config, log)
    evaluator = _evaluator(config, setup)
    gp = GeneticProgramming(
        config.gp_config(), rng=np.random.default_rng(config.seed), seeds=list(seeds.values())
    )
    everything = Batch(tuple(range(setup.data.n_sequences)), setup.data.input_ids)
    if resume:
        _adopt_history(run, everything)
    replayed = len(run.evaluations()) if resume else 0
    t0 = time.perf_counter()
    result = search(
        gp,
        evaluator,
        setup.data,
        seed=config.data_seed,
        run=run,
        resume=resume,
        progress=log,
        runner=runner,
    )
    timings = {**setup.timings, "search_s": time.perf_counter() - t0}
    known_keys = {name: MetricGenome(t).key() for name, t in seeds.items()}
    trace = _trace(gp, result.evaluations, {k: n for n, k in known_keys.items()})
    timings["evaluation_s"] = trace.seconds
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trace.history))
    results = _finish(out, config, setup, evaluator.space, trace, known_keys, timings, log)
    results["generations"] = _generations(gp, trace)
    results["counts"] = _counts(trace, replayed)
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = timings
    run.write_json("results.json", results)
    c = results["counts"]
    log(
        f"best metric: {results['best']['math']}  ({config.fitness} "
        f"{results['best']['fitness']:.4f}"
        + (
            f", held-out {results['best']['holdout_fitness']:.4f}"
            if results["best"]["holdout_fitness"] is not None
            else ""
        )
        + f"); {c['evaluated']} evaluated, {c['memo_hits']} answered by the memo "
        f"({c['memo_saved_share']:.0%}); written to {out}"
    )
    return results


def _finish(
    out: Path,
    config: MetricSearchConfig,
    setup: _Setup,
    space: MetricSpace,
    trace: _Trace,
    known_keys: dict[str, str],
    timings: dict[str, float],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Rank, re-check on held-out tokens (its time goes to ``timings``), write the leaderboard
    and the best metric; returns the first part of ``results.json``."""
    seed_names = {key: name for name, key in known_keys.items()}
    board = _leaderboard(trace, seed_names, config.leaderboard_size)
    known = {name: trace.memo.get(k, (None, None))[0] for name, k in known_keys.items()}
    best_row, known_holdout, holdout_data = board[0], {}, None
    if config.holdout_sequences:
        t0 = time.perf_counter()
        scored = {f"#{r['rank']}": r["metric"] for r in board}
        scored.update({n: k for n, k in known_keys.items() if known[n] is not None})
        holdout_data, held = _holdout(config, setup, space, scored, log)
        for row in board:
            row["holdout_fitness"] = held[f"#{row['rank']}"]
        known_holdout = {n: held[n] for n in known_keys if n in held}
        if rows := [r for r in board if r["holdout_fitness"] is not None]:
            best_row = min(rows, key=lambda r: (r["holdout_fitness"], r["rank"]))
        timings["holdout_s"] = time.perf_counter() - t0
    _write_outputs(out, config, setup, board, best_row, (holdout_data, known_holdout))
    best_key = best_row["metric"]
    return {
        "config": config.to_dict(),
        "target": config.target,
        "calibration": setup.data.description,
        "holdout": holdout_data,
        "best": {
            "metric": best_key,
            "math": to_math(parse(best_key)),
            "fitness": best_row["fitness"],
            "holdout_fitness": best_row.get("holdout_fitness"),
            "known_metric": seed_names.get(best_key),
        },
        "known_metrics": known,
        "known_metrics_holdout": known_holdout,
        "leaderboard": board,
    }


def _leaderboard_md(
    leaderboard: list[dict[str, Any]],
    config: MetricSearchConfig,
    known_holdout: dict[str, float | None],
) -> str:
    lines = [
        f"Metric leaderboard: {config.model}, {config.target}, calibration {config.fitness} "
        f"({config.n_sequences} x {config.seq_len} tokens of {config.data})",
        "",
        "Metrics with bit-identical fitness (in practice the same mask) share a row: the "
        "smallest is shown, the others are counted.",
        "",
        f"| rank | {config.fitness} | held-out {config.fitness} | metric | expression | known as "
        "| same fitness |",
        "| ---: | ---: | ---: | --- | --- | --- | ---: |",
    ]
    for row in leaderboard:
        held = row.get("holdout_fitness")
        lines.append(
            f"| {row['rank']} | {row['fitness']:.4f} | {'–' if held is None else f'{held:.4f}'} "
            f"| {row['math']} | `{row['metric']}` | {row['known_metric'] or ''} "
            f"| {len(row['same_fitness'])} |"
        )
    if known_holdout:
        lines += [
            "",
            f"Held-out {config.fitness} of the seed metrics ({config.holdout_sequences} x "
            f"{config.seq_len} other tokens): "
            + ", ".join(f"{n} {v:.4f}" for n, v in known_holdout.items() if v is not None),
        ]
    return "\n".join(lines) + "\n"
