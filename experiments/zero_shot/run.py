"""Dense SmolLM2-135M zero-shot accuracy on the four local tasks, offline (evosearch.zero_shot).

Run from the repository root (results land next to this file):

    .venv/bin/python experiments/zero_shot/run.py                 # full splits
    .venv/bin/python experiments/zero_shot/run.py --limit 100     # first 100 items of each task

The same scores come from the command line with ``evosearch eval smollm2-135m --tasks
arc_easy,piqa,hellaswag,winogrande --data-dir ../shared/data`` (``--data-dir`` selects the
offline backend). Writes ``results.json`` (or ``results_limitN.json``)
and the matching ``.md`` table; a run with ``--limit`` is labelled a SUBSET in both.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from evosearch.models import load_model
from evosearch.zero_shot import evaluate_tasks

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data"  # ../shared/data beside the checkout
TASKS = ("winogrande", "piqa", "arc_easy", "hellaswag")  # cheapest first
FULL_SIZES = {"arc_easy": 2376, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, help="first N items of each task (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    stem = "results" if args.limit is None else f"results_limit{args.limit}"
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device=torch.device("cpu"))
    load_seconds = time.perf_counter() - t0
    scores, seconds = {}, {}
    # Each finished task is kept in partial/, so a killed run resumes at the next task.
    partial = HERE / "partial" / stem
    partial.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        done = partial / f"{task}.json"
        if done.is_file():
            saved = json.loads(done.read_text())
            scores[task], seconds[task] = saved["scores"], saved["seconds"]
            print(f"{task}: {scores[task]} (kept from an earlier run)", flush=True)
            continue
        t0 = time.perf_counter()
        scores.update(
            evaluate_tasks(
                model, tokenizer, [task], args.data_dir, args.limit, batch_size=args.batch_size
            )
        )
        seconds[task] = round(time.perf_counter() - t0, 1)
        done.write_text(json.dumps({"scores": scores[task], "seconds": seconds[task]}) + "\n")
        print(f"{task}: {scores[task]} ({seconds[task]} s)", flush=True)
    subset = args.limit is not None
    results = {
        "model": args.model,
        "backend": "local (evosearch.zero_shot, lm-eval 0.4 metric definitions)",
        "subset": subset,
        "limit": args.limit,
        "full_split_sizes": FULL_SIZES,
        "batch_size": args.batch_size,
        "tasks": scores,
        "seconds": seconds,
        "model_load_seconds": round(load_seconds, 1),
        "platform": f"{platform.platform()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "command": "python experiments/zero_shot/run.py"
        + (f" --limit {args.limit}" if subset else "")
        + f" --batch-size {args.batch_size}",
    }
    (HERE / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    title = (
        f"SUBSET: first {args.limit} items of each task (full split sizes in the last column); "
        "the full-split run is pending."
        if subset
        else "Full splits."
    )
    lines = [
        f"# Dense {args.model}, zero-shot, offline backend",
        "",
        f"**{title}**",
        "",
        f"Command: `{results['command']}`",
        "",
        "| task | n scored | acc | acc_norm | seconds | full split |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for task in TASKS:
        r = scores[task]
        lines.append(
            f"| {task} | {r['n']} | {r['acc']:.4f} | {r['acc_norm']:.4f} | {seconds[task]} "
            f"| {FULL_SIZES[task]} |"
        )
    (HERE / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
