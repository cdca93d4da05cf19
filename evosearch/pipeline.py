"""The ``evosearch`` jobs under their historical module name (kept for scripts that import it).

The code lives in :mod:`evosearch.config` (:class:`SearchConfig`), :mod:`evosearch.problem`
(:class:`Problem`, the Ray :class:`WorkerRecipe`) and :mod:`evosearch.jobs`.
"""

from evosearch.config import RUNNER_FIELDS, SearchConfig
from evosearch.jobs.baselines import evaluate_candidates, run_baseline
from evosearch.jobs.models import (
    evaluate_perplexity,
    export_genome,
    export_stats,
    finetune,
    finetune_run,
    load_eval_data,
)
from evosearch.jobs.search import run_search
from evosearch.jobs.strategy import make_strategy
from evosearch.problem import Problem, WorkerRecipe, make_runner
from evosearch.validate import resolve_device

__all__ = [
    "RUNNER_FIELDS",
    "Problem",
    "SearchConfig",
    "WorkerRecipe",
    "evaluate_candidates",
    "evaluate_perplexity",
    "export_genome",
    "export_stats",
    "finetune",
    "finetune_run",
    "load_eval_data",
    "make_runner",
    "make_strategy",
    "resolve_device",
    "run_baseline",
    "run_search",
]
