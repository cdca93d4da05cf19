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
    # runs with --skip-plain have no plain search; runs with --limit 0 no zero-shot scores
    methods = [m for m in METHODS if all(m in r["models"] for _, r in runs)]
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
            + " | ".join(f"{LABELS[m]} {d}" for d in ("WikiText-2", "C4") for m in methods)
            + " | TAS vs uniform, WikiText-2 | TAS vs uniform, C4 |",
            "|---|" + "---:|" * (2 * len(methods) + 2),
        ]
        per = {(m, k): [] for m in methods for k, _ in DATASETS}
        for seed, r in runs:
            rows = r["models"]
            cells = []
            for key, _ in DATASETS:
                best = min(rows[m + suffix][key] for m in methods)
                for m in methods:
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
        means = [statistics.mean(per[(m, k)]) for k, _ in DATASETS for m in methods]
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
    if all("zero_shot" in r["models"][m] for _, r in runs for m in methods):
        lines += [
            "Zero-shot average accuracy after post-training (4 tasks × first 100 items; 1 item "
            "= 1 point per task):",
            "",
            "| search seed | " + " | ".join(LABELS[m] for m in methods) + " |",
            "|---|" + "---:|" * len(methods),
        ]
        for seed, r in runs:
            lines.append(
                f"| {seed} | "
                + " | ".join(f"{avg_acc(r['models'][m]):.1f}" for m in methods)
                + " |"
            )
        lines.append("")
    searches = [m for m in ("searched", "searched_tas") if m in methods]
    lines += [
        "Calibration KL on all calibration tokens: each search's winner and the uniform genome "
        "(in the TAS search both after the last stage's training):",
        "",
        "| search seed | "
        + " | ".join(
            {
                "searched": "searched | uniform",
                "searched_tas": "searched with TAS | uniform, trained as in TAS",
            }[m]
            for m in searches
        )
        + " |",
        "|---|" + "---:|---:|" * len(searches),
    ]
    for seed, r in runs:
        kls = [r["searches"][m]["calibration_kl"] for m in searches]
        lines.append(
            f"| {seed} | "
            + " | ".join(f"{kl['evopress']:.3f} | {kl['uniform']:.3f}" for kl in kls)
            + " |"
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
