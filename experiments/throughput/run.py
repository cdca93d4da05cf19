"""Evaluation throughput and ranking fidelity, old evaluator against new (issue 24, part 1).

Old: float32 forwards, KL over the full vocabulary with the teacher's logits recomputed by a
second LM-head pass (``compute_dense_cache(dtype="float32")``, ``KLDivergence(top_k=None)``).
New: ``compute_dense_cache(dtype="auto")`` (bf16 on this CPU) and ``KLDivergence(top_k=K)``.

Two parts, on SmolLM2-135M calibrated on WikiText-2 *valid*, one torch thread:

* ``speed``: seconds per evaluation of old and new on fresh random genomes, alternating A/B,
  B/A in one process (so background load hits both alike); median per path and the median of
  the per-pair ratios, in wall time (taken on shared cores: an upper bound of the idle time)
  and in process CPU time (one torch thread: the time the evaluation keeps a core busy, much
  less sensitive to other jobs).
* ``reuse``: parent hidden-state reuse (``Evaluator(parent_reuse=...)``) off against on, both
  on the new path: offspring made from one parent by EvoPress's own mutation (level switches,
  ``min(U{1..3}, U{1..3})`` of them, feasible for the space), each offspring timed once with
  and once without reuse, alternating which goes first; the parent's levels are restored
  (untimed) before each timing, so both pay the same level swaps.
* ``ranking``: 100 random genomes per space; each genome's student forward is run once in
  float32 (scored by the old fitness) and once in the new dtype, scored there by the KL over the
  full vocabulary, top-256 and top-1024; each is compared with the old fitness (float32, full
  vocabulary): Spearman correlation, same best candidate, overlap of the top-5 sets.

    python experiments/throughput/run.py speed --n-sequences 8 --pairs 6
    python experiments/throughput/run.py ranking --space layer-drop --n-sequences 2
    python experiments/throughput/run.py reuse --spaces sparsity --n-sequences 8 --pairs 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evosearch.data import DataSpec, load_token_data
from evosearch.engine import Evaluator
from evosearch.evaluation import Batch, Candidate
from evosearch.forward import compute_dense_cache, compute_dtype, model_device, resolve_dtype
from evosearch.models import load_model
from evosearch.surgery import apply_replacements
from fitness.kl import KLDivergence

HERE = Path(__file__).resolve().parent
# WikiText-2 valid beside the checkout (never the test split)
DATA = HERE.parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
MODEL = "smollm2-135m"  # --model: any local checkpoint of a supported family


def load(n_sequences: int, seq_len: int):
    """The model, tokenizer and calibration tokens (random windows of WikiText-2 valid)."""
    model, tokenizer = load_model(MODEL)
    spec = DataSpec(source=str(DATA), n_sequences=n_sequences, seq_len=seq_len, seed=0)
    return model, load_token_data(spec, tokenizer).input_ids


def build_space(name: str, model, input_ids: torch.Tensor):
    """Layer drop (7 of 30 blocks) or per-layer sparsity (60 %, Wanda level database)."""
    if name == "layer-drop":
        from search_spaces import LayerDropSpace
        from search_spaces.layer_drop import param_counts

        return LayerDropSpace(30, num_drop=7, counts=param_counts(model))
    from search_spaces.sparsity import SparsityConfig, SparsitySpace

    config = SparsityConfig(sparsity=0.6, pruner="wanda")
    return SparsitySpace.build(model, input_ids, config, log=lambda s: None)


def evaluator(model, space, input_ids, *, dtype, top_k, parent_reuse=True) -> Evaluator:
    """An evaluator with its own dense cache and KL fitness in the given settings."""
    dense = compute_dense_cache(model, input_ids, dtype=dtype)
    kl = KLDivergence(top_k=top_k)
    kl.prepare(model, input_ids, dense)
    return Evaluator(model, space, kl, dense, parent_reuse=parent_reuse)


def mutant(space, parent, rng):
    """An offspring of ``parent`` as EvoPress makes it (``max_switches=3``), feasible."""
    from evosearch.operators import level_switch_mutation, number_of_switches

    feasible = getattr(space, "is_feasible", lambda g: True)
    while True:
        child = level_switch_mutation(parent, space.spec, rng, number_of_switches(rng, 3))
        if child != parent and feasible(child):
            return child


def reuse(args) -> dict:
    """Offspring of one parent, evaluated with parent reuse off and on, alternating."""
    model, ids = load(args.n_sequences, args.seq_len)
    batch = Batch(tuple(range(ids.shape[0])), ids)
    out = {}
    for name in args.spaces.split(","):
        space = build_space(name, model, ids)
        on = evaluator(model, space, ids, dtype=args.dtype, top_k=args.top_k)
        off = Evaluator(model, space, on.fitness, on.dense, parent_reuse=False)
        paths = {"off": off, "on": on}
        rng = np.random.default_rng(args.seed)
        parent = space.random_genome(rng)
        on.reuse_parents([parent], batch)
        parent_value = on.raw(parent, batch)  # keeps its states (and warms up)
        times, cpu, values = {"off": [], "on": []}, {"off": [], "on": []}, {"off": [], "on": []}
        starts, loads = [], [loadavg()]
        for i in range(args.pairs):
            child = mutant(space, parent, rng)
            starts.append(space.first_difference(child, parent))
            for path in ("off", "on") if i % 2 == 0 else ("on", "off"):
                space.replacements(model, parent)  # back to the parent's levels, untimed
                t0, c0 = time.perf_counter(), time.process_time()
                values[path].append(paths[path].raw(child, batch))
                times[path].append(time.perf_counter() - t0)
                cpu[path].append(time.process_time() - c0)
            loads.append(loadavg())
            now = {k: (round(times[k][-1], 2), round(cpu[k][-1], 2)) for k in times}
            print(name, i, "start", starts[-1], "(wall, cpu)", now, loads[-1], flush=True)
        out[name] = {
            "parent": parent.key(),
            "parent_value": parent_value,
            "first_difference_blocks": starts,
            "values_identical": values["off"] == values["on"],
            "speedup_cpu_median_of_pair_ratios": float(
                np.median([o / n for o, n in zip(cpu["off"], cpu["on"])])
            ),
            "speedup_wall_median_of_pair_ratios": float(
                np.median([o / n for o, n in zip(times["off"], times["on"])])
            ),
            "cpu_seconds_per_eval_median": {k: float(np.median(v)) for k, v in cpu.items()},
            "seconds_per_eval_median": {k: float(np.median(v)) for k, v in times.items()},
            "cpu_seconds_all": cpu,
            "seconds_all": times,
            "values": values,
            "parent_states_bytes": sum(s.nbytes for _, s in on._states.values()),
            "loadavg_after_each_pair": loads,
        }
    return out


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def speed(args) -> dict:
    """Old and new evaluator, alternating on distinct random genomes, per space."""
    model, ids = load(args.n_sequences, args.seq_len)
    batch = Batch(tuple(range(ids.shape[0])), ids)
    out = {}
    for name in args.spaces.split(","):
        space = build_space(name, model, ids)
        paths = {
            "old": evaluator(model, space, ids, dtype="float32", top_k=None),
            "new": evaluator(model, space, ids, dtype=args.dtype, top_k=args.top_k),
        }
        rng = np.random.default_rng(args.seed)
        paths["new"].raw(space.random_genome(rng), batch)  # warm-up (allocator, level swap)
        times = {"old": [], "new": []}
        cpu = {"old": [], "new": []}  # process CPU seconds: what the evaluation cost the core
        loads = [loadavg()]
        for i in range(args.pairs):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            for path in order:  # a fresh genome each time: both pay the same level swaps
                genome = space.random_genome(rng)
                t0, c0 = time.perf_counter(), time.process_time()
                paths[path].raw(genome, batch)
                times[path].append(time.perf_counter() - t0)
                cpu[path].append(time.process_time() - c0)
            loads.append(loadavg())
            now = {k: (round(times[k][-1], 2), round(cpu[k][-1], 2)) for k in times}
            print(name, i, "(wall, cpu)", now, loads[-1], flush=True)
        ratios = [o / n for o, n in zip(times["old"], times["new"])]
        med = {k: float(np.median(v)) for k, v in times.items()}
        cpu_med = {k: float(np.median(v)) for k, v in cpu.items()}
        out[name] = {
            "cpu_seconds_per_eval_median": cpu_med,
            "evals_per_cpu_s": {k: 1 / v for k, v in cpu_med.items()},
            "speedup_cpu_median_of_pair_ratios": float(
                np.median([o / n for o, n in zip(cpu["old"], cpu["new"])])
            ),
            "cpu_seconds_all": cpu,
            "seconds_per_eval_median": med,
            "evals_per_s": {k: 1 / v for k, v in med.items()},
            "speedup_median_of_pair_ratios": float(np.median(ratios)),
            "speedup_of_medians": med["old"] / med["new"],
            "seconds_all": times,
            "loadavg_after_each_pair": loads,
        }
    return out


class SharedForward(Candidate):
    """A candidate whose final hidden states are computed once per micro batch and reused by
    every fitness variant scored on it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._memo: dict[str, torch.Tensor] = {}

    def final_hidden(self, batch: Batch) -> torch.Tensor:
        key = batch.key()
        if key not in self._memo:
            self._memo[key] = super().final_hidden(batch)
        return self._memo[key]


