"""Search a symbolic pruning metric by genetic programming (Pruner-Zero, Dong et al. 2024).

:func:`run_metric_search` loads the model and calibration tokens, computes the statistics every
metric reads (W, X and G, once), and runs :class:`~evosearch.gp.GeneticProgramming`. Each
proposed metric is reduced to its canonical form (:func:`~evosearch.symbolic.canonical`), and
each canonical form is evaluated once (:class:`MetricEvaluator`: prune every block linear to the
target with per-row ranking, score the pruned model by KL from the dense model or perplexity on
the calibration tokens, restore the dense weights). Repeats are answered from the memo.

A run directory holds:

* ``config.json``: the :class:`MetricSearchConfig`.
* ``history.jsonl``: one line per proposed metric, appended as it is scored (proposal order,
  expression, canonical form, fitness or rejection reason, whether the memo answered). A killed
  run resumes (``resume=True``) by replaying the seeded search against it: nothing already
  scored is scored again.
* ``leaderboard.json`` / ``leaderboard.md``: the best distinct metrics with their fitness and,
  with ``holdout_sequences``, their fitness on held-out calibration text.
* ``best_metric.json``: the best metric (expression, readable math, JSON tree); it loads back
  with ``get_pruner("best_metric.json")`` as a base pruner. With ``holdout_sequences`` the best
  is the leaderboard entry with the lowest held-out fitness: the search fitness of a few
  thousand tokens cannot separate metrics that differ in a handful of mask decisions, and the
  held-out check keeps a metric that merely fits the search tokens from being reported.
* ``results.json``: everything above plus per-generation statistics, memo counts and timings.
"""

from __future__ import annotations

import copy
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

from evosearch.data import DataSpec, load_token_data
from evosearch.errors import read_json
from evosearch.evaluation import Batch, Candidate
from evosearch.forward import DenseCache, compute_dense_cache
from evosearch.genome import Genome
from evosearch.gp import GeneticProgramming, GPConfig, Grammar
from evosearch.pruning import LayerStats, block_linears, collect_stats, parse_pattern, set_weight_
from evosearch.symbolic import (
    BINARY,
    KNOWN_METRICS,
    TERMINALS,
    UNARY,
    MetricError,
    Node,
    canonical,
    metric_pruner,
    parse,
    save_metric,
    to_math,
    to_string,
)
from evosearch.validate import check_fields

