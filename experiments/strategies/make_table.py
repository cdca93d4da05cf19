"""Render the strategy benchmarks' JSON results as markdown tables.

.venv/bin/python experiments/strategies/make_table.py

``results.json`` (layer drop, run.py) -> ``results.md``; ``results_sparsity.json``
(run_sparsity.py) -> ``results_sparsity.md``; ``results_sparsity_mo.json`` (run_sparsity_mo.py)
-> ``results_sparsity_mo.md``. A file that does not exist yet is skipped.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET = (
    "Budget per generation: 6,144 tokens for every strategy (EvoPress: 12 offspring on 256 "
    "tokens, then 2 survivors + parent on 1,024; Optuna samplers: 6 candidates on 1,024). "
    "Optuna samplers use the budget-exact random-key encoding."
)


def single_objective_tables(single: dict) -> list[str]:
    """Best KL per seed and the best-so-far curve of every strategy."""
    lines = [
        "## Best KL after the whole budget (mean ± sd over seeds, lower is better)",
        "",
        "| strategy | seeds | tokens spent (seed 0) | best KL per seed | mean | sd |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in single.items():
        best = [x["best_kl"] for x in runs]
        sd = statistics.stdev(best) if len(best) > 1 else float("nan")
        tokens = runs[0]["curve"][-1]["tokens"]
        lines.append(
            f"| {name} | {len(runs)} | {tokens} | {', '.join(f'{b:.3f}' for b in best)} | "
            f"{statistics.mean(best):.3f} | {sd:.3f} |"
        )
    n_gens = min(len(x["curve"]) for runs in single.values() for x in runs)
    lines += [
        "",
        "## Best-so-far KL per generation (seed mean; tokens actually spent in brackets)",
        "",
        "Every strategy is granted 6,144 tokens per generation; repeated genomes are "
        "memoised, not re-evaluated, so a strategy that proposes duplicates spends less.",
        "",
        "| strategy | " + " | ".join(f"gen {i}" for i in range(n_gens)) + " |",
        "|---" * (1 + n_gens) + "|",
    ]
    for name, runs in single.items():
        means = [statistics.mean(x["curve"][i]["best"] for x in runs) for i in range(n_gens)]
        toks = [statistics.mean(x["curve"][i]["tokens"] for x in runs) for i in range(n_gens)]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m:.3f} ({t / 1000:.1f}k)" for m, t in zip(means, toks))
            + " |"
        )
    return lines


def front_table(entries: dict, names: dict[str, str], x_name: str, scale: float) -> list[str]:
    """Hypervolume, size, tokens and dominance of each front, per seed."""
    lines = [
        f"| seed | front | points (KL @ {x_name}) | tokens | hypervolume | dominates the "
        "single-objective front |",
        "|---|---|---|---|---|---|",
    ]
    for seed, entry in entries.items():
        for key, label in names.items():
            if key not in entry:
                continue
            e = entry[key]
            xs = ", ".join(f"{kl:.3f} @ {x / scale:.4g}" for kl, x in e["front"])
            dom = "—" if key == "single" else ("**yes**" if e["dominates_single"] else "no")
            lines.append(
                f"| {seed} | {label} | {len(e['front'])} ({xs}) | {e['tokens']} | "
                f"{e['hypervolume']:.4g} | {dom} |"
            )
    return lines


def layer_drop(r: dict) -> list[str]:
    lines = [
        "# Strategies on SmolLM2-135M layer drop (7 of 30 blocks)",
        "",
        f"Status: **{r['status']}**. Command: `{r['command']}`",
        "",
    ]
    if "single_objective_command" in r:
        lines += [f"Single-objective part: `{r['single_objective_command']}`", ""]
    lines += [
        f"Machine: {r['machine']}. Calibration: 8 x 128 WikiText-2 valid tokens; fitness "
        f"KL(dense‖candidate) on all 1,024 of them. {BUDGET}",
        "",
        *single_objective_tables(r["single_objective"]),
    ]
    if r["multi_objective"]:
        lines += [
            "",
            "## Multi-objective: KL vs parameters over 3..15 dropped blocks",
            "",
            "Hypervolume against (KL 8.0, dense parameter count); higher is better. The "
            "single-objective front is five EvoPress runs at 3, 6, 9, 12 and 15 blocks; every "
            "front spends the same number of 6,144-token generations (tokens actually spent in "
            "the table). A front *dominates* when each single-objective point is matched or "
            "beaten in both KL and parameters by one of its points. Points are listed as "
            "KL @ parameters.",
            "",
            *front_table(
                r["multi_objective"],
                {
                    "evopress_grid": "multi-budget EvoPress, budgets 3,6,9,12,15",
                    "evopress": "multi-budget EvoPress, budgets 3..15",
                    "nsga2": "NSGA-II, budgets 3..15",
                    "single": "5 single-objective EvoPress runs",
                },
                "M parameters",
                1e6,
            ),
        ]
    return lines


def sparsity(r: dict) -> list[str]:
    return [
        "# Strategies on SmolLM2-135M per-layer sparsity (Wanda, 60 % average)",
        "",
        f"Status: **{r['status']}**. Command: `{r['command']}`",
        "",
        f"Machine: {r['machine']}. Space: {r['space']}. Calibration: 8 x 128 WikiText-2 valid "
        f"tokens; fitness KL(dense‖candidate) on all 1,024 of them. {BUDGET} Every strategy "
        "starts from the uniform allocation. Uniform's KL on the same tokens: "
        + ", ".join(
            f"seed {x['seed']}: {x['uniform_kl']:.3f}"
            for x in r["single_objective"].get("evopress", [])
            if x.get("uniform_kl") is not None
        )
        + ".",
        "",
        *single_objective_tables(r["single_objective"]),
    ]


def sparsity_mo(r: dict) -> list[str]:
    lines = [
        "# Multi-objective per-layer sparsity on SmolLM2-135M: KL vs density, 50..70 % (Wanda)",
        "",
        f"Status: **{r['status']}**. Command: `{r['command']}`",
        "",
        f"Machine: {r['machine']}. Hypervolume against (KL 8, density 1); higher is better. "
        "Points are listed as KL @ density (1 - sparsity).",
        "",
        *front_table(
            r["runs"],
            {
                "evopress": "multi-budget EvoPress, 50,55,60,65,70 %",
                "nsga2": "NSGA-II, 50..70 %",
                "single": "5 single-objective EvoPress runs",
            },
            "density",
            1.0,
        ),
        "",
        "Uniform allocation at each sparsity (KL on the same tokens): "
        + "; ".join(
            f"seed {seed}: " + ", ".join(f"{1 - d:.2f}: {kl:.3f}" for kl, d in e["uniform"])
            for seed, e in r["runs"].items()
        ),
    ]
    return lines


def main() -> None:
    for stem, render in (
        ("results", layer_drop),
        ("results_sparsity", sparsity),
        ("results_sparsity_mo", sparsity_mo),
    ):
        src = HERE / f"{stem}.json"
        if src.is_file():
            (HERE / f"{stem}.md").write_text("\n".join(render(json.loads(src.read_text()))) + "\n")


if __name__ == "__main__":
    main()
