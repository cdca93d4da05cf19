"""Strategy comparison on SmolLM2-135M per-layer unstructured sparsity (Wanda, 60 % average).

    .venv/bin/python experiments/strategies/run_sparsity.py --seeds 0,1,2 --generations 10

EvoPress, TPE, NSGA-II and random (Optuna's RandomSampler) search the same sparsity space
(210 block linears, level step 2 % of the mean layer, at most 4 levels from uniform, Wanda level
database) at equal token budgets, as the layer-drop comparison in ``run.py`` does: calibration is
8 x 128 WikiText-2 valid tokens, every strategy's best is measured on all 1,024 of them; EvoPress
races 12 offspring on 256 tokens, then 2 survivors and the parent on all 1,024; Optuna samplers
score 6 candidates a generation on all 1,024 (6,144 tokens a generation for every strategy).
Every strategy starts from the uniform 60 % allocation (EvoPress as its parent, Optuna samplers
as their first enqueued trial), so the curves measure improvement over uniform; with
``--warm-start`` the named heuristics' allocations join them.
Writes ``results_sparsity.json`` (``"status": "running"`` until every run finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from evosearch import SearchConfig
from evosearch.pipeline import run_search

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import DEFAULT_DATA, STRATEGIES, curve, strategy_config  # noqa: E402
from run import base_config as layer_drop_base  # noqa: E402


def base_config(
    data_dir: str, generations: int, db_dir: str | None, warm: tuple[str, ...] = ()
) -> SearchConfig:
    """The settings of this benchmark: Wanda levels around 60 %, with the layer-drop
    benchmark's loop, stages and calibration data (``run.base_config``); ``warm`` heuristics
    join the initial genomes and the baselines."""
    return dataclasses.replace(
        layer_drop_base(data_dir, generations),
        num_drop=None,
        space="sparsity",
        sparsity=0.6,
        pruner="wanda",
        level_step=0.02,
        max_level_shift=4,
        db_dir=db_dir,
        baselines=("uniform", *warm),
        warm_start=warm,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--db-dir", help="level databases (default: evosearch's cache)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results_sparsity.json"))
    p.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="a subset, in order; evopress-adaptive is EvoPress with --adaptive-switches",
    )
    p.add_argument(
        "--warm-start",
        default="",
        help="sparsity heuristics (owl, fisher) whose allocations join every strategy's "
        "initial genomes (EvoPress's population, the samplers' enqueued trials); runs go to "
        "runs_sparsity_warm-<names>/",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warm = tuple(w for w in args.warm_start.split(",") if w)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = base_config(args.data_dir, args.generations, args.db_dir, warm)
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, 2 cores, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, CPU; one other benchmark shared the CPU",
        "status": "running",
        "space": "sparsity 60 %, wanda, level_step 0.02, max_level_shift 4, 210 block linears",
        "warm_start": list(warm),
        "single_objective": {},
    }
    out = Path(args.out)
    runs = HERE / ("runs_sparsity" + (f"_warm-{'-'.join(warm)}" if warm else ""))
    for seed in seeds:
        for strategy in args.strategies.split(","):
            cfg = strategy_config(base, strategy, seed)
            t0 = time.perf_counter()
            res = run_search(cfg, runs / f"{strategy}-s{seed}", resume=True, log=lambda s: None)
            report["single_objective"].setdefault(strategy, []).append(
                {
                    "seed": seed,
                    "curve": curve(res),
                    "best_kl": res["best"]["kl"],
                    "uniform_kl": res["calibration_fitness"].get("uniform"),
                    **{f"{w}_kl": res["calibration_fitness"].get(w) for w in warm},
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(strategy, seed, res["best"]["kl"], flush=True)
    report["status"] = "complete"
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
