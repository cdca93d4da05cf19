"""The ``evosearch search`` job: a :class:`~evosearch.problem.Problem`, a strategy, the one
search loop, then baselines, the Pareto front, the saved model and the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from evosearch.config import LEGACY_FIELDS, RUNNER_FIELDS, SearchConfig
from evosearch.engine import search
from evosearch.evaluation import measure_latency
from evosearch.genome import Genome
from evosearch.jobs.baselines import compute_baselines, evaluate_candidates
from evosearch.jobs.pareto import write_pareto
from evosearch.jobs.report import log_summary, selection_warning, write_report
from evosearch.problem import Problem, make_runner
from evosearch.run import RunDir
from evosearch.strategies import EvoPress, MultiBudgetEvoPress, RandomSearch
from evosearch.surgery import apply_replacements

__all__ = ["make_strategy", "run_search"]


def _sampled_range(budgets: list) -> tuple[int, int, int]:
    """``(low, high, step)`` of the budgets an Optuna sampler draws from (every group has the
    same range): the niches' span, on their grid when they are evenly spaced."""
    values = [b if isinstance(b, int) else min(b.values()) for b in budgets]
    steps = {b - a for a, b in zip(values, values[1:])}
    return values[0], values[-1], steps.pop() if len(steps) == 1 else 1


def niches(problem: Problem) -> tuple[list, list[str]] | None:
    """The budgets (and labels) of a multi-budget search, or ``None`` for a single budget."""
    hook = problem.entry.niches
    return None if hook is None else hook(problem.config, problem.space)


def make_strategy(problem: Problem, name: str, initial=(), objectives=None):
    """The strategy ``name`` over the problem's space (multi-budget over a budget range)."""
    config, space = problem.config, problem.space
    budgets = niches(problem)
    if name not in ("evopress", "random"):
        from evosearch.optuna_strategy import OptunaStrategy, OptunaStrategyConfig

        sampler_config = OptunaStrategyConfig(
            sampler="random" if name == "optuna-random" else name,
            generations=config.generations,
            batch_size=config.offspring,
            tokens=config.sampler_tokens or config.stages[-1][0],
            budget_range=None if budgets is None else _sampled_range(budgets[0]),
        )
        return OptunaStrategy(
            space, config=sampler_config, seed=config.seed, objectives=objectives, initial=initial
        )
    rng = np.random.default_rng(config.seed)
    if name == "evopress" and budgets is not None:
        return MultiBudgetEvoPress(
            space,
            budgets=budgets[0],
            labels=budgets[1],
            config=config.evopress_config(),
            rng=rng,
            objectives=objectives,
            initial=initial,
            focus=config.budget_focus,
            anchors=space.range_uniform_genomes() if config.offset_steps else None,
        )
    cls = EvoPress if name == "evopress" else RandomSearch
    return cls(space, config=config.evopress_config(), rng=rng, initial=initial)


def _start_genomes(problem: Problem, log) -> tuple[tuple[Genome, ...], dict[str, Genome]]:
    """The initial genomes (uniform starts and warm-start heuristics) and the heuristics'
    genomes by name, which later count as computed baselines."""
    config, space = problem.config, problem.space
    range_fisher = config.sparsity_range is not None and "fisher" in config.warm_start
    warm: dict[str, Genome] = {}
    if heuristics := tuple(h for h in config.warm_start if not (range_fisher and h == "fisher")):
        warm = compute_baselines(problem, heuristics, log)
    initial: tuple[Genome, ...] = tuple(warm.values())
    if config.sparsity_range is not None:  # every budget starts from its uniform allocation
        starts = space.range_uniform_genomes()
        initial = (*starts, *initial)
        if range_fisher:
            from evosearch.registry import load_object

            fisher = load_object("search_spaces.sparsity_baselines:fisher")
            allocations = fisher(space, problem.model, problem.data.input_ids, starts, log=log)
            initial = (*initial, *allocations)
            if space.uniform_genome() in starts:  # the baseline is the middle sparsity's
                warm["fisher"] = allocations[starts.index(space.uniform_genome())]
    elif problem.entry.starts_uniform:  # EvoPress starts from the uniform allocation
        initial = (space.uniform_genome(), *initial)
    return initial, warm


def _objectives(problem: Problem) -> Callable[[Genome], tuple] | None:
    """The extra objectives of a multi-objective search, measured per genome (memoised)."""
    config, space = problem.config, problem.space
    if not config.objectives:
        return None
    latencies: dict[str, float] = {}

    def objectives(genome: Genome) -> tuple:
        metrics = dict(space.metrics(genome))
        if "latency" in config.objectives:
            if genome.key() not in latencies:
                model = problem.model
                with apply_replacements(model, space.replacements(model, genome)):
                    latencies[genome.key()] = measure_latency(model, problem.data.input_ids[:1])
            metrics["latency"] = latencies[genome.key()]
        return tuple(metrics[o] for o in config.objectives)

    return objectives