__all__ = ["MetricEvaluator", "MetricSearchConfig", "run_metric_search"]


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
        return GPConfig(
            population=self.population,
            generations=self.generations,
            tournament_size=self.tournament_size,
            crossover_rate=self.crossover_rate,
            subtree_mutation_rate=self.subtree_mutation_rate,
            point_mutation_rate=self.point_mutation_rate,
            elitism=self.elitism,
            init_depth=self.init_depth,
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


class MetricEvaluator:
    """Scores a metric: prune every block linear to the target by the metric, run the fitness,
    restore the dense weights.

    Holds one copy of the dense block-linear weights (to restore them); the model itself is
    modified only during a call.

    Args:
        model: the dense model.
        stats: :func:`~evosearch.pruning.collect_stats` of every block linear (with gradients
            when a metric reads G).
        fitness: a fitness object (``fitness.get_fitness``), already prepared.
        batch: the calibration tokens.
        dense: the dense cache the fitness uses as its teacher (KL), or ``None``.
        sparsity / pattern: the target.
    """

    def __init__(
        self,
        model: nn.Module,
        stats: dict[str, LayerStats],
        fitness,
        batch: Batch,
        dense: DenseCache | None,
        *,
        sparsity: float | None,
        pattern: tuple[int, int] | None = None,
    ) -> None:
        self.model = model
        self.stats = stats
        self.fitness = fitness
        self.batch = batch
        self.dense = dense
        self.sparsity = None if pattern else sparsity
        self.pattern = pattern
        self.refs = block_linears(model)
        self._dense_weights = {r.name: r.weight(model).detach().clone() for r in self.refs}

    def __call__(self, tree: Node) -> float:
        """The fitness of the model pruned by ``tree``; raises :class:`MetricError` with the
        reason when the metric is unusable (non-finite or constant scores, non-finite
        fitness)."""
        pruner = metric_pruner(tree)
        try:
            for ref in self.refs:
                w = self._dense_weights[ref.name]
                try:
                    pruned = pruner.prune(
                        w, self.stats[ref.name], self.sparsity, pattern=self.pattern
                    )
                except MetricError as exc:
                    raise MetricError(f"{exc} (layer {ref.name})") from None
                except RuntimeError as exc:  # e.g. terminal shapes that do not broadcast
                    raise MetricError(f"evaluation failed: {exc} (layer {ref.name})") from None
                set_weight_(ref.module(self.model), pruned)
            candidate = Candidate(self.model, Genome((0,)), 0, self.dense)
            value = float(self.fitness(candidate, self.batch))
        finally:
            self.restore_()
        if not math.isfinite(value):
            raise MetricError(f"non-finite fitness {value}")
        return value

    def on_data(self, fitness, batch: Batch, dense: DenseCache | None) -> MetricEvaluator:
        """The same evaluator scoring on other tokens (sharing the dense weights' copy)."""
        other = copy.copy(self)
        other.fitness, other.batch, other.dense = fitness, batch, dense
        return other

    def restore_(self) -> None:
        """Put the dense weights back."""
        for ref in self.refs:
            set_weight_(ref.module(self.model), self._dense_weights[ref.name])


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _scoring_on(model: nn.Module, kind: str, input_ids: torch.Tensor):
    """A fitness of ``kind`` prepared on ``input_ids`` (with the dense model's cache as its
    teacher), the batch of all those tokens, and the cache: what :class:`MetricEvaluator`
    scores with."""
    from fitness import get_fitness

    fitness = get_fitness(kind)
    dense = compute_dense_cache(model, input_ids, prefix_reuse=False)
    fitness.prepare(model, input_ids, dense)
    return fitness, Batch(tuple(range(input_ids.shape[0])), input_ids), dense


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: it is scored again
    return records


def run_metric_search(
    config: MetricSearchConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a metric search and write its run directory (see the module docstring).

    Args:
        config: the search.
        out_dir: run directory; must not hold a previous search unless ``resume``.
        resume: continue the search in ``out_dir`` (same config), re-scoring nothing.
        log: progress lines.

    Returns:
        The contents of ``results.json``.
    """
    from evosearch.models import load_model

    t_start = time.perf_counter()
    out = Path(out_dir)
    history_path = out / "history.jsonl"
    config_path = out / "config.json"
    if resume:
        if not config_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {config_path} not found")
        saved = read_json(config_path, "cannot read the run's config")
        if saved != config.to_dict():
            now = config.to_dict()
            diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
            raise ValueError(f"--resume with a different config (differs in {diff})")
    elif history_path.exists() or config_path.exists():
        raise FileExistsError(f"{out} already holds a metric search; use --resume or a new --out")
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    previous = _read_history(history_path) if resume else []
    if resume:  # drop a half-written last line
        history_path.write_text("".join(json.dumps(r) + "\n" for r in previous))

    seeds = config.seed_trees()
    skipped = [s for s in config.seed_metrics if s not in seeds]
    if skipped:
        log(f"seed metrics outside the grammar, skipped: {skipped}")
    pattern = parse_pattern(config.pattern)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model, device=_resolve_device(config.device))
    timings["load_model_s"] = time.perf_counter() - t0
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
    fitness, batch, dense = _scoring_on(model, config.fitness, data.input_ids)
    timings["dense_s"] = time.perf_counter() - t0
    evaluator = MetricEvaluator(
        model, stats, fitness, batch, dense, sparsity=config.sparsity, pattern=pattern
    )

    gp = GeneticProgramming(
        config.gp_config(), rng=np.random.default_rng(config.seed), seeds=list(seeds.values())
    )
    seed_names = {to_string(canonical(t)): name for name, t in seeds.items()}
    memo: dict[str, tuple[float | None, str | None]] = {}
    first_expr: dict[str, str] = {}
    position = 0
    counts = {"proposed": 0, "evaluated": 0, "memo_hits": 0, "rejected": 0, "replayed": 0}
    generations: list[dict[str, Any]] = []
    t_search = time.perf_counter()
    eval_seconds = 0.0
    with history_path.open("a") as history:
        while not gp.done:
            gen = gp.generation
            values: list[float] = []
            for index, tree in enumerate(gp.ask()):
                key = to_string(canonical(tree))
                first_expr.setdefault(key, to_string(tree))
                if position < len(previous):
                    rec = previous[position]
                    if rec.get("canonical") != key:
                        raise ValueError(
                            f"history.jsonl entry {position} is {rec.get('canonical')!r}, the "
                            f"search proposes {key!r}: it was written by another config or "
                            "version; start a new --out"
                        )
                    counts["replayed"] += 1
                    if not rec["memo_hit"]:
                        memo[key] = (rec["fitness"], rec["rejected"])
                        eval_seconds += rec["seconds"]
                else:
                    rec = {
                        "generation": gen,
                        "index": index,
                        "expression": to_string(tree),
                        "canonical": key,
                        "seed_metric": seed_names.get(key) if gen == 0 else None,
                    }
                    if key in memo:
                        (rec["fitness"], rec["rejected"]), rec["memo_hit"] = memo[key], True
                        rec["seconds"] = 0.0
                    else:
                        t0 = time.perf_counter()
                        try:
                            value, reason = evaluator(canonical(tree)), None
                        except MetricError as exc:
                            value, reason = None, str(exc)
                        rec["seconds"] = time.perf_counter() - t0
                        eval_seconds += rec["seconds"]
                        rec.update(fitness=value, rejected=reason, memo_hit=False)
                        memo[key] = (value, reason)
                    history.write(json.dumps(rec) + "\n")
                    history.flush()
                position += 1
                counts["proposed"] += 1
                counts["memo_hits" if rec["memo_hit"] else "evaluated"] += 1
                counts["rejected"] += rec["rejected"] is not None and not rec["memo_hit"]
                values.append(math.inf if rec["fitness"] is None else rec["fitness"])
            gp.tell(values)
            best_tree, best_value = gp.best()
            finite = [v for v in values if math.isfinite(v)]
            generations.append(
                {
                    "generation": gen,
                    "proposed": len(values),
                    "rejected": len(values) - len(finite),
                    "generation_best": min(finite) if finite else None,
                    "generation_median": float(np.median(finite)) if finite else None,
                    "best": best_value if math.isfinite(best_value) else None,
                    "best_metric": to_string(canonical(best_tree)),
                }
            )
            log(
                f"generation {gen}/{config.generations}: best {config.fitness} {best_value:.4f} "
                f"{to_math(canonical(best_tree))} | {len(values)} proposed, "
                f"{len(values) - len(finite)} rejected, memo hits so far {counts['memo_hits']} "
                f"({time.perf_counter() - t_search:.0f}s)"
            )
    timings["search_s"] = time.perf_counter() - t_search
    timings["evaluation_s"] = eval_seconds

    # lowest fitness first; among equal fitness the smallest tree
    ranked = sorted((v, parse(k).size(), k) for k, (v, _) in memo.items() if v is not None)
    if not ranked:
        raise MetricError("every metric was rejected; see history.jsonl for the reasons")
    leaderboard: list[dict[str, Any]] = []
    for v, size, k in ranked:
        if leaderboard and leaderboard[-1]["fitness"] == v:
            # bit-identical fitness: in practice the same mask, so the same metric
            leaderboard[-1]["same_fitness"].append(k)
            continue
        if len(leaderboard) == config.leaderboard_size:
            break
        leaderboard.append(
            {
                "rank": len(leaderboard) + 1,
                "fitness": v,
                "metric": k,
                "math": to_math(parse(k)),
                "first_proposed_as": first_expr.get(k, k),
                "known_metric": seed_names.get(k),
                "size": size,
                "same_fitness": [],
            }
        )
    known_keys = {name: to_string(canonical(t)) for name, t in seeds.items()}
    known = {name: memo.get(k, (None, None))[0] for name, k in known_keys.items()}
    best_row, known_holdout, holdout_data = leaderboard[0], {}, None
    if config.holdout_sequences:
        t0 = time.perf_counter()
        held = load_token_data(
            replace(spec, n_sequences=config.holdout_sequences, seed=config.data_seed + 1),
            tokenizer,
            model,
        )
        holdout_data = held.description
        log(f"held-out check of the leaderboard and the seed metrics: {held.description}")
        held_eval = evaluator.on_data(*_scoring_on(model, config.fitness, held.input_ids))
        held_memo: dict[str, float | None] = {}

        def held_out(key: str) -> float | None:
            if key not in held_memo:
                try:
                    held_memo[key] = held_eval(parse(key))
                except MetricError:
                    held_memo[key] = None
                value = held_memo[key]
                shown = "rejected" if value is None else f"{value:.4f}"
                log(f"  held-out {config.fitness} {shown}: {to_math(parse(key))}")
            return held_memo[key]

        for row in leaderboard:
            row["holdout_fitness"] = held_out(row["metric"])
        known_holdout = {n: held_out(k) for n, k in known_keys.items() if known[n] is not None}
        scored = [r for r in leaderboard if r["holdout_fitness"] is not None]
        if scored:
            best_row = min(scored, key=lambda r: (r["holdout_fitness"], r["rank"]))
        timings["holdout_s"] = time.perf_counter() - t0
    best_value, best_key = best_row["fitness"], best_row["metric"]
    best_tree = parse(best_key)
    save_metric(
        best_tree,
        out / "best_metric.json",
        fitness=best_value,
        fitness_kind=config.fitness,
        holdout_fitness=best_row.get("holdout_fitness"),
        target=config.target,
        model=config.model,
        calibration=data.description,
        holdout=holdout_data,
    )
    (out / "leaderboard.json").write_text(json.dumps(leaderboard, indent=1) + "\n")
    (out / "leaderboard.md").write_text(_leaderboard_md(leaderboard, config, known_holdout))
    timings["total_s"] = time.perf_counter() - t_start
    results = {
        "config": config.to_dict(),
        "target": config.target,
        "calibration": data.description,
        "holdout": holdout_data,
        "best": {
            "metric": best_key,
            "math": to_math(best_tree),
            "fitness": best_value,
            "holdout_fitness": best_row.get("holdout_fitness"),
            "known_metric": seed_names.get(best_key),
        },
        "known_metrics": known,
        "known_metrics_holdout": known_holdout,
        "leaderboard": leaderboard,
        "generations": generations,
        "counts": {
            **counts,
            "distinct_metrics": len(memo),
            "memo_saved_share": counts["memo_hits"] / max(counts["proposed"], 1),
        },
        "timings": timings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(
        f"best metric: {to_math(best_tree)}  ({config.fitness} {best_value:.4f}"
        + (
            f", held-out {best_row['holdout_fitness']:.4f}"
            if best_row.get("holdout_fitness") is not None
            else ""
        )
        + "); "
        f"{counts['evaluated']} evaluated, {counts['memo_hits']} answered by the memo "
        f"({results['counts']['memo_saved_share']:.0%}); written to {out}"
    )
    return results


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
