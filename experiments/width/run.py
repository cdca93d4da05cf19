"""Width-search benchmark on SmolLM2-135M at 50% of the block parameters removed: uniform
widths vs searched widths without and with training-aware selection (TAS), each followed by
the same post-training, then perplexity, zero-shot accuracy, parameters and CPU throughput.

Run from the repository root (results land next to this file; scaled down for a shared CPU,
see README.md):

    OMP_NUM_THREADS=1 .venv/bin/python experiments/width/run.py

Every finished step is kept under ``--work`` and skipped on a rerun, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from evosearch.data import DataSpec
from evosearch.models import load_model
from evosearch.pipeline import (
    SearchConfig,
    evaluate_perplexity,
    finetune,
    load_eval_data,
    run_baseline,
    run_search,
)
from evosearch.shrink import n_params, throughput
from evosearch.zero_shot import evaluate_tasks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from post_domain import c4_post_file  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data")
TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande")


def accuracies(row: dict) -> list[float]:
    """Zero-shot accuracy of a results row per task of ``TASKS``: ``acc_norm``, WinoGrande's
    ``acc`` (its choices are whole sentences of equal length)."""
    return [row["zero_shot"][t]["acc_norm" if t != "winogrande" else "acc"] for t in TASKS]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/evosearch-width-bench")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--offspring", type=int, default=6)
    p.add_argument("--n-sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-tokens", default="512,2048", help="TAS tokens per stage")
    p.add_argument("--train-lr", type=float, default=5e-4)
    p.add_argument("--post-tokens", type=int, default=12288)
    p.add_argument("--post-lr", type=float, default=1e-4)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--initial-population", type=int, default=4)
    p.add_argument(
        "--calib",
        choices=("wikitext2", "c4"),
        default="wikitext2",
        help="calibration text of the database and the searches: WikiText-2 valid, or the C4 "
        "sample's documents that the C4 evaluation never reads",
    )
    p.add_argument(
        "--post-data",
        choices=("calib", "wikitext2", "c4"),
        default="calib",
        help="post-training text (calib: the calibration source, other windows)",
    )
    p.add_argument(
        "--skip-plain",
        action="store_true",
        help="no search without TAS (uniform vs searched with TAS only)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the searches: calibration windows, level database, offspring, minibatches",
    )
    p.add_argument(
        "--results", default=str(HERE / "results.json"), help="JSON to write (table: .md beside)"
    )
    p.add_argument(
        "--post-seeds",
        default=None,
        help="seeds of the post-training windows (default: --seed + 1, never the calibration "
        "windows); the first is the main run, the others repeat the post-training (perplexity "
        "only) to show its spread",
    )
    args = p.parse_args()
    if args.post_seeds is None:
        args.post_seeds = str(args.seed + 1)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sources = {"wikitext2": str(DATA / "wikitext-2-raw" / "wiki.valid.raw")}
    if "c4" in (args.calib, args.post_data):  # held out from the C4 evaluation's documents
        _, tokenizer = load_model("smollm2-135m")
        split = c4_post_file(
            tokenizer, args.eval_windows * args.eval_seq_len, work / "c4_heldout.jsonl"
        )
        sources["c4"] = split["file"]
    calib = sources[args.calib]
    post_source = calib if args.post_data == "calib" else sources[args.post_data]
    base = SearchConfig.from_dict(
        dict(
            model="smollm2-135m",
            space="width",
            width_target=args.target,
            data=calib,
            n_sequences=args.n_sequences,
            seq_len=args.seq_len,
            generations=args.generations,
            offspring=args.offspring,
            initial_population=args.initial_population,
            warm_start=("uniform",),  # EvoPress starts from the uniform configuration
            stages=((512, 2), (2048, 1)),
            db_dir=str(work / "db"),
            device="cpu",
            seed=args.seed,
        )
    )
    tas = SearchConfig.from_dict(
        {
            **base.to_dict(),
            "width_train_tokens": [int(t) for t in args.train_tokens.split(",")],
            "width_lr": args.train_lr,
            "width_train_mode": "lora",
            "width_distill": True,
            "baselines": ["uniform"],
        }
    )
    plain = SearchConfig.from_dict({**base.to_dict(), "baselines": ["uniform"]})
    timings: dict[str, float] = {}
    searches = {"searched": ("search_plain", plain), "searched_tas": ("search_tas", tas)}
    if args.skip_plain:
        del searches["searched"]
    runs = {name: work / label for name, (label, _) in searches.items()}

    def step(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[bench] {name}: {timings[name]}s", flush=True)
        return out

    for name, (label, config) in searches.items():
        out = runs[name]
        if not (out / "results.json").is_file():  # a killed search resumes from its checkpoint
            resume = (out / "checkpoint.json").is_file()
            step(label, partial(run_search, config, out, resume=resume))
    uniform_dir = work / "uniform"
    if not (uniform_dir / "results.json").is_file():
        step("uniform", lambda: run_baseline(plain, "uniform", uniform_dir))
    models = {"uniform": uniform_dir / "model", **{n: d / "model" for n, d in runs.items()}}
    post_seeds = [int(x) for x in args.post_seeds.split(",")]

    def post_dir(name: str, seed: int) -> Path:  # the first seed's is the main run
        return work / (f"{name}_post" + (f"_s{seed}" if seed != post_seeds[0] else ""))

    for seed in post_seeds:
        post_data = DataSpec(source=post_source, seq_len=args.seq_len, seed=seed)
        for name, model_dir in models.items():
            out = post_dir(name, seed)
            if not (out / "finetune.json").is_file():
                step(
                    f"post_{name}_s{seed}",
                    lambda d=model_dir, o=out, data=post_data: finetune(
                        d,
                        args.post_tokens,
                        o,
                        data=data,
                        teacher="smollm2-135m",
                        lr=args.post_lr,
                        device="cpu",
                    ),
                )
    evaluated = {"dense": "smollm2-135m"}
    evaluated.update({name: str(post_dir(name, post_seeds[0])) for name in models})
    evaluated.update({f"{name}_before_post": str(d) for name, d in models.items()})
    for seed in post_seeds[1:]:
        evaluated.update({f"{n}_post_s{seed}": str(post_dir(n, seed)) for n in models})
    results_file = Path(args.results)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    rows = results.setdefault("models", {})
    for name, path in evaluated.items():
        if name in rows:
            continue
        t0 = time.perf_counter()
        model, tokenizer = load_model(path)
        row = {"path": path, "params": n_params(model)}
        for label, source in (
            ("wikitext2", DATA / "wikitext-2-raw" / "wiki.test.raw"),
            ("c4", DATA / "c4" / "c4_sample.jsonl"),
        ):
            data = load_eval_data(str(source), tokenizer, args.eval_seq_len, args.eval_windows)
            row[f"ppl_{label}"] = evaluate_perplexity(model, data)
        if name in models or name == "dense":  # the main rows: zero-shot and speed too
            if args.limit > 0:
                scores = evaluate_tasks(model, tokenizer, TASKS, DATA, args.limit, batch_size=16)
                row["zero_shot"] = scores
            row["tokens_per_s"] = throughput(model)
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        print(f"[bench] eval {name}: {row}", flush=True)
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    for name, run in runs.items():
        r = json.loads((run / "results.json").read_text())
        results.setdefault("searches", {})[name] = {
            "best": r["best"],
            "calibration_kl": r["calibration_fitness"],
            "search_seconds": r["search_seconds"],
            "n_evaluations": r["n_evaluations"],
            "export": r.get("export"),
        }
    for name in models:
        results.setdefault("post_training", {})[name] = json.loads(
            (post_dir(name, post_seeds[0]) / "finetune.json").read_text()
        )
    db_meta = next((work / "db").glob("*/meta.json"))  # the one width database
    results["database"] = json.loads(db_meta.read_text())
    results["post_seeds"] = post_seeds
    results["command"] = "python " + " ".join(sys.argv)
    results["settings"] = {**vars(args), "search_config_tas": tas.to_dict()}
    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    results.setdefault("timings", {}).update(timings)
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    write_table(results, results_file.with_suffix(".md"))


def write_table(results: dict, out: Path) -> None:
    rows = results["models"]
    lines = [
        "| model | params | WikiText-2 ppl | C4 ppl | ARC-E | PIQA | HellaSwag | WinoGrande "
        "| avg acc | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("dense", "uniform", "searched", "searched_tas"):
        if name not in rows:
            continue
        r = rows[name]
        if "zero_shot" in r:
            accs = accuracies(r)
            acc_cells = [f"{100 * a:.1f}" for a in accs] + [f"{100 * sum(accs) / len(accs):.1f}"]
        else:  # run with --limit 0
            acc_cells = ["–"] * (len(TASKS) + 1)
        lines.append(
            f"| {name} | {r['params'] / 1e6:.1f}M | {r['ppl_wikitext2']:.2f} | "
            f"{r['ppl_c4']:.2f} | " + " | ".join(acc_cells) + f" | {r['tokens_per_s']:.0f} |"
        )
    lines += [
        "",
        "Before post-training (same models, perplexity only):",
        "",
        "| model | WikiText-2 ppl | C4 ppl |",
        "|---|---|---|",
    ]
    for name in ("uniform", "searched", "searched_tas"):
        r = rows.get(f"{name}_before_post")
        if r:
            lines.append(f"| {name} | {r['ppl_wikitext2']:.2f} | {r['ppl_c4']:.2f} |")
    seeds = results.get("post_seeds", [1])
    if len(seeds) > 1:
        lines += [
            "",
            f"The same post-training on other windows (seeds {', '.join(map(str, seeds))}; the "
            "first is the table above): perplexity per seed, then mean ± sd.",
            "",
            "| model | WikiText-2 ppl | C4 ppl |",
            "|---|---|---|",
        ]
        for name in ("uniform", "searched", "searched_tas"):
            names = [name] + [f"{name}_post_s{s}" for s in seeds[1:]]
            if not all(n in rows for n in names):
                continue
            cells = []
            for key in ("ppl_wikitext2", "ppl_c4"):
                v = [rows[n][key] for n in names]
                cells.append(
                    ", ".join(f"{x:.2f}" for x in v)
                    + f" ({statistics.mean(v):.2f} ± {statistics.stdev(v):.2f})"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
