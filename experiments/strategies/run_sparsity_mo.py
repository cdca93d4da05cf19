"""Multi-objective per-layer sparsity on SmolLM2-135M: KL vs density over 50..70 % (Wanda).

    .venv/bin/python experiments/strategies/run_sparsity_mo.py --seeds 0 --generations 14

One multi-budget EvoPress run (``--sparsity-range 0.5,0.7`` with level step 0.05: five budgets,
50, 55, 60, 65, 70 %) and one NSGA-II run over the same range, against the front of five
single-objective EvoPress runs at those five sparsities (each on its own level database). The
multi-budget runs spend ``generations + 1`` generations; each single run ``(generations + 1) / 5``
generations, so all three spend the same number of generations of the same token budget
(EvoPress: 12 offspring on 256 tokens, then 2 survivors and the parent on all 1,024 calibration
tokens; NSGA-II: 6 candidates on 1,024). Hypervolume against (KL 8, density 1 = dense), and
whether each front weakly dominates the single-objective one. Writes
``results_sparsity_mo.json``.
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
from evosearch.pareto import pareto_front
from evosearch.pipeline import run_search

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import DEFAULT_DATA, score_fronts  # noqa: E402
from run import base_config as layer_drop_base  # noqa: E402

TARGETS = (0.5, 0.55, 0.6, 0.65, 0.7)


def base_config(data_dir: str, generations: int, db_dir: str | None) -> SearchConfig:
    """The multi-budget settings of this benchmark: Wanda levels over 50..70 %, with the
    layer-drop benchmark's loop, stages and calibration data (``run.base_config``)."""
    return dataclasses.replace(
        layer_drop_base(data_dir, generations),
        num_drop=None,
        space="sparsity",
        pruner="wanda",
        level_step=0.05,
        max_level_shift=4,
        db_dir=db_dir,
        sparsity_range=(0.5, 0.7),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0")
    p.add_argument("--generations", type=int, default=14)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--db-dir", help="level databases (default: evosearch's cache)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results_sparsity_mo.json"))
    p.add_argument(
        "--adaptive-switches",
        action="store_true",
        help="EvoPress (multi-budget and the single runs) with adaptive_switches",
    )
    p.add_argument(
        "--offset-steps",
        action="store_true",
        help="multi-budget EvoPress with offset_steps (the single runs are unchanged)",
    )
    p.add_argument("--no-nsga2", action="store_true", help="skip the NSGA-II front")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = base_config(args.data_dir, args.generations, args.db_dir)
    base = dataclasses.replace(base, adaptive_switches=args.adaptive_switches)
    tag = "-adaptive" if args.adaptive_switches else ""
    mb_tag = tag + ("-offset" if args.offset_steps else "")
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, 2 cores, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, CPU; other benchmarks shared the CPU",
        "status": "running",
        "targets": TARGETS,
        "runs": {},
    }
    out = Path(args.out)
    runs = HERE / "runs_sparsity_mo"
    single_gens = max(0, (args.generations + 1) // len(TARGETS) - 1)
    for seed in (int(s) for s in args.seeds.split(",")):
        entry: dict = {}
        fronts = {}
        for name, strategy, extra in (
            ("evopress", "evopress", {"offset_steps": args.offset_steps}),
            (
                "nsga2",
                "nsga2",
                {"offspring": 6, "sampler_tokens": 1024, "adaptive_switches": False},
            ),
        )[: 1 if args.no_nsga2 else 2]:
            cfg = dataclasses.replace(base, strategy=strategy, seed=seed, **extra)
            t0 = time.perf_counter()
            run_dir = runs / f"mo-{name}{mb_tag if name == 'evopress' else ''}-s{seed}"
            res = run_search(cfg, run_dir, resume=True, log=print)
            rows = json.loads((run_dir / "pareto_front.json").read_text())
            fronts[name] = [(r["kl"], r["density"]) for r in rows["front"]]
            entry[name] = {
                "front": fronts[name],
                "tokens": sum(e["tokens"] for e in res["evaluations"]),
                "evaluations": len(res["evaluations"]),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        singles, tokens = [], 0
        for target in TARGETS:
            cfg = dataclasses.replace(
                base,
                sparsity=target,
                sparsity_range=None,
                objectives=(),
                generations=single_gens,
                seed=seed,
                baselines=("uniform",),
            )
            r = run_search(cfg, runs / f"so-{target}{tag}-s{seed}", resume=True, log=print)
            singles.append((r["best"]["kl"], r["best"]["density"]))
            tokens += sum(e["tokens"] for e in r["evaluations"])  # resumed runs too
            entry.setdefault("uniform", []).append(
                (r["calibration_fitness"]["uniform"], r["best"]["density"])
            )
        fronts["single"] = [singles[i] for i in pareto_front(singles)]
        entry["single"] = {"front": fronts["single"], "tokens": tokens}
        entry["single"]["generations_each"] = single_gens
        score_fronts(entry, fronts, (8.0, 1.0))  # KL 8 nats, the dense model's density
        report["runs"][str(seed)] = entry
        out.write_text(json.dumps(report, indent=1) + "\n")
    report["status"] = "complete"
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
