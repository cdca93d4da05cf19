"""Search throughput (evaluations/s) on the real SmolLM2-135M: in process, and on 1 and 2 Ray
workers of a local Ray instance. Same search (same seed, budget and data) each time, so the
evaluations are the same; only where they run changes.

Thread settings: the in-process run uses ``--driver-threads`` torch threads; each Ray worker
reserves 1 CPU and runs 1 torch thread (RayRunnerConfig.threads). evaluations/s counts the
search loop only; worker start-up (loading the model in each worker) is reported apart.

    .venv/bin/python experiments/ray_scaling/throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from evosearch import SearchConfig
from evosearch.pipeline import run_search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="inprocess,ray:1,ray:2")
    p.add_argument("--data", default="/work/shared/data/c4/c4_sample.jsonl")
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--offspring", type=int, default=8)
    p.add_argument("--stages", default="256:2,1024:1")
    p.add_argument("--n-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--driver-threads", type=int, default=2)
    p.add_argument("--out", default="experiments/ray_scaling/throughput.json")
    args = p.parse_args()
    torch.set_num_threads(args.driver_threads)
    stages = [[int(x) for x in s.split(":")] for s in args.stages.split(",")]
    rows = []
    for spec in args.runs.split(","):
        runner, _, workers = spec.partition(":")
        config = SearchConfig.from_dict(
            dict(
                model="smollm2-135m",
                num_drop=7,
                data=args.data,
                n_sequences=args.n_sequences,
                seq_len=args.seq_len,
                generations=args.generations,
                offspring=args.offspring,
                initial_population=args.offspring,
                stages=stages,
                save_model=False,
                runner=runner,
                workers=int(workers or 1),
                worker_cpus=1.0,
            )
        )
        out = tempfile.mkdtemp(prefix="esray_tp_")
        lines: list[str] = []

        def log(message: str, lines=lines) -> None:
            lines.append(message)
            print(message, flush=True)

        t0 = time.perf_counter()
        try:
            results = run_search(config, out, log=log)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        startup = [m for m in lines if m.startswith("ray:")]
        rows.append(
            {
                "runner": runner,
                "workers": config.runner.ray.workers if runner == "ray" else 0,
                "torch_threads": args.driver_threads if runner == "inprocess" else 1,
                "n_evaluations": results["n_evaluations"],
                "tokens": results["tokens"],
                "search_seconds": results["search_seconds"],
                "evaluations_per_second": results["evaluations_per_second"],
                "total_seconds": round(time.perf_counter() - t0, 1),
                "ray_startup": startup[0] if startup else None,
                "best": results["best"]["genome"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": "python experiments/ray_scaling/throughput.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": f"{os.cpu_count()} CPUs; another benchmark was running concurrently",
        "rows": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
