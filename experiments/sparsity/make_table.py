"""results.json (or the per-configuration runs/*/benchmark.json) -> results.md.

.venv/bin/python experiments/sparsity/make_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("uniform", "owl", "evopress")


def _load() -> tuple[dict, dict]:
    summary = HERE / "results.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        return data, data["results"]
    runs = {p.parent.name: json.loads(p.read_text()) for p in HERE.glob("runs/*/benchmark.json")}
    return {}, runs


def main() -> None:
    summary, results = _load()
    order = sorted(results, key=lambda n: (results[n]["pruner"], results[n]["target"]))
    complete = bool(summary)
    lines = ["# Per-layer sparsity on SmolLM2-135M: uniform vs OWL vs EvoPress search", ""]
    if not complete:
        lines += ["**PARTIAL: the benchmark has not finished; only these configurations ran.**"]
        lines += [""]
    else:
        lines += [f"Command: `{summary['command']}`", "", f"Machine: {summary['machine']}", ""]
    for source, title in (("wiki.test.raw", "WikiText-2 test"), ("c4_sample.jsonl", "C4 sample")):
        lines += [f"## {title} perplexity", ""]
        lines += ["| pruner | sparsity | dense | uniform | OWL | EvoPress | EvoPress / uniform |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for name in order:
            r = results[name]
            ppl = {m: next(v for k, v in r["perplexity"][m].items() if k.endswith(source))
                   for m in ("dense", *METHODS)}  # fmt: skip
            lines.append(
                f"| {r['pruner']} | {r['target']:.0%} | {ppl['dense']:.2f} | "
                + " | ".join(f"{ppl[m]:.2f}" for m in METHODS)
                + f" | {ppl['evopress'] / ppl['uniform']:.3f} |"
            )
        lines.append("")
    lines += ["## Calibration KL (all calibration tokens)", ""]
    lines += ["| pruner | sparsity | uniform | OWL | EvoPress |", "|---|---|---|---|---|"]
    for name in order:
        r = results[name]
        kl = r["calibration_kl"]
        lines.append(
            f"| {r['pruner']} | {r['target']:.0%} | "
            + " | ".join(f"{kl[m]:.4f}" for m in METHODS)
            + " |"
        )
    lines += ["", "## Cost", ""]
    lines += [
        "| pruner | sparsity | generations | database MiB | database build s | search s | "
        "evaluations | evaluations/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        r = results[name]
        db = r["database"]
        lines.append(
            f"| {r['pruner']} | {r['target']:.0%} | {r['settings']['generations']} | "
            f"{db['bytes'] / 2**20:.0f} | "
            f"{db['build_seconds']:.0f} | {r['search_seconds']:.0f} | {r['evaluations']} | "
            f"{r['evaluations_per_second']:.2f} |"
        )
    zs = [(n, results[n]) for n in order if "zero_shot" in results[n]]
    if zs:
        lines += ["", "## Zero-shot accuracy (acc_norm where defined, else acc)", ""]
        tasks = list(next(iter(zs))[1]["zero_shot"]["uniform"])
        lines += ["| pruner | sparsity | method | " + " | ".join(tasks) + " | n per task |"]
        lines += ["|---|---|---|" + "---|" * len(tasks) + "---|"]
        for _, r in zs:
            for m in METHODS:
                scores = r["zero_shot"][m]
                n = scores[tasks[0]]["n"]
                lines.append(
                    f"| {r['pruner']} | {r['target']:.0%} | {m} | "
                    + " | ".join(f"{scores[t]['acc_norm']:.3f}" for t in tasks)
                    + f" | {n} |"
                )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
