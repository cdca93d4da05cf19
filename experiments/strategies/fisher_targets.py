"""Calibration KL of the Fisher allocation against uniform at several sparsities, no search.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/strategies/fisher_targets.py \\
        --targets 0.5,0.7 --seed 0 --data-dir ../shared/data --db-dir /tmp/leveldb

The space and calibration of ``run_sparsity.py`` (its ``base_config``: Wanda, level step 2 %, at
most 4 levels from uniform, 8 x 128 WikiText-2 valid tokens), at other targets; KL on all 1,024
tokens. Writes ``results_fisher_targets.json``.
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

from evosearch import Problem
from search_spaces.sparsity_baselines import fisher

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import DEFAULT_DATA  # noqa: E402
from run_sparsity import base_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", default="0.5,0.7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--db-dir", help="level databases (default: evosearch's cache)")
    p.add_argument("--out", default=str(HERE / "results_fisher_targets.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, 2 cores, 1 torch thread, torch {torch.__version__}",
        "seed": args.seed,
        "targets": {},
    }
    for target in (float(t) for t in args.targets.split(",")):
        config = dataclasses.replace(
            base_config(args.data_dir, 0, args.db_dir), sparsity=target, seed=args.seed
        )
        session = Problem(config, print)
        evaluator, batch = session.evaluator(), session.full_batch()
        t0 = time.perf_counter()
        genome = fisher(session.space, session.model, session.data.input_ids)[0]
        seconds = time.perf_counter() - t0
        report["targets"][str(target)] = {
            "uniform_kl": evaluator(session.space.uniform_genome(), batch)[0],
            "fisher_kl": evaluator(genome, batch)[0],
            "fisher_seconds": round(seconds, 1),
            "genome": genome.key(),
        }
        print(target, report["targets"][str(target)], flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