def ranking(args) -> dict:
    """Every KL variant of 100 random genomes, against the old fitness."""
    model, ids = load(args.n_sequences, args.seq_len)
    batch = Batch(tuple(range(ids.shape[0])), ids)
    space = build_space(args.space, model, ids)
    device = model_device(model)
    new_dtype = resolve_dtype(args.dtype, device)
    dtypes = {"float32": torch.float32, str(new_dtype).removeprefix("torch."): new_dtype}
    ks = {"float32": (None,), str(new_dtype).removeprefix("torch."): (None, 256, 1024)}
    variants = {}  # (dtype name, k) -> (dense, fitness)
    for dname, dtype in dtypes.items():
        dense = compute_dense_cache(model, ids, dtype=dtype)
        for k in ks[dname]:
            kl = KLDivergence(top_k=k)
            kl.prepare(model, ids, dense)
            variants[(dname, k)] = (dense, kl)
    rng = np.random.default_rng(args.seed)
    genomes = [space.random_genome(rng) for _ in range(args.candidates)]
    values = {key: [] for key in variants}
    t0 = time.perf_counter()
    for i, genome in enumerate(genomes):
        start = space.start_block(genome)
        with apply_replacements(model, space.replacements(model, genome)):
            for dname, dtype in dtypes.items():
                dense = variants[(dname, None)][0]
                candidate = SharedForward(model, genome, start, dense)
                with compute_dtype(device, dtype):
                    for k in ks[dname]:
                        values[(dname, k)].append(variants[(dname, k)][1](candidate, batch))
        if i % 10 == 9:
            print(
                f"{i + 1}/{len(genomes)} {time.perf_counter() - t0:.0f}s {loadavg()}", flush=True
            )
    reference = values[("float32", None)]
    new = list(dtypes)[-1]
    return {
        "space": args.space,
        "genomes": [g.key() for g in genomes],
        "values": {f"{d}/{'full' if k is None else f'top{k}'}": v for (d, k), v in values.items()},
        "against_old": {
            f"{d}/{'full' if k is None else f'top{k}'}": agreement(reference, v)
            for (d, k), v in values.items()
        },
        "topk_against_full_same_dtype": {
            f"top{k}": agreement(values[(new, None)], values[(new, k)]) for k in (256, 1024)
        },
        "cache_bytes_per_token": {
            "top256": variants[(new, 256)][1].teacher_bytes_per_token(),
            "top1024": variants[(new, 1024)][1].teacher_bytes_per_token(),
            "final_hidden_fp32": variants[("float32", None)][0].teacher_bytes_per_token(),
            "full_logits_fp32": 4 * model.config.vocab_size,
        },
        "seconds": time.perf_counter() - t0,
    }


