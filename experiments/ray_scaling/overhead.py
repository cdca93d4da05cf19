"""Scheduling overhead of RayRunner: a fitness of known cost (a CPU-free sleep) evaluated by
1, 2, 4, 8, 16 workers on a local Ray instance. Workers reserve no CPU (num_cpus=0), so 16 fit
on a 2-core machine and the sleep, not the cores, is the bottleneck.

For n workers, each request holds ``k * n`` distinct genomes (k = 10 by default); ideal wall time
is ``k * cost``. Reported per n: achieved vs ideal throughput, scaling efficiency (ideal time /
achieved time) and overhead per evaluation, ``(n * wall / evaluations - cost)`` in ms:
the worker time each evaluation costs beyond the nominal fitness cost (it includes the sleep's own
overshoot on a loaded machine, reported separately as ``sleep_overshoot_ms_mean``). Requests of
a second size (``--long-per-worker``) split that into a fixed cost per request (dispatching the
first tasks, collecting the last) and a marginal cost per evaluation, from
``wall = fixed + k * (cost + marginal)`` fitted through the two sizes.

    .venv/bin/python experiments/ray_scaling/overhead.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import torch

from evosearch.evaluation import Batch
from evosearch.genome import Genome
from evosearch.runners import Outcome, RayRunner, RayRunnerConfig


class SleepEvaluator:
    """Stands in for an Evaluator: every evaluation costs exactly ``cost`` seconds of sleep."""

    def __init__(self, cost: float) -> None:
        self.cost = cost

    def outcome(self, genome: Genome, batch: Batch) -> Outcome:
        t0 = time.perf_counter()
        time.sleep(self.cost)
        return Outcome(float(sum(genome.levels)), None, time.perf_counter() - t0)


class SleepRecipe:
    def __init__(self, cost: float) -> None:
        self.cost = cost

    def __call__(self) -> SleepEvaluator:
        return SleepEvaluator(self.cost)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,4,8,16")
    p.add_argument("--cost", type=float, default=0.2, help="seconds per evaluation")
    p.add_argument("--per-worker", type=int, default=10, help="evaluations per worker per round")
    p.add_argument("--long-per-worker", type=int, default=30, help="the second request size")
    p.add_argument("--rounds", type=int, default=3, help="requests per worker count and size")
    p.add_argument("--in-flight", type=int, default=2)
    p.add_argument("--out", default="experiments/ray_scaling/overhead.json")
    args = p.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    batch = Batch((0,), torch.zeros(1, 1, dtype=torch.long))
    rows = []
    for n in [int(x) for x in args.workers.split(",")]:
        t0 = time.perf_counter()
        config = RayRunnerConfig(workers=n, num_cpus=0, in_flight=args.in_flight)
        with RayRunner(SleepRecipe(args.cost), config=config) as runner:
            startup = time.perf_counter() - t0
            list(runner.evaluate(None, [Genome((0,))] * n, batch))  # warm-up round trip
            walls, worker_seconds = [], []
            m = args.per_worker * n
            for r in range(args.rounds):
                genomes = [Genome((r, i % 36, i // 36)) for i in range(m)]
                t0 = time.perf_counter()
                outcomes = list(runner.evaluate(None, genomes, batch))
                walls.append(time.perf_counter() - t0)
                assert [o.value for o in outcomes] == [float(sum(g.levels)) for g in genomes]
                worker_seconds += [o.seconds for o in outcomes]
            long_walls = []
            for r in range(args.rounds):
                k = args.long_per_worker
                genomes = [Genome((r + 10, i % 36, i // 36)) for i in range(k * n)]
                t0 = time.perf_counter()
                list(runner.evaluate(None, genomes, batch))
                long_walls.append(time.perf_counter() - t0)
        wall = sorted(walls)[len(walls) // 2]  # median round
        ideal = args.per_worker * args.cost
        long_wall = sorted(long_walls)[len(long_walls) // 2]
        slope = (long_wall - wall) / (args.long_per_worker - args.per_worker)  # s per eval/worker
        fixed = wall - args.per_worker * slope
        row = {
            "workers": n,
            "evaluations_per_round": m,
            "rounds": args.rounds,
            "startup_s": round(startup, 2),
            "wall_s_median": round(wall, 4),
            "wall_s_all": [round(w, 4) for w in walls],
            "ideal_s": ideal,
            "throughput_eval_per_s": round(m / wall, 3),
            "ideal_throughput_eval_per_s": round(n / args.cost, 3),
            "efficiency": round(ideal / wall, 4),
            "overhead_ms_per_eval": round((n * wall / m - args.cost) * 1000, 2),
            # of which the sleep itself overshooting (measured on the workers), not scheduling
            "long_evaluations_per_round": args.long_per_worker * n,
            "long_wall_s_median": round(long_wall, 4),
            "long_efficiency": round(args.long_per_worker * args.cost / long_wall, 4),
            "fixed_ms_per_request": round(fixed * 1000, 1),
            "marginal_overhead_ms_per_eval": round((slope - args.cost) * 1000, 2),
            "sleep_overshoot_ms_mean": round(
                (sum(worker_seconds) / len(worker_seconds) - args.cost) * 1000, 2
            ),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    ray.shutdown()
    result = {
        "command": "python experiments/ray_scaling/overhead.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "cost_s": args.cost,
        "ray": ray.__version__,
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
        "rows": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
