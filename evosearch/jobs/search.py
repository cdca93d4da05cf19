"""The ``evosearch search`` job: a :class:`~evosearch.problem.Problem`, a strategy, the one
search loop, then baselines, the Pareto front, the saved model and the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from evosearch.config import RUNNER_FIELDS, SearchConfig
from evosearch.engine import search
from evosearch.errors import kill_point, read_json
from evosearch.evaluation import measure_latency
from evosearch.genome import Genome
from evosearch.jobs.baselines import compute_baselines, evaluate_candidates
from evosearch.jobs.pareto import write_pareto
from evosearch.jobs.report import (
    held_out_verdict,
    log_summary,
    selection_warning,
    write_report,
)
from evosearch.jobs.strategy import make_strategy, niches
from evosearch.models import save_complete
from evosearch.problem import Problem, make_runner
from evosearch.rundir import RunDir
from evosearch.surgery import apply_replacements

__all__ = ["run_search"]


def _start_genomes(problem: Problem, log) -> tuple[tuple[Genome, ...], dict[str, Genome]]:
    """The initial genomes (uniform starts and warm-start heuristics) and the heuristics'
    genomes by name, which later count as computed baselines."""
    config, space, entry = problem.config, problem.space, problem.entry
    if niches(problem) is not None and entry.range_starts is not None:
        # a budget range: the space starts every budget itself (e.g. per-budget allocations)
        starts, late, own = entry.range_starts(problem, config.warm_start, log)
        rest = compute_baselines(problem, tuple(h for h in config.warm_start if h not in own), log)
        own = {name: g for name, g in own.items() if g is not None}  # None: handled, no genome
        return (*starts, *rest.values(), *late), {**rest, **own}
    warm = compute_baselines(problem, tuple(config.warm_start), log)
    initial: tuple[Genome, ...] = tuple(warm.values())
    if entry.starts_uniform:  # EvoPress starts from the uniform allocation
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


def _upgrade(old: dict) -> dict:
    """A run directory's config in today's nested form (earlier versions wrote flat keys and
    evaluated in fp32 with the full-vocabulary KL)."""
    if "generations" in old:  # a flat config.json
        old = {"dtype": "float32", "kl_top_k": None, **old}
    try:
        return SearchConfig.from_dict(old).to_dict()
    except (ValueError, TypeError):
        return old  # the comparison then names what differs


def _claim(run: RunDir, config: SearchConfig, claim: dict, direction: str):
    """Claim the run directory (once the model and data have loaded) with its Optuna record;
    returns the record, its storage URL and whether an earlier process's state is loaded."""
    from evosearch.record import OptunaRecord

    out_dir = run.path
    storage = config.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    run.record = record = OptunaRecord(storage, out_dir.resolve().name, direction=direction)
    resuming = run.start(config.to_dict(), **claim)
    return record, storage, resuming


def run_search(
    config: SearchConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    fitness=None,
    space=None,
) -> dict[str, Any]:
    """Run the search of ``config`` into ``out_dir`` and return the results dict (also written
    to ``out_dir/results.json``). With ``resume``, continue a killed run of the same config;
    with ``overwrite``, replace the run in ``out_dir``. The directory is claimed only after the
    model and data have loaded, so a failure before leaves nothing behind. ``fitness`` /
    ``space`` override the config's names with a user's objects (see :func:`evosearch.run`)."""
    run = RunDir(out_dir)
    claim = dict(resume=resume, overwrite=overwrite, ignore=RUNNER_FIELDS, upgrade=_upgrade)
    run.check(config.to_dict(), **claim)  # another run in out_dir fails before anything loads
    problem = Problem(config, log, fitness=fitness, space=space)  # bad inputs fail here
    direction = getattr(problem.fitness, "direction", "minimize")
    record, storage, resuming = _claim(run, config, claim, direction)
    record.bind(problem.space.spec, problem.space.metrics)
    initial, warm = _start_genomes(problem, log)
    strategy = make_strategy(problem, config.strategy.name, initial, _objectives(problem))
    loop = config.strategy.loop
    log(
        f"search: {config.strategy.name}, {problem.space.summary()}, fitness "
        f"{problem.fitness.name}, {loop.generations} generations x {loop.offspring} "
        f"offspring, stages {[(s.tokens, s.survivors) for s in loop.stages]}"
    )
    run.prepare_search()  # reconcile the study with the log after a kill
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
            max_seconds=loop.max_seconds,
        )
    results = _results(problem, result, storage, record, run)
    best_desc = problem.space.describe(result.best)
    run.write_json("best_genome.json", {"genome": result.best.key(), **best_desc})
    if config.objectives or config.budget_range:
        results["pareto"] = write_pareto(problem, run, strategy, result.evaluations, log)
    _compare(problem, results, result.best, warm, initial, log)
    _save(problem, results, result.best, run, log)
    if config.heal_tokens:
        results.update(_heal(run, config.heal_tokens, log))
    kill_point("results")
    run.write_json("results.json", results)  # written last: marks the run finished
    log_summary(results, config, log)
    write_report(run.path, log)
    for line in held_out_verdict(results, config):  # the last word: held-out text
        log(line)
    return results


