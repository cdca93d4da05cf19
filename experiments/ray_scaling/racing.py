"""Token-sharded evaluation on Ray (issue 24, part 2): worker utilisation when EvoPress's real
racing pattern is replayed with a fitness whose cost is proportional to tokens.

The search is the real one (:func:`evosearch.engine.search`, :class:`EvoPress` on a 32-block
layer-drop space, 8 blocks dropped; 32 offspring raced on 2,048 tokens, the 2 survivors plus the
parent on 32,768 tokens; 64 sequences of 512 tokens). Only the fitness is a stand-in: it sleeps
``--seconds-per-token`` per token (CPU-free, so 16 workers fit this 2-core machine with
``num_cpus=0`` and the benchmark measures scheduling, not the CPU) and returns a deterministic
per-sequence value whose sums are exact in floating point, so a sharded evaluation must return
the very same numbers as an in-process one.

Utilisation = ideal work / (workers x search wall time), where ideal work = evaluated tokens x
seconds per token: the share of the pool's time spent on fitness work. Worker start-up is not
counted.

    python experiments/ray_scaling/racing.py     # writes racing.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import time

import numpy as np
import torch
from torch import nn

from evosearch.data import TokenData
from evosearch.engine import Evaluator, search
from evosearch.evaluation import Batch, Candidate
from evosearch.runners import InProcessRunner, RayRunner, RayRunnerConfig
from evosearch.strategies import EvoPress, EvoPressConfig, Stage
from search_spaces import LayerDropSpace

N_BLOCKS, N_DROP = 32, 8
SEQ_LEN, N_SEQUENCES = 512, 64


class TokenCostFitness:
    """A stand-in additive fitness: ``seconds_per_token`` of sleep per token, and a value that
    depends on the dropped blocks plus per-sequence noise, in multiples of 2^-10 (exact sums)."""

    name = "kl"
    direction = "minimize"
    additive = True
    micro_batch = 1

    def __init__(self, seconds_per_token: float, *, sleep: bool = True) -> None:
        self.seconds_per_token = seconds_per_token
        self.sleep = sleep
        self.weights = np.random.default_rng(7).uniform(0.0, 1.0, N_BLOCKS)

    def prepare(self, model, input_ids, dense) -> None:
        """Nothing to cache."""

    def row_value(self, genome, row: int) -> float:
        digest = hashlib.blake2b(f"{genome.key()}|{row}".encode(), digest_size=2).digest()
        noise = int.from_bytes(digest, "little") / 2**16  # in [0, 1)
        dropped = sum(self.weights[i] for i, v in enumerate(genome.levels) if v)
        return round((dropped + 0.3 * noise) * 1024) / 1024

    def partial(self, candidate: Candidate, batch: Batch) -> tuple[float, float]:
        if self.sleep:
            time.sleep(batch.n_tokens * self.seconds_per_token)
        seq_len = batch.input_ids.shape[1]
        total = sum(self.row_value(candidate.genome, r) * seq_len for r in batch.indices)
        return total, batch.n_tokens

    def reduce(self, total: float, count: float) -> float:
        return total / count

    def __call__(self, candidate: Candidate, batch: Batch) -> float:
        return self.reduce(*self.partial(candidate, batch))


class ReplaySpace(LayerDropSpace):
    """The layer-drop space, materialising nothing (the stand-in fitness needs no model)."""

    def replacements(self, model, genome) -> dict:
        return {}


def make_evaluator(seconds_per_token: float, *, sleep: bool = True) -> Evaluator:
    space = ReplaySpace(N_BLOCKS, num_drop=N_DROP)
    fitness = TokenCostFitness(seconds_per_token, sleep=sleep)
    return Evaluator(nn.Linear(1, 1), space, fitness, dtype="float32")


class Recipe:
    """What every Ray worker builds once: the stand-in evaluator."""

    def __init__(self, seconds_per_token: float) -> None:
        self.seconds_per_token = seconds_per_token

    def __call__(self) -> Evaluator:
        return make_evaluator(self.seconds_per_token)


def run_search(args, runner=None, *, sleep: bool = True) -> dict:
    """One replayed search; its trajectory, evaluated tokens and wall time."""
    evaluator = make_evaluator(args.seconds_per_token, sleep=sleep)
    config = EvoPressConfig(
        generations=args.generations,
        offspring=32,
        initial_population=32,
        stages=(Stage(tokens=2048, survivors=2), Stage(tokens=32768, survivors=1)),
    )
    strategy = EvoPress(evaluator.space, config=config, rng=np.random.default_rng(args.seed))
    data = TokenData(torch.zeros(N_SEQUENCES, SEQ_LEN, dtype=torch.long), "replay")
    result = search(strategy, evaluator, data, seed=args.seed, progress=None, runner=runner)
    return {
        "best": result.best.key(),
        "best_value": result.best_value,
        "history": [h["value"] for h in result.history],
        "values": [r["value"] for r in result.evaluations],
        "tokens": result.tokens,
        "evaluations": result.n_evaluations,
        "wall_s": result.seconds,
        "worker_busy_s": sum(r["seconds"] for r in result.evaluations),
    }


def measure(args, runner, reference: dict, n: int, shard: bool, startup: float) -> dict:
    """One replayed search on ``runner``: utilisation and agreement with in process."""
    load = os.getloadavg()
    got = run_search(args, runner)
    ideal = got["tokens"] * args.seconds_per_token
    same = all(got[k] == reference[k] for k in reference if k not in ("wall_s", "worker_busy_s"))
    return {
        "workers": n,
        "shard": shard,
        "utilisation": ideal / (n * got["wall_s"]),
        "worker_busy_share": got["worker_busy_s"] / (n * got["wall_s"]),
        "wall_s": got["wall_s"],
        "ideal_wall_s": ideal / n,
        "evaluations": got["evaluations"],
        "tokens": got["tokens"],
        "same_as_in_process": same,
        "sharded_requests": runner.sharded,
        "startup_s": startup,
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="4,8,16")
    p.add_argument("--seconds-per-token", type=float, default=1e-4)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/ray_scaling/racing.json")
    args = p.parse_args()
    import ray

    reference = run_search(args, InProcessRunner(), sleep=False)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    rows = []
    for n in [int(x) for x in args.workers.split(",")]:
        config = RayRunnerConfig(workers=n, num_cpus=0, torch_threads=1)
        t0 = time.perf_counter()
        with RayRunner(Recipe(args.seconds_per_token), config=config) as runner:
            startup = time.perf_counter() - t0
            for shard in (False, True):  # one pool for both: start-up is slow on busy cores
                runner.config = dataclasses.replace(config, shard=shard)
                rows.append(measure(args, runner, reference, n, shard, startup))
                print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    result = {
        "command": "python experiments/ray_scaling/racing.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "pattern": "EvoPress, 32 offspring on 2048 tokens, 2 survivors + parent on 32768",
        "in_process": {k: reference[k] for k in ("best", "best_value", "history", "tokens")},
        "ray": ray.__version__,
        "machine": f"{os.cpu_count()} CPUs shared with other jobs, {platform.platform()}",
        "rows": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
