"""Healing benchmark on SmolLM2-135M: the 7-of-30 block drop (blocks 12-18) and uniform Wanda
70 % sparsity, each healed by distillation from the dense model on the C4 sample (never on
WikiText-2), at two token budgets; perplexity (and optionally zero-shot accuracy) before and
after, wall time, and the structure before and after.

Run from the repository root (results land next to this file):

    PYTHONPATH=$PWD .venv/bin/python experiments/healing/run.py

Every finished step is kept under ``--work`` and skipped on a rerun, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from evosearch.data import DataSpec, load_token_data
from evosearch.healing import EvalWindows, HealConfig, heal_saved_model
from evosearch.models import load_model, save_compressed
from evosearch.pipeline import evaluate_perplexity, load_eval_data
from evosearch.pruning import block_linears, collect_stats, set_weight_
from evosearch.symbolic import get_pruner

HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data")
WIKI_TEST = str(DATA / "wikitext-2-raw/wiki.test.raw")
WIKI_VALID = str(DATA / "wikitext-2-raw/wiki.valid.raw")
C4 = str(DATA / "c4/c4_sample.jsonl")
TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande")


def make_model(name: str, work: Path) -> Path:
    """One of the two compressed models, saved once under ``work``: the 7-of-30 block drop,
    or uniform Wanda 70 % (every block linear at exactly 70 % per output row, calibrated on
    4 x 512 tokens of WikiText-2 *valid*)."""
    out = work / name / "model"
    if out.is_dir():
        return out
    dense, tok = load_model("smollm2-135m")
    if name == "drop7":
        return save_compressed(dense, tok, out, dropped_blocks=set(range(12, 19)))
    spec = DataSpec(source=WIKI_VALID, n_sequences=4, seq_len=512, seed=0)
    stats = collect_stats(dense, load_token_data(spec, tok).input_ids)
    wanda = get_pruner("wanda")
    for ref in block_linears(dense):
        set_weight_(ref.module(dense), wanda.prune(ref.weight(dense), stats[ref.name], 0.7))
    dense.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def stamped(message: str) -> None:
    """Print with the UTC time and the load average (the cores are shared: step times vary)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
    print(f"[{now} load {os.getloadavg()[0]:.1f}] {message}", flush=True)


def _when() -> dict:
    return {
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def evaluate(model_dir: Path, args, cache: dict) -> dict:
    """Perplexity on the first windows of WikiText-2 test and of the C4 sample."""
    torch.manual_seed(0)
    model, tok = load_model(str(model_dir))
    out = {}
    sets = (("wikitext2_test", WIKI_TEST, args.wiki_windows), ("c4", C4, args.c4_windows))
    for name, source, windows in sets:
        if (source, windows) not in cache:
            cache[(source, windows)] = load_eval_data(source, tok, 1024, windows)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.eval_bf16):
            out[name] = evaluate_perplexity(model, cache[(source, windows)])
        out[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
    if args.limit:
        from evosearch.zero_shot import evaluate_tasks

        out["zero_shot"] = evaluate_tasks(model, tok, TASKS, DATA, args.limit)
    print(f"  {model_dir}: {out}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/evosearch-heal-bench")
    p.add_argument("--budgets", default="65536,16384", help="healing tokens, comma-separated")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--mode", default="full")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wiki-windows", type=int, default=40)
    p.add_argument("--c4-windows", type=int, default=10)
    p.add_argument("--eval-bf16", action="store_true", help="perplexity under bf16 autocast")
    p.add_argument("--seq-len", type=int, default=1024, help="healing sequence length")
    p.add_argument("--limit", type=int, default=0, help="zero-shot items per task (0: skip)")
    p.add_argument("--models", default="drop7,wanda70")
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    results_file = Path(args.out)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    setup = {
        "argv": sys.argv,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "started": _when(),
    }
    if "setup" in results:  # an earlier invocation's: keep it, add this one
        results.setdefault("later_setups", []).append(setup)
    else:
        results["setup"] = setup
    cache: dict = {}
    # the C4 sample is both healing text and evaluation data: healing skips its first windows
    avoid = [EvalWindows(WIKI_TEST, 40, 1024), EvalWindows(C4, 40, 1024)]
    for name in args.models.split(","):
        row = results.setdefault(name, {})
        if "unhealed" not in row:
            row["unhealed"] = evaluate(make_model(name, work), args, cache)
        for tokens in (int(t) for t in args.budgets.split(",")):
            key = f"healed_{tokens}"
            if key in row:
                continue
            out = work / name / f"healed-{tokens}"
            config = HealConfig(tokens=tokens, mode=args.mode, lr=args.lr, seq_len=args.seq_len)
            started = _when()
            if not out.is_dir():
                source = make_model(name, work)
                heal_saved_model(source, out, config, data=DataSpec(source=C4, seed=1),
                                 teacher="smollm2-135m", avoid=avoid, log=stamped)  # fmt: skip
            record = json.loads((out / "healing.json").read_text())
            row[key] = {
                **evaluate(out, args, cache),
                **{k: record[k] for k in ("tokens", "steps", "lr", "mode", "seconds", "threads",
                                          "held_out_before", "held_out_after")},
                "losses": [round(x, 4) for x in record["losses"]],
                "structure_before": {k: v for k, v in record["structure"].items()
                                     if k != "layer_zeros"},
                "structure_after": {k: v for k, v in record["structure_after"].items()
                                    if k != "layer_zeros"},
                "data_notes": record["data"]["notes"],
                "train_region": record["data"]["train_region"],
                "run": {"argv": sys.argv, "threads": torch.get_num_threads(),
                        "started": started, "finished": _when()},
            }  # fmt: skip
            results_file.write_text(json.dumps(results, indent=1) + "\n")
        results_file.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
