"""Render results.json of the strategy benchmark as results.md.

.venv/bin/python experiments/strategies/make_table.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    r = json.loads((HERE / "results.json").read_text())
    lines = [
        "# Strategies on SmolLM2-135M layer drop (7 of 30 blocks)",
        "",
        f"Status: **{r['status']}**. Command: `{r['command']}`",
        "",
        f"Machine: {r['machine']}. Calibration: 8 x 128 WikiText-2 valid tokens; fitness "
        "KL(dense‖candidate) on all 1,024 of them. Budget per generation: 6,144 tokens for every "
        "strategy (EvoPress: 12 offspring on 256 tokens, then 2 survivors + parent on 1,024; "
        "Optuna samplers: 6 candidates on 1,024). Optuna samplers use the budget-exact "
        "random-key encoding.",
        "",
        "## Best KL after the whole budget (mean ± sd over seeds, lower is better)",
        "",
        "| strategy | seeds | tokens spent (seed 0) | best KL per seed | mean | sd |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in r["single_objective"].items():
        best = [x["best_kl"] for x in runs]
        sd = statistics.stdev(best) if len(best) > 1 else float("nan")
        tokens = runs[0]["curve"][-1]["tokens"]
        lines.append(
            f"| {name} | {len(runs)} | {tokens} | {', '.join(f'{b:.3f}' for b in best)} | "
            f"{statistics.mean(best):.3f} | {sd:.3f} |"
        )
    lines += [
        "",
        "## Best-so-far KL per generation (seed mean; tokens actually spent in brackets)",
        "",
        "Every strategy is granted 6,144 tokens per generation; repeated genomes are "
        "memoised, not re-evaluated, so a strategy that proposes duplicates spends less.",
        "",
        "| strategy | "
        + " | ".join(
            f"gen {i}" for i in range(len(next(iter(r["single_objective"].values()))[0]["curve"]))
        )
        + " |",
    ]
    lines.append("|---" * (1 + len(next(iter(r["single_objective"].values()))[0]["curve"])) + "|")
    for name, runs in r["single_objective"].items():
        n = min(len(x["curve"]) for x in runs)
        means = [statistics.mean(x["curve"][i]["best"] for x in runs) for i in range(n)]
        toks = [statistics.mean(x["curve"][i]["tokens"] for x in runs) for i in range(n)]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m:.3f} ({t / 1000:.1f}k)" for m, t in zip(means, toks))
            + " |"
        )
    if r["multi_objective"]:
        lines += [
            "",
            "## Multi-objective: KL vs parameters over 3..15 dropped blocks",
            "",
            "Hypervolume against reference (KL 8.0, dense parameter count); higher is "
            "better. The single-objective front is formed by EvoPress runs at 3, 6, 9, 12 "
            "and 15 blocks sharing the same total token budget.",
            "",
            "| seed | NSGA-II HV | NSGA-II points | NSGA-II tokens | single-objective HV "
            "| single-objective points | single-objective tokens |",
            "|---|---|---|---|---|---|---|",
        ]
        for seed, m in r["multi_objective"].items():
            lines.append(
                f"| {seed} | {m['nsga2_hypervolume']:.4g} | {len(m['nsga2_front'])} | "
                f"{m['nsga2_tokens']} | {m['single_objective_hypervolume']:.4g} | "
                f"{len(m['single_objective_front'])} | {m['single_objective_tokens']} |"
            )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
