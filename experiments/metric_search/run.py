"""Metric-search benchmark: search a pruning metric on SmolLM2-135M, then compare it with
magnitude, Wanda, SparseGPT, Pruner-Zero's and GBLM's metrics at 50% unstructured and 2:4.

Writes ``results.json`` (updated after every measurement; ``"status"`` is ``running`` until the
end) and ``results.md`` next to this file, and the search's run directory under ``--run-dir``.
See README.md for the exact command and the scaled-down settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evosearch.data import DataSpec, load_token_data
from evosearch.metric_search import MetricSearchConfig, run_metric_search
from evosearch.models import load_model
from evosearch.pipeline import evaluate_perplexity, load_eval_data
from evosearch.pruning import block_linears, collect_stats, parse_pattern, set_weight_
from evosearch.symbolic import KNOWN_METRICS, get_pruner, metric_pruner

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--run-dir", default=str(HERE / "run"))
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--n-sequences", type=int, default=16)
    p.add_argument("--holdout-sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--fitness", default="kl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    calib = str(data_dir / "wikitext-2-raw" / "wiki.valid.raw")

    config = MetricSearchConfig(
        model="smollm2-135m",
        data=calib,
        n_sequences=args.n_sequences,
        seq_len=args.seq_len,
        sparsity=0.5,
        fitness=args.fitness,
        population=args.population,
        generations=args.generations,
        holdout_sequences=args.holdout_sequences,
        seed=args.seed,
    )
    results: dict = {"status": "running", "settings": vars(args), "machine": _machine()}
    out = HERE / "results.json"

    def save() -> None:
        out.write_text(json.dumps(results, indent=1) + "\n")

    search = run_metric_search(config, args.run_dir, resume=args.resume)
    results["search"] = {
        "best": search["best"],
        "known_metrics_calibration_fitness": search["known_metrics"],
        "known_metrics_holdout_fitness": search["known_metrics_holdout"],
        "holdout": search["holdout"],
        "counts": search["counts"],
        "timings": search["timings"],
        "leaderboard": search["leaderboard"][:5],
    }
    save()

    model, tok = load_model("smollm2-135m")
    calib_ids = load_token_data(
        DataSpec(source=calib, n_sequences=args.n_sequences, seq_len=args.seq_len, seed=0), tok
    ).input_ids
    t0 = time.perf_counter()
    stats = collect_stats(model, calib_ids, hessian=True, gradients=True)
    results["stats_seconds"] = time.perf_counter() - t0
    evals = {
        "wikitext2-test": load_eval_data(
            str(data_dir / "wikitext-2-raw" / "wiki.test.raw"),
            tok,
            args.eval_seq_len,
            args.eval_windows,
        ),
        "c4": load_eval_data(
            str(data_dir / "c4" / "c4_sample.jsonl"), tok, args.eval_seq_len, args.eval_windows
        ),
    }
    results["eval_data"] = {k: v.description for k, v in evals.items()}
    refs = block_linears(model)
    dense_w = {r.name: r.weight(model).detach().clone() for r in refs}
    pruners = {
        "magnitude": get_pruner("magnitude"),
        "wanda": get_pruner("wanda"),
        "sparsegpt": get_pruner("sparsegpt"),
        "pruner-zero": metric_pruner(KNOWN_METRICS["pruner-zero"]),
        "gblm": metric_pruner(KNOWN_METRICS["gblm"]),
        # RIA (Zhang et al. 2024): relative importance (row + column l1) times sqrt(||X||)
        "ria": metric_pruner("mul(add(coln(W), rown(W)), sqrt(X))"),
        "discovered": get_pruner(str(Path(args.run_dir) / "best_metric.json")),
    }
    table = results.setdefault("perplexity", {})
    table["dense"] = {k: evaluate_perplexity(model, d) for k, d in evals.items()}
    save()
    for target in ("50%", "2:4"):
        pattern = parse_pattern("2:4") if target == "2:4" else None
        for name, pruner in pruners.items():
            t0 = time.perf_counter()
            for r in refs:
                w = pruner.prune(dense_w[r.name], stats[r.name], 0.5, pattern=pattern)
                set_weight_(r.module(model), w)
            prune_s = time.perf_counter() - t0
            row = {k: evaluate_perplexity(model, d) for k, d in evals.items()}
            row["prune_seconds"] = prune_s
            table.setdefault(target, {})[name] = row
            for r in refs:
                set_weight_(r.module(model), dense_w[r.name])
            print(f"{target} {name}: {row}", flush=True)
            save()
    results["status"] = "complete"
    save()
    (HERE / "results.md").write_text(_markdown(results))


def _machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def _markdown(r: dict) -> str:
    s = r["search"]
    ppl = r["perplexity"]
    lines = [
        "# Metric search on SmolLM2-135M",
        "",
        f"Discovered metric: **{s['best']['math']}** (`{s['best']['metric']}`), calibration "
        f"{r['settings']['fitness']} {s['best']['fitness']:.4f}, held-out "
        f"{s['best'].get('holdout_fitness') or float('nan'):.4f}.",
        "",
        f"Perplexity on the first {r['settings']['eval_windows']} windows of "
        f"{r['settings']['eval_seq_len']} tokens (dense: WikiText-2 test "
        f"{ppl['dense']['wikitext2-test']:.2f}, C4 {ppl['dense']['c4']:.2f}).",
        "",
        "| method | WikiText-2 test, 50% | C4, 50% | WikiText-2 test, 2:4 | C4, 2:4 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ppl["50%"]:
        a, b = ppl["50%"][name], ppl["2:4"][name]
        lines.append(
            f"| {name} | {a['wikitext2-test']:.2f} | {a['c4']:.2f} | {b['wikitext2-test']:.2f} "
            f"| {b['c4']:.2f} |"
        )
    c, t = s["counts"], s["timings"]
    lines += [
        "",
        f"Search: {c['proposed']} metrics proposed, {c['evaluated']} evaluated, "
        f"{c['memo_hits']} answered by the memo ({c['memo_saved_share']:.0%} of evaluations "
        f"saved), {c['rejected']} rejected; search wall time {t['search_s'] / 60:.1f} min "
        f"(total with loading and statistics {t['total_s'] / 60:.1f} min).",
        "",
        "Calibration fitness of the seeded known metrics: "
        + ", ".join(
            f"{k} {v:.4f}" for k, v in s["known_metrics_calibration_fitness"].items() if v
        ),
        "",
        f"Held-out fitness of the seed metrics ({s.get('holdout')}): "
        + ", ".join(
            f"{k} {v:.4f}" for k, v in s.get("known_metrics_holdout_fitness", {}).items() if v
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
