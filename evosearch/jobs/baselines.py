"""Baselines: the registered heuristics of a space, random search with the search's own racing
and budget, the ``evosearch baseline`` job, and scoring candidates on held-out text."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evosearch import registry
from evosearch.config import SearchConfig
from evosearch.engine import search
from evosearch.genome import Genome
from evosearch.jobs.models import evaluate_perplexity, load_eval_data
from evosearch.jobs.strategy import make_strategy
from evosearch.models import save_complete
from evosearch.problem import Problem
from evosearch.rundir import write_json_atomic
from evosearch.surgery import apply_replacements

__all__ = ["compute_baselines", "evaluate_candidates", "run_baseline"]


def compute_baselines(
    problem: Problem, names: tuple[str, ...], log, initial: tuple[Genome, ...] = ()
) -> dict[str, Genome]:
    """The genome of each baseline in ``names`` (``random``: random search from ``initial``
    with the search's racing and budget; the others: the space's registered heuristics)."""
    config, space = problem.config, problem.space
    out: dict[str, Genome] = {}
    for name in names:
        t0 = time.perf_counter()
        if name == "random":
            if config.strategy.name == "random":
                log("baseline random: skipped, the search itself is random search")
                continue
            out[name] = random_baseline(problem, initial)
        else:
            out[name] = registry.baseline(config.space.name, name)(problem, config, log)
        log(f"baseline {name}: {short_description(space, out[name])} "
            f"({time.perf_counter() - t0:.1f}s)")  # fmt: skip
    return out


def short_description(space, genome: Genome) -> dict[str, Any]:
    """The genome's description and metrics without per-layer lists (those stay in
    ``results.json``), for log lines."""
    full = {**space.describe(genome), **space.metrics(genome)}
    return {k: v for k, v in full.items() if not isinstance(v, (dict, list)) or len(v) <= 40}


def random_baseline(problem: Problem, initial) -> Genome:
    """Random search with the search's racing, budget and initial genomes."""
    strategy = make_strategy(problem, "random", initial)
    return search(strategy, problem.evaluator(), problem.data, seed=problem.config.seed).best


def run_baseline(
    config: SearchConfig, method: str, out_dir: str | Path, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Compute one baseline's genome, score it on the calibration data and save its model."""
    names = (*registry.baselines_for(config.space.name), "random")
    if method not in names:
        raise ValueError(
            f"unknown baseline {method!r} for the {config.space.name} space; choose from {names}"
        )
    config = dataclasses.replace(config, baselines=(method,))
    problem = Problem(config, log)
    genome = compute_baselines(problem, (method,), log)[method]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "config": config.to_dict(),
        "method": method,
        "genome": genome.key(),
        **problem.space.describe(genome),
        config.fitness: problem.evaluator().raw(genome, problem.full_batch()),
    }
    if config.evaluation.ppl:
        results["perplexity"] = evaluate_candidates(problem, {method: genome}, log)
    if config.save_model:
        save_complete(
            lambda d: problem.space.save(problem.model, problem.tokenizer, genome, d),
            out / "model",
        )
    write_json_atomic(out / "results.json", results)
    return results


def evaluate_candidates(problem: Problem, candidates: dict[str, Genome], log) -> dict:
    """Perplexity of the dense model and of each candidate on every ``eval_ppl`` source."""
    config, model = problem.config, problem.model
    table: dict[str, dict[str, float]] = {}
    ev = config.evaluation
    for source in ev.ppl:
        # generated held-out text: a seed the run's calibration text does not use
        data = load_eval_data(
            source, problem.tokenizer, ev.seq_len, ev.windows, model=model, seed=config.seed + 1
        )
        table.setdefault("dense", {})[source] = evaluate_perplexity(model, data)
        for name, genome in candidates.items():
            with apply_replacements(model, problem.space.replacements(model, genome)):
                table.setdefault(name, {})[source] = evaluate_perplexity(model, data)
        log(
            f"perplexity on {source} ({data.description}): "
            + ", ".join(f"{n} {v[source]:.2f}" for n, v in table.items())
        )
    return table