def agreement(reference: list[float], values: list[float]) -> dict:
    """Spearman correlation, same best (lowest) candidate, and top-5 overlap."""
    from scipy.stats import spearmanr

    ref, val = np.asarray(reference), np.asarray(values)
    top = set(np.argsort(ref)[:5].tolist()), set(np.argsort(val)[:5].tolist())
    return {
        "spearman": float(spearmanr(ref, val).statistic),
        "same_best": int(np.argmin(ref)) == int(np.argmin(val)),
        "top5_overlap": len(top[0] & top[1]),
        "max_abs_diff": float(np.max(np.abs(ref - val))),
        "mean_rel_diff": float(np.mean(np.abs(ref - val) / np.abs(ref))),
    }


def main() -> None:
    global MODEL, DATA
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["speed", "ranking", "reuse"])
    p.add_argument("--spaces", default="layer-drop,sparsity", help="speed, reuse: spaces")
    p.add_argument("--space", default="layer-drop", help="ranking: the space")
    p.add_argument("--n-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--pairs", type=int, default=6, help="speed, reuse: A/B pairs per space")
    p.add_argument("--candidates", type=int, default=100, help="ranking: random genomes")
    p.add_argument("--dtype", default="auto", help="the new path's compute dtype")
    p.add_argument("--top-k", type=int, default=256, help="speed: the new path's top-k")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=MODEL, help="model to measure (a local checkpoint)")
    p.add_argument("--data", default=str(DATA), help="calibration text (not a test split)")
    args = p.parse_args()
    MODEL, DATA = args.model, Path(args.data)
    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), loadavg()
    result = {"speed": speed, "ranking": ranking, "reuse": reuse}[args.part](args)
    result.update(
        command="python " + " ".join(sys.argv),
        machine=f"{os.cpu_count()} CPUs (shared with other jobs), {platform.platform()}",
        torch=torch.__version__,
        threads=args.threads,
        new_dtype=str(resolve_dtype(args.dtype, torch.device("cpu"))),
        loadavg_start=load0,
        loadavg_end=loadavg(),
        wall_s=round(time.perf_counter() - t0, 1),
        note="absolute times are taken on shared cores: upper bounds of the idle-machine time",
    )
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
