"""Render results.json of the layer-drop benchmark as results.md.

.venv/bin/python experiments/layer_drop/make_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["dense", "evopress", "shortgpt", "angular", "sleb", "last", "random"]


def main() -> None:
    r = json.loads((HERE / "results.json").read_text())
    s = r["settings"]
    lines = [
        "# Layer drop on SmolLM2-135M (30 blocks)",
        "",
        f"Status: **{r['status']}**. Command: `{r['command']}`",
        "",
        f"Machine: {r['machine']}. Calibration: WikiText-2 valid, {s['n_sequences']} random "
        f"windows of {s['seq_len']} tokens (seed 0), fitness KL(dense‖candidate). EvoPress: "
        f"{s['generations']} generations, {s['offspring']} offspring, stages {s['stages']} "
        f"(tokens:survivors). Random search: same racing and budget. SLEB: perplexity on "
        f"{s['sleb_tokens']} calibration tokens per step. Evaluation: first {s['eval_windows']} "
        "non-overlapping 1024-token windows of WikiText-2 *test* and of the C4 sample.",
        "",
    ]
    for metric, title in (
        ("wikitext2_test_ppl", "WikiText-2 test perplexity"),
        ("c4_ppl", "C4-sample perplexity"),
        ("calibration_kl", "Calibration KL (all calibration tokens)"),
    ):
        lines += [
            f"## {title}",
            "",
            "| dropped | " + " | ".join(METHODS) + " |",
            "|---" * (len(METHODS) + 1) + "|",
        ]
        for k, run in sorted(r["runs"].items(), key=lambda kv: int(kv[0])):
            vals = run[metric]
            lines.append(
                f"| {k}/30 | "
                + " | ".join(f"{vals[m]:.2f}" if m in vals else "–" for m in METHODS)
                + " |"
            )
        lines.append("")
    lines += [
        "## Search cost and dropped blocks",
        "",
        "| dropped | search s | evaluations | eval/s | EvoPress blocks | best heuristic "
        "| ratio EvoPress / best heuristic (WikiText-2) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, run in sorted(r["runs"].items(), key=lambda kv: int(kv[0])):
        ppl = run["wikitext2_test_ppl"]
        heur = min(("shortgpt", "angular", "sleb", "last"), key=lambda m: ppl[m])
        lines.append(
            f"| {k} | {run['search_seconds']:.0f} | {run['evaluations']} | "
            f"{run['evaluations_per_second']:.2f} | {run['dropped']['evopress']['dropped_blocks']}"
            f" | {heur} {ppl[heur]:.2f} | {ppl['evopress'] / ppl[heur]:.2f} |"
        )
    p = r["prefix_reuse"]
    lines += [
        "",
        f"Prefix reuse: {p['full_forward']:.3f} s per evaluation with a full forward vs "
        f"{p['with_reuse']:.3f} s when starting at the first dropped block "
        f"({p['speedup']:.2f}x, {p['tokens_per_eval']} tokens, random 7-block genomes, "
        f"max |ΔKL| {p['max_abs_diff']:.1e}). Teacher cache: "
        f"{next(iter(r['runs'].values()))['teacher_bytes_per_token']} bytes per token "
        "(final hidden state, fp32) instead of 196,608 for full-vocabulary fp32 logits.",
        "",
    ]
    (HERE / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
