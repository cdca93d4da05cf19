"""Strategy comparison on SmolLM2-135M layer drop, and multi-objective search over budgets.

    .venv/bin/python experiments/strategies/run.py --seeds 0,1,2

Part 1 (single objective, drop 7 of 30 blocks = 25%): EvoPress, TPE, NSGA-II and random
(Optuna's RandomSampler) at equal token budgets. Calibration is small (8 x 128 WikiText-2 valid
tokens) so that every strategy's best is measured on the same 1,024 tokens: Optuna strategies
score every candidate on all of them; EvoPress races 12 offspring on 256 tokens, then 2 survivors
and the parent on all 1,024. Both spend 6,144 tokens per generation.

Part 2 (multi-objective, KL and parameter count): multi-budget EvoPress on the budgets 3, 6, 9,
12, 15 (``drop_range=(3, 15, 3)``) and on all of 3..15, and NSGA-II on 3..15, vs the front formed
by five single-objective EvoPress runs at 3, 6, 9, 12, 15 blocks; every one spends the same
number of 6,144-token generations. Hypervolume against a fixed reference point, and whether each
front weakly dominates the single-objective one.
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
from evosearch.pareto import hypervolume, pareto_front
from evosearch.pipeline import run_search

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data"
STRATEGIES = ("evopress", "tpe", "nsga2", "optuna-random")


def curve(results: dict) -> list[dict]:
    """Best-so-far value at the end of each generation vs cumulative evaluations and tokens."""
    evals, tokens, out = 0, 0, []
    by_gen: dict[int, list[dict]] = {}
    for rec in results["evaluations"]:
        by_gen.setdefault(rec["generation"], []).append(rec)
    for h in results["history"]:
        recs = by_gen.get(h["generation"], [])
        evals += len(recs)
        tokens += sum(r["tokens"] for r in recs)
        out.append({"evaluations": evals, "tokens": tokens, "best": h["value"]})
    return out


def score_fronts(entry: dict, fronts: dict[str, list], reference) -> None:
    """Add each front's hypervolume and whether it weakly dominates ``fronts["single"]`` (every
    single-objective point matched or beaten in both objectives by one of its points)."""
    entry["reference"] = reference
    for name, front in fronts.items():
        entry[name]["hypervolume"] = hypervolume(front, reference)
        entry[name]["dominates_single"] = all(
            any(a <= x and b <= y for a, b in front) for x, y in fronts["single"]
        )


def base_config(data_dir: str, generations: int) -> SearchConfig:
    """The layer-drop settings every strategy of this benchmark shares (7 of 30 blocks)."""
    return SearchConfig.from_dict(
        dict(
            num_drop=7,
            generations=generations,
            offspring=12,
            initial_population=12,
            stages=((256, 2), (1024, 1)),
            data=str(Path(data_dir) / "wikitext-2-raw" / "wiki.valid.raw"),
            n_sequences=8,
            seq_len=128,
            save_model=False,
        )
    )


def strategy_config(base: SearchConfig, strategy: str, seed: int) -> SearchConfig:
    """``base`` for one strategy at equal tokens per generation: Optuna samplers score 6
    candidates on 1,024 tokens (EvoPress's 6,144 a generation); ``evopress-adaptive`` is
    EvoPress with ``adaptive_switches``."""
    if strategy == "evopress-adaptive":
        return dataclasses.replace(base, adaptive_switches=True, seed=seed)
    cfg = dataclasses.replace(base, strategy=strategy, seed=seed)
    if strategy != "evopress":
        cfg = dataclasses.replace(cfg, offspring=6, sampler_tokens=1024)
    return cfg


def mo_config(base: SearchConfig, generations: int, seed: int, **extra) -> SearchConfig:
    """The multi-objective layer-drop settings: KL vs parameters, ``generations`` + 1
    generations (``extra``: strategy, drop_range, ...)."""
    return dataclasses.replace(
        base,
        num_drop=None,
        objectives=("params",),
        generations=generations,
        seed=seed,
        **extra,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--generations", type=int, default=15)
    p.add_argument("--mo-generations", type=int, default=15)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument(
        "--part",
        choices=("all", "mo", "single"),
        default="all",
        help="mo: rerun only the multi-objective part, keeping the single-objective results "
        "already in --out; single: only the single-objective part",
    )
    p.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="single-objective strategies, a subset in order (evopress-adaptive: EvoPress "
        "with --adaptive-switches)",
    )
    p.add_argument(
        "--mo-fronts",
        default="evopress_grid,evopress,nsga2",
        help="multi-objective fronts to run, a subset in order (the single-objective runs at "
        "the five budgets always run)",
    )
    p.add_argument(
        "--adaptive-switches",
        action="store_true",
        help="multi-objective part: EvoPress (multi-budget and the five single runs) with "
        "--adaptive-switches; runs go to runs/adaptive/",
    )
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = base_config(args.data_dir, args.generations)
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, 2 cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU; other jobs shared the CPU",
        "status": "running",
        "single_objective": {},
        "multi_objective": {},
    }
    out = Path(args.out)
    runs = HERE / "runs"
    if args.part == "mo" and out.is_file():
        previous = json.loads(out.read_text())
        report["single_objective"] = previous["single_objective"]
        report["single_objective_command"] = previous["command"]
    for seed in seeds if args.part != "mo" else ():  # seed-major: partial runs compare all
        for strategy in args.strategies.split(","):
            cfg = strategy_config(base, strategy, seed)
            t0 = time.perf_counter()
            res = run_search(cfg, runs / f"{strategy}-s{seed}", resume=True, log=lambda s: None)
            report["single_objective"].setdefault(strategy, []).append(
                {
                    "seed": seed,
                    "curve": curve(res),
                    "best_kl": res["best"]["kl"],
                    "dropped_blocks": res["best"]["dropped_blocks"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(strategy, seed, res["best"]["kl"], flush=True)
    if args.part == "single":
        report["status"] = "complete"
        out.write_text(json.dumps(report, indent=1) + "\n")
        return
    # Part 2: multi-objective over budgets, all three at the same generations of 6,144 tokens.
    ks = (3, 6, 9, 12, 15)
    mo_gens = args.mo_generations
    if args.adaptive_switches:
        base = dataclasses.replace(base, adaptive_switches=True)
        runs = runs / "adaptive"
    fronts_to_run = args.mo_fronts.split(",")
    single_gens = max(0, (mo_gens + 1) // len(ks) - 1)
    for seed in seeds:
        entry: dict = {}
        fronts = {}
        for name, strategy, drop_range, extra in (
            ("evopress_grid", "evopress", (3, 15, 3), {}),  # the singles' five budgets
            ("evopress", "evopress", (3, 15), {}),  # all thirteen budgets
            ("nsga2", "nsga2", (3, 15), {"offspring": 6, "sampler_tokens": 1024}),
        ):
            if name not in fronts_to_run:
                continue
            mo = mo_config(base, mo_gens, seed, strategy=strategy, drop_range=drop_range, **extra)
            t0 = time.perf_counter()
            res = run_search(mo, runs / f"mo-{name}-s{seed}", resume=True, log=lambda s: None)
            front_file = runs / f"mo-{name}-s{seed}" / "pareto_front.json"
            rows = json.loads(front_file.read_text())["front"]
            fronts[name] = [(r["kl"], r["params"]) for r in rows]
            entry[name] = {
                "front": fronts[name],
                "dropped_blocks": [len(r["dropped_blocks"]) for r in rows],
                "tokens": sum(e["tokens"] for e in res["evaluations"]),
                "evaluations": len(res["evaluations"]),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        singles, so_tokens = [], 0
        for k in ks:
            cfg = dataclasses.replace(base, num_drop=k, generations=single_gens, seed=seed)
            r = run_search(cfg, runs / f"so-k{k}-s{seed}", resume=True, log=lambda s: None)
            singles.append((r["best"]["kl"], r["best"]["params"]))
            so_tokens += sum(e["tokens"] for e in r["evaluations"])  # resumed runs too
        fronts["single"] = [singles[i] for i in pareto_front(singles)]
        entry["single"] = {
            "front": fronts["single"],
            "generations_each": single_gens,
            "tokens": so_tokens,
        }
        # KL 8 nats, the dense parameter count
        score_fronts(entry, fronts, (8.0, res["pareto"]["reference"][1]))
        report["multi_objective"][str(seed)] = entry
        out.write_text(json.dumps(report, indent=1) + "\n")
    report["status"] = "complete"
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
