"""Does the post-training domain decide the width benchmark's WikiText-2 result?

``run.py`` post-trains every model on WikiText-2 (valid) windows. After that, searched-with-TAS
beats uniform widths on C4 but not on WikiText-2 test (see README.md). This script rebuilds
the three 50 % models of one finished ``run.py`` result (uniform, searched, searched with TAS)
from the genomes recorded in its JSON, post-trains each with the same recipe on each of the
given domains (WikiText-2 valid, or C4 documents that the C4 evaluation never reads), and
scores WikiText-2 test and C4 perplexity on 16 windows (``run.py``'s, to check the rebuild)
and on 64 (less noise).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/width/post_domain.py \\
        --source experiments/width/results_ip0_s1.json --work /tmp/evosearch-width-dom-s1 \\
        --results experiments/width/results_domain_s1.json

Every finished step is kept under ``--work`` and skipped on a rerun; the JSON is rewritten
after every evaluation and says ``"complete": false`` until the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from evosearch.data import DataSpec, TokenData
from evosearch.models import load_model
from evosearch.pipeline import (
    SearchConfig,
    evaluate_perplexity,
    export_genome,
    finetune,
    load_eval_data,
    run_baseline,
)
from evosearch.shrink import n_params

DATA = Path("/work/shared/data")
EVAL = {
    "wikitext2": DATA / "wikitext-2-raw" / "wiki.test.raw",
    "c4": DATA / "c4" / "c4_sample.jsonl",
}
TAS_KEYS = ("width_train_tokens", "width_lr", "width_train_mode", "width_distill")


def c4_post_file(tokenizer, need_tokens: int, out: Path) -> dict:
    """Write the C4 documents after those the C4 evaluation reads (its first ``need_tokens``
    tokens, plus two documents of margin) to ``out`` (kept if it exists: another run on the
    same work directory may be reading it); return what was split."""
    docs = [json.loads(x) for x in EVAL["c4"].read_text().splitlines() if x.strip()]
    total, k = 0, 0
    while total < need_tokens:
        total += len(tokenizer(docs[k]["text"]).input_ids) + 1
        k += 1
    skip = k + 2
    covered = len(tokenizer("\n\n".join(d["text"] for d in docs[:skip])).input_ids)
    if covered < need_tokens:
        raise RuntimeError(f"the first {skip} C4 documents hold only {covered} tokens")
    if not out.is_file():
        out.write_text("".join(json.dumps(d) + "\n" for d in docs[skip:]))
    return {"file": str(out), "documents_skipped": skip, "documents": len(docs) - skip}


def perplexities(model, tokenizer, seq_len: int, windows: list[int]) -> dict[str, float]:
    """Perplexity on the first ``w`` windows for each ``w`` in ``windows`` (ascending), each
    window scored once: all windows have the same length, so the per-slice mean NLLs
    combine exactly."""
    row = {}
    for label, source in EVAL.items():
        data = load_eval_data(str(source), tokenizer, seq_len, windows[-1])
        nll, start = 0.0, 0
        for w in windows:
            part = TokenData(data.input_ids[start:w])
            nll += math.log(evaluate_perplexity(model, part)) * (w - start)
            start = w
            row[f"ppl_{label}_{w}"] = math.exp(nll / w)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--source", help="a run.py results JSON with the genomes")
    p.add_argument("--work")
    p.add_argument("--post-data", default="c4,wikitext2", help="domains, in order")
    p.add_argument("--eval-windows", default="16,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--skip-before",
        action="store_true",
        help="do not score the models before post-training (another run on this --work does)",
    )
    p.add_argument("--results", required=True, help="JSON to write (table: .md beside)")
    p.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="instead of a run: one table of these finished results, written to --results",
    )
    args = p.parse_args()
    if args.table:
        tables = [json.loads(Path(f).read_text()) for f in args.table]
        Path(args.results).write_text(write_table(tables))
        return
    if not (args.source and args.work):
        p.error("--source and --work are required (or --table)")
    torch.set_num_threads(args.threads)
    src = json.loads(Path(args.source).read_text())
    settings = src["settings"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = {**settings["search_config_tas"], "db_dir": str(work / "db")}
    plain = SearchConfig.from_dict({k: v for k, v in cfg.items() if k not in TAS_KEYS})
    windows = [int(w) for w in args.eval_windows.split(",")]
    seq_len, eval_seq_len = settings["seq_len"], settings["eval_seq_len"]
    post_seed = int(str(src["post_seeds"][0]))
    results_file = Path(args.results)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update(
        command="python " + " ".join(sys.argv),
        source=args.source,
        settings={**vars(args), "post_tokens": settings["post_tokens"], "post_seed": post_seed},
        machine={
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        complete=False,
    )
    rows = results.setdefault("models", {})
    timings = results.setdefault("timings", {})

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=1) + "\n")

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[domain] {name}: {timings[name]}s", flush=True)
        return out

    # 1. the three models, rebuilt from the recorded genomes on a fresh level database
    models = {"uniform": work / "uniform" / "model"}
    if not (work / "uniform" / "results.json").is_file():
        timed("uniform", lambda: run_baseline(plain, "uniform", work / "uniform"))
    run_dir = work / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(plain.to_dict(), indent=1) + "\n")
    searches = [n for n in ("searched", "searched_tas") if n in src["searches"]]  # --skip-plain
    for name in searches:
        models[name] = work / name
        genome = src["searches"][name]["best"]["genome"]
        if not (models[name] / "config.json").is_file():
            timed(f"export_{name}", lambda g=genome, d=models[name]: export_genome(run_dir, g, d))
    uniform = json.loads((work / "uniform" / "results.json").read_text())["genome"]
    results["genomes"] = {
        "uniform": uniform,
        **{n: src["searches"][n]["best"]["genome"] for n in searches},
    }

    def evaluate(name: str, path: Path, recorded: dict | None) -> None:
        if name in rows:
            return
        t0 = time.perf_counter()
        model, tokenizer = load_model(str(path))
        row = {"path": str(path), "params": n_params(model)}
        row.update(perplexities(model, tokenizer, eval_seq_len, windows))
        if recorded is not None:  # the source's 16-window numbers of the same model
            row["recorded"] = {k: recorded[k] for k in ("ppl_wikitext2", "ppl_c4")}
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        print(f"[domain] eval {name}: {row}", flush=True)
        save()

    for name, path in models.items():
        if not args.skip_before:
            evaluate(f"{name}_before_post", path, src["models"].get(f"{name}_before_post"))

    # 2. the same post-training recipe on each domain
    _, tokenizer = load_model(str(models["uniform"]))
    c4_split = c4_post_file(tokenizer, windows[-1] * eval_seq_len, work / "c4_post.jsonl")
    results["c4_post_split"] = c4_split
    post_sources = {
        "wikitext2": str(DATA / "wikitext-2-raw" / "wiki.valid.raw"),
        "c4": c4_split["file"],
    }
    for domain in args.post_data.split(","):
        data = DataSpec(source=post_sources[domain], seq_len=seq_len, seed=post_seed)
        for name, path in models.items():
            out = work / f"{name}_post_{domain}"
            teacher = src["post_training"][name]["distill_from"]
            if not (out / "finetune.json").is_file():
                timed(
                    f"post_{name}_{domain}",
                    lambda d=path, o=out, s=data, t=teacher: finetune(
                        d,
                        settings["post_tokens"],
                        o,
                        data=s,
                        teacher=t,
                        lr=settings["post_lr"],
                        device="cpu",
                    ),
                )
            results.setdefault("post_training", {})[f"{name}_{domain}"] = json.loads(
                (out / "finetune.json").read_text()
            )
            recorded = src["models"].get(name) if domain == "wikitext2" else None
            evaluate(f"{name}_post_{domain}", out, recorded)
    results["complete"] = True
    save()
    results_file.with_suffix(".md").write_text(write_table([results]))


def write_table(runs: list[dict]) -> str:
    """Markdown: per eval window count, perplexity of the three models per run (search seed)
    and post-training domain, and how much lower TAS's perplexity is than uniform's."""
    names = ("uniform", "searched", "searched_tas")
    lines = [f"Command: `{r['command']}`" for r in runs] + [""]
    for w in runs[0]["settings"]["eval_windows"].split(","):
        lines += [
            f"Perplexity on the first {w} windows of 512 tokens (WikiText-2 test, C4 sample); "
            "last columns: how much lower TAS's perplexity is than uniform's:",
            "",
            "| search seed | post-training | uniform WT2 | searched | TAS | uniform C4 | "
            "searched | TAS | TAS vs uniform WT2 | C4 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in runs:
            seed = json.loads(Path(r["source"]).read_text())["settings"]["search_config_tas"][
                "seed"
            ]
            stages = ["before_post"] + [f"post_{d}" for d in r["settings"]["post_data"].split(",")]
            for stage in stages:
                vals = {
                    label: [
                        r["models"].get(f"{n}_{stage}", {}).get(f"ppl_{label}_{w}") for n in names
                    ]
                    for label in ("wikitext2", "c4")
                }
                if any(v[0] is None or v[2] is None for v in vals.values()):
                    continue
                # "–": a run without the plain search (run.py --skip-plain)
                cells = ["–" if x is None else f"{x:.2f}" for v in vals.values() for x in v]
                gains = [f"{100 * (v[0] - v[2]) / v[0]:+.1f} %" for v in vals.values()]
                label = "none" if stage == "before_post" else stage.removeprefix("post_")
                lines.append(f"| {seed} | {label} | " + " | ".join(cells + gains) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
