"""One table over several search seeds of the width benchmark (``run.py --seed N``).

Each results JSON is one search seed: its own calibration windows, level database, searches and
post-training windows, with the three models post-trained identically within the seed. The
table shows, per seed, the perplexity after the main post-training (the first ``post_seeds``
entry), TAS's relative gain over uniform, and means over the seeds.

    python experiments/width/seeds_table.py experiments/width/results_long.json \
        experiments/width/results_long_s1.json ... --out experiments/width/results_seeds.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import accuracies  # noqa: E402

METHODS = ("uniform", "searched", "searched_tas")
LABELS = {"uniform": "uniform", "searched": "searched", "searched_tas": "searched with TAS"}
DATASETS = (("ppl_wikitext2", "WikiText-2"), ("ppl_c4", "C4"))


def avg_acc(row: dict) -> float:
    accs = accuracies(row)
    return 100 * sum(accs) / len(accs)


def search_seed(results: dict) -> int:
    return int(results["settings"]["search_config_tas"]["seed"])


def table(files: list[Path]) -> str:
    runs = sorted(
        ((search_seed(r), r) for r in (json.loads(f.read_text()) for f in files)),
        key=lambda x: x[0],
    )
    lines = []
    for stage, suffix in (
        ("after post-training (each seed's main post-training windows)", ""),
        ("before post-training", "_before_post"),
    ):
        lines += [
            f"Perplexity {stage}; the last columns: how much lower TAS's perplexity is than "
            "uniform's:",
            "",
            "| search seed | "
            + " | ".join(f"{LABELS[m]} {d}" for d in ("WikiText-2", "C4") for m in METHODS)
            + " | TAS vs uniform, WikiText-2 | TAS vs uniform, C4 |",
            "|---|" + "---:|" * (2 * len(METHODS) + 2),
        ]
        per = {(m, k): [] for m in METHODS for k, _ in DATASETS}
        for seed, r in runs:
            rows = r["models"]
            cells = []
            for key, _ in DATASETS:
                best = min(rows[m + suffix][key] for m in METHODS)
                for m in METHODS:
                    v = rows[m + suffix][key]
                    per[(m, key)].append(v)
                    cells.append(f"**{v:.2f}**" if v == best else f"{v:.2f}")
            gains = [
                100 * (1 - rows["searched_tas" + suffix][k] / rows["uniform" + suffix][k])
                for k, _ in DATASETS
            ]
            lines.append(
                f"| {seed} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(f"{g:+.1f} %" for g in gains)
                + " |"
            )
        means = [statistics.mean(per[(m, k)]) for k, _ in DATASETS for m in METHODS]
        wins = [
            sum(t < u for t, u in zip(per[("searched_tas", k)], per[("uniform", k)]))
            for k, _ in DATASETS
        ]
        mean_gain = [
            100
            * (
                1
                - statistics.mean(per[("searched_tas", k)]) / statistics.mean(per[("uniform", k)])
            )
            for k, _ in DATASETS
        ]
        lines.append(
            "| mean | "
            + " | ".join(f"{v:.2f}" for v in means)
            + " | "
            + " | ".join(
                f"{g:+.1f} % (TAS better in {w}/{len(runs)})" for g, w in zip(mean_gain, wins)
            )
            + " |"
        )
        lines.append("")
    lines += [
        "Zero-shot average accuracy after post-training (4 tasks × first 100 items; 1 item = 1 "
        "point per task):",
        "",
        "| search seed | " + " | ".join(LABELS[m] for m in METHODS) + " |",
        "|---|" + "---:|" * len(METHODS),
    ]
    for seed, r in runs:
        lines.append(
            f"| {seed} | " + " | ".join(f"{avg_acc(r['models'][m]):.1f}" for m in METHODS) + " |"
        )
    lines += [
        "",
        "Calibration KL on all calibration tokens: each search's winner and the uniform genome "
        "(in the TAS search both after the last stage's training):",
        "",
        "| search seed | searched | uniform | searched with TAS | uniform, trained as in TAS |",
        "|---|---:|---:|---:|---:|",
    ]
    for seed, r in runs:
        plain, tas = (r["searches"][m]["calibration_kl"] for m in ("searched", "searched_tas"))
        lines.append(
            f"| {seed} | {plain['evopress']:.3f} | {plain['uniform']:.3f} | "
            f"{tas['evopress']:.3f} | {tas['uniform']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="results JSONs, one per search seed")
    p.add_argument("--out", type=Path, help="markdown file to write (default: print only)")
    args = p.parse_args()
    text = table(args.results)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