def _heal(run: RunDir, tokens: int, log) -> dict[str, Any]:
    """Heal ``RUN/model`` into ``RUN/healed``, the emitted model (a resumed run keeps the one
    it has), and summarise it for ``results.json``: ``healed`` (its path) and ``healing``."""
    from evosearch.healing import HEAL_DIR, HEAL_FILE, heal_run

    file = run.file(f"{HEAL_DIR}/{HEAL_FILE}")
    if file.is_file():
        record = read_json(file, "cannot read")
    else:
        record = heal_run(run.path, tokens, log=log)
    keys = ("tokens", "steps", "mode", "lr", "held_out_before", "held_out_after", "seconds")
    return {"healed": str(run.path / HEAL_DIR), "healing": {k: record.get(k) for k in keys}}


def _results(problem: Problem, result, storage: str, record, run: RunDir) -> dict[str, Any]:
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
        "selection": selection_summary(result.history),
        **run.totals(result.evaluations),  # the whole run, across resumes
        "dense_cache": {
            "seconds": round(problem.cache_seconds, 2),
            "teacher_bytes_per_token": problem.dense.teacher_bytes_per_token(),
            "prefix_bytes_per_token": problem.dense.prefix_bytes_per_token(),
        },
        "evaluations": result.evaluations,
    }


def selection_summary(history: list[dict]) -> dict[str, Any]:
    """The last generation's pooled elite estimate and final-stage flip rate
    (:func:`evosearch.engine.selection_stats`), and the flip rate's mean over generations."""
    if not history:
        return {}
    keys = ("elite_value", "elite_se", "elite_tokens", "flip_rate")
    out = {k: history[-1][k] for k in keys if k in history[-1]}
    rates = [h["flip_rate"] for h in history if h.get("flip_rate") is not None]
    if rates:
        out["flip_rate_mean"] = sum(rates) / len(rates)
    return out


def _compare(problem: Problem, results: dict, best: Genome, warm, initial, log) -> None:
    """Baselines, every candidate on all calibration tokens, and held-out perplexity."""
    config, space = problem.config, problem.space
    candidates = {config.strategy.name: best}
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
    if config.evaluation.ppl:
        results["perplexity"] = evaluate_candidates(problem, candidates, log)


def _save(problem: Problem, results: dict, best: Genome, run: RunDir, log) -> None:
    """The best model, saved into the run (with size and speed for shrinking spaces)."""
    if not problem.config.save_model:
        return
    saved: dict[str, Any] = {}  # a space's save may describe its export (bytes on disk...)

    def save(folder: str) -> None:
        described = problem.space.save(problem.model, problem.tokenizer, best, folder)
        saved.update(described if isinstance(described, dict) else {})

    save_complete(save, run.file("model"))
    results["model_dir"] = str(run.file("model"))
    if "file_bytes" in saved:  # a file format a runtime loads (quantization): time it
        from evosearch.jobs.models import export_latency

        keys = ("file_bytes", "quant_bytes", "bits_per_weight", "export_seconds")
        results["export"] = {k: saved[k] for k in keys if k in saved}
        if problem.tokenizer is not None:
            results["export"].update(
                export_latency(problem.config.model, run.file("model"), problem.tokenizer, log)
            )
    if problem.entry.shrinks:
        from evosearch.jobs.models import export_stats

        results["export"] = export_stats(problem.model, run.file("model"), log)
