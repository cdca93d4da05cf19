"""Layer-drop benchmark on SmolLM2-135M: EvoPress search vs the published heuristics.

Run from the repository root (results land next to this file):

    .venv/bin/python experiments/layer_drop/run.py --drops 4,7,11

Calibration: WikiText-2 *valid* (../shared/data). Evaluation: WikiText-2 *test* and the C4 sample,
non-overlapping 1024-token windows from the start of each file (how many: see --eval-windows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evosearch import Problem, SearchConfig
from evosearch.engine import Evaluator, sample_batch
from evosearch.pipeline import run_search

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def prefix_speedup(config: SearchConfig, n: int = 8) -> dict:
    """Seconds per evaluation of ``n`` random genomes with and without prefix reuse."""
    session = Problem(config, lambda s: None)
    batch = sample_batch(session.data, config.stages[0].tokens, seed=0, generation=0, stage=0)
    rng = np.random.default_rng(123)
    genomes = [session.space.random_genome(rng) for _ in range(n)]
    out = {}
    for reuse in (False, True):
        ev = Evaluator(session.model, session.space, session.fitness, session.dense, reuse)
        ev.raw(genomes[0], batch)  # warm-up
        t0 = time.perf_counter()
        values = [ev.raw(g, batch) for g in genomes]
        out["with_reuse" if reuse else "full_forward"] = (time.perf_counter() - t0) / n
        out["values_with_reuse" if reuse else "values_full"] = values
    out["max_abs_diff"] = max(
        abs(a - b) for a, b in zip(out.pop("values_full"), out.pop("values_with_reuse"))
    )
    out["speedup"] = out["full_forward"] / out["with_reuse"]
    out["tokens_per_eval"] = batch.n_tokens
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--drops", default="4,7,11")
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--offspring", type=int, default=12)
    p.add_argument("--stages", default="512:2,4096:1")
    p.add_argument("--n-sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--sleb-tokens", type=int, default=1024)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument(
        "--warm-start",
        default="",
        help="heuristics whose choices join EvoPress's initial population",
    )
    p.add_argument("--baselines", default="shortgpt,angular,sleb,last,random")
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args()
    warm = tuple(x for x in args.warm_start.split(",") if x)
    SHARED = Path(args.data_dir)
    stages = [[int(x) for x in s.split(":")] for s in args.stages.split(",")]
    wiki_valid = str(SHARED / "wikitext-2-raw" / "wiki.valid.raw")
    wiki_test = str(SHARED / "wikitext-2-raw" / "wiki.test.raw")
    c4 = str(SHARED / "c4" / "c4_sample.jsonl")
    base = SearchConfig.from_dict(
        dict(
            num_drop=7,
            generations=args.generations,
            offspring=args.offspring,
            initial_population=args.offspring,
            stages=stages,
            data=wiki_valid,
            n_sequences=args.n_sequences,
            seq_len=args.seq_len,
            seed=0,
            baselines=tuple(args.baselines.split(",")),
            sleb_tokens=args.sleb_tokens,
            eval_ppl=(wiki_test, c4),
            eval_seq_len=1024,
            eval_windows=args.eval_windows,
            save_model=False,
            warm_start=warm,
        )
    )
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")},
        "status": "running",
        "runs": {},
    }
    out = Path(args.out)
    report["prefix_reuse"] = prefix_speedup(base)
    for k in [int(x) for x in args.drops.split(",")]:
        cfg = dataclasses.replace(base, num_drop=k)
        t0 = time.perf_counter()
        run_dir = HERE / "runs" / (f"drop{k}_warm" if warm else f"drop{k}")
        res = run_search(cfg, run_dir, resume=True)
        res.pop("evaluations")
        report["runs"][str(k)] = {
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "search_seconds": res["search_seconds"],
            "evaluations": res["n_evaluations"],
            "evaluations_per_second": res["evaluations_per_second"],
            "calibration_kl": res["calibration_fitness"],
            "dropped": res["baselines"],
            "wikitext2_test_ppl": {n: v[wiki_test] for n, v in res["perplexity"].items()},
            "c4_ppl": {n: v[c4] for n, v in res["perplexity"].items()},
            "teacher_bytes_per_token": res["dense_cache"]["teacher_bytes_per_token"],
        }
        out.write_text(json.dumps(report, indent=1) + "\n")
    report["status"] = "complete"
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