def _claim(config: SearchConfig, out_dir: Path, resume: bool, direction: str):
    """The run directory with its Optuna record, claimed for ``config``."""
    from evosearch.record import OptunaRecord

    storage = config.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = OptunaRecord(storage, out_dir.resolve().name, direction=direction)
    run = RunDir(out_dir, record=record)
    resuming = run.start(
        config.to_dict(), resume=resume, ignore=RUNNER_FIELDS, legacy=LEGACY_FIELDS
    )
    return run, record, storage, resuming


def run_search(
    config: SearchConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    fitness=None,
    space=None,
) -> dict[str, Any]:
    """Run the search of ``config`` into ``out_dir`` and return the results dict (also written
    to ``out_dir/results.json``). With ``resume``, continue a killed run of the same config.
    ``fitness`` / ``space`` override the config's names with a user's objects (see
    :func:`evosearch.run`)."""
    problem = Problem(config, log, fitness=fitness, space=space)  # bad inputs fail here
    direction = getattr(problem.fitness, "direction", "minimize")
    run, record, storage, resuming = _claim(config, Path(out_dir), resume, direction)
    record.bind(problem.space.spec, problem.space.metrics)
    initial, warm = _start_genomes(problem, log)
    strategy = make_strategy(problem, config.strategy, initial, _objectives(problem))
    log(
        f"search: {config.strategy}, {problem.space.summary()}, fitness "
        f"{problem.fitness.name}, {config.generations} generations x {config.offspring} "
        f"offspring, stages {list(config.stages)}"
    )
    with make_runner(problem, log) as runner:
        result = search(
            strategy,
            problem.evaluator(),
            problem.data,
            seed=config.seed,
            run=run,
            resume=resuming,
            progress=log,
            runner=runner,
        )
    results = _results(problem, result, storage, record)
    best_desc = problem.space.describe(result.best)
    run.write_json("best_genome.json", {"genome": result.best.key(), **best_desc})
    if config.objectives or config.budget_range:
        results["pareto"] = write_pareto(problem, run, strategy, result.evaluations, log)
    _compare(problem, results, result.best, warm, initial, log)
    _save(problem, results, result.best, run, log)
    run.write_json("results.json", results)
    log_summary(results, config, log)
    write_report(run.path, log)
    return results


def _results(problem: Problem, result, storage: str, record) -> dict[str, Any]:
    """The results record of a finished search (before baselines and the saved model)."""
    config, space, best = problem.config, problem.space, result.best
    return {
        "config": config.to_dict(),
        "space": space.config(),
        "fitness": problem.fitness.name,
        "best": {
            "genome": best.key(),
            **space.describe(best),
            config.fitness: result.best_value,
            **space.metrics(best),
        },
        "study": {"storage": storage, "study_name": record.study.study_name},
        "history": result.history,
        "n_evaluations": result.n_evaluations,
        "search_seconds": round(result.seconds, 2),
        "evaluations_per_second": round(result.n_evaluations / max(result.seconds, 1e-9), 3),
        "tokens": result.tokens,
        "dense_cache": {
            "seconds": round(problem.cache_seconds, 2),
            "teacher_bytes_per_token": problem.dense.teacher_bytes_per_token(),
            "prefix_bytes_per_token": problem.dense.prefix_bytes_per_token(),
        },
        "evaluations": result.evaluations,
    }


def _compare(problem: Problem, results: dict, best: Genome, warm, initial, log) -> None:
    """Baselines, every candidate on all calibration tokens, and held-out perplexity."""
    config, space = problem.config, problem.space
    candidates = {config.strategy: best}
    if config.baselines:  # the warm start's heuristics are not computed again
        missing = tuple(b for b in config.baselines if b not in warm)
        computed = compute_baselines(problem, missing, log, initial)
        candidates.update({b: warm[b] if b in warm else computed[b] for b in config.baselines})
        results["baselines"] = {
            n: {"genome": g.key(), **space.describe(g)} for n, g in candidates.items()
        }
    # Every candidate scored on all calibration tokens, so the comparison is like for like.
    evaluator, full = problem.evaluator(), problem.full_batch()
    results["calibration_fitness"] = {n: evaluator.raw(g, full) for n, g in candidates.items()}
    if warning := selection_warning(results["calibration_fitness"], config):
        results["warnings"] = [warning]
        log(f"warning: {warning}")
    if config.eval_ppl:
        results["perplexity"] = evaluate_candidates(problem, candidates, log)


def _save(problem: Problem, results: dict, best: Genome, run: RunDir, log) -> None:
    """The best model, saved into the run (with size and speed for shrinking spaces)."""
    if not problem.config.save_model:
        return
    problem.space.save(problem.model, problem.tokenizer, best, str(run.file("model")))
    results["model_dir"] = str(run.file("model"))
    if problem.entry.shrinks:
        from evosearch.jobs.models import export_stats

        results["export"] = export_stats(problem.model, run.file("model"), log)
