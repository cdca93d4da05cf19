"""Per-layer sparsity benchmark on SmolLM2-135M: EvoPress search vs uniform and OWL allocations.

Run from the repository root (results land next to this file):

    .venv/bin/python experiments/sparsity/run.py

For every base pruner (Wanda, SparseGPT) and average sparsity (50, 60, 70 %): build (or reuse)
the level database, search, compute the uniform and OWL (grid-searched M, lambda) allocations,
and report WikiText-2 test and C4 perplexity of all three; at the zero-shot sparsity also the
zero-shot accuracy on the first ``--zero-shot-limit`` items of ARC-Easy, PIQA, HellaSwag and
WinoGrande. Calibration: WikiText-2 *valid*. Each finished configuration is kept in
``runs/<name>/results.json``, so a killed benchmark resumes at the next configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from evosearch import Problem, SearchConfig
from evosearch.genome import Genome
from evosearch.pipeline import run_search
from evosearch.surgery import apply_replacements

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data"  # ../shared/data beside the checkout
TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pruners", default="wanda,sparsegpt")
    p.add_argument("--targets", default="0.5,0.6,0.7")
    p.add_argument("--generations", default="0.5:8,0.6:8,0.7:16", help="per target")
    p.add_argument("--offspring", type=int, default=8)
    p.add_argument("--stages", default="512:2,2048:1")
    p.add_argument("--n-sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--level-step", type=float, default=0.02)
    p.add_argument("--max-level-shift", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--zero-shot-target", type=float, default=0.7)
    p.add_argument("--zero-shot-limit", type=int, default=100)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--db-dir", default=None, help="level databases (default: the cache)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir)
    gens = {float(t): int(g) for t, g in (x.split(":") for x in args.generations.split(","))}
    stages = [tuple(int(v) for v in s.split(":")) for s in args.stages.split(",")]
    results = {}
    for pruner in args.pruners.split(","):
        for target in (float(t) for t in args.targets.split(",")):
            name = f"{pruner}_{round(target * 100)}"
            out = HERE / "runs" / name
            done = out / "benchmark.json"
            if done.is_file():
                results[name] = json.loads(done.read_text())
                print(f"{name}: kept from an earlier run", flush=True)
                continue
            config = SearchConfig.from_dict(
                dict(
                    space="sparsity",
                    sparsity=target,
                    pruner=pruner,
                    level_step=args.level_step,
                    max_level_shift=args.max_level_shift,
                    db_dir=args.db_dir,
                    data=str(data / "wikitext-2-raw" / "wiki.valid.raw"),
                    n_sequences=args.n_sequences,
                    seq_len=args.seq_len,
                    generations=gens[target],
                    offspring=args.offspring,
                    initial_population=args.offspring,
                    stages=stages,
                    baselines=("uniform", "owl"),
                    eval_ppl=(
                        str(data / "wikitext-2-raw" / "wiki.test.raw"),
                        str(data / "c4" / "c4_sample.jsonl"),
                    ),
                    eval_windows=args.eval_windows,
                    save_model=False,
                    device="cpu",
                )
            )
            t0 = time.perf_counter()
            res = run_search(config, out, log=lambda m, n=name: print(f"[{n}] {m}", flush=True))
            entry = {
                "pruner": pruner,
                "target": target,
                "settings": {
                    "generations": gens[target],
                    "offspring": args.offspring,
                    "stages": args.stages,
                    "calibration": f"{args.n_sequences} x {args.seq_len} tokens, wiki.valid",
                    "level_step": args.level_step,
                    "max_level_shift": args.max_level_shift,
                    "eval_windows": args.eval_windows,
                    "threads": args.threads,
                },
                "wall_seconds": round(time.perf_counter() - t0, 1),
                "search_seconds": res["search_seconds"],
                "evaluations": res["n_evaluations"],
                "evaluations_per_second": res["evaluations_per_second"],
                "calibration_kl": res["calibration_fitness"],
                "perplexity": res["perplexity"],
                "genomes": {n: g["genome"] for n, g in res["baselines"].items()},
                "sparsity": res["best"]["sparsity"],
            }
            entry["database"] = _database_info(res["space"]["database"])
            if abs(target - args.zero_shot_target) < 1e-9:
                entry["zero_shot"] = _zero_shot(config, entry["genomes"], data, args)
            done.write_text(json.dumps(entry, indent=1) + "\n")
            results[name] = entry
    summary = {
        "model": "smollm2-135m",
        "machine": f"{platform.platform()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, no GPU",
        "command": "python experiments/sparsity/run.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("data_dir", "db_dir") and v is not None
        ),
        "settings": {k: v for k, v in vars(args).items() if k not in ("data_dir", "db_dir")},
        "results": results,
    }
    (HERE / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v["perplexity"] for k, v in results.items()}, indent=1))


def _database_info(path: str) -> dict:
    meta = json.loads((Path(path) / "meta.json").read_text())
    return {"bytes": meta["bytes"], "build_seconds": meta["build_seconds"]}


def _zero_shot(config: SearchConfig, genomes: dict, data: Path, args) -> dict:
    from evosearch.zero_shot import evaluate_tasks

    session = Problem(config, lambda m: None)
    out = {}
    for name, key in genomes.items():
        genome = Genome.from_key(key)
        model = session.model
        with apply_replacements(model, session.space.replacements(model, genome)):
            out[name] = evaluate_tasks(
                model,
                session.tokenizer,
                list(TASKS),
                str(data),
                args.zero_shot_limit,
                batch_size=32,
            )
        print(f"zero-shot {name}: {out[name]}", flush=True)
    return out


if __name__ == "__main__":
    main()
