"""Render the strategy benchmarks' JSON results as markdown tables.

.venv/bin/python experiments/strategies/make_table.py

``results.json`` (layer drop, run.py) -> ``results.md``; ``results_sparsity.json``
(run_sparsity.py) -> ``results_sparsity.md``; ``results_sparsity_mo.json`` (run_sparsity_mo.py)
-> ``results_sparsity_mo.md``. A file that does not exist yet is skipped.
"""

from __future__ import annotations

import json
import math
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
        *(single_objective_tables(r["single_objective"]) if r["single_objective"] else []),
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
    commands = " ".join(r.get("commands", [r["command"]]))
    variant = ", EvoPress with adaptive switches" if "adaptive" in commands else ""
    variant += ", multi-budget EvoPress with offset steps" if "offset-steps" in commands else ""
    lines = [
        "# Multi-objective per-layer sparsity on SmolLM2-135M: KL vs density, 50..70 % (Wanda)"
        + variant,
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


def at_tokens(run: dict, tokens: int) -> float:
    """A run's best-so-far value once it had spent at most ``tokens``."""
    return min((c["best"] for c in run["curve"] if c["tokens"] <= tokens), default=math.inf)


def per_seed(reports: list[dict], title: str) -> list[str]:
    """One row per seed, one column per strategy, from several reports of the same benchmark
    (e.g. more seeds or a new strategy run later), plus each strategy's best at the tokens
    ``evopress-adaptive`` spent and the means over the seeds every strategy shares."""
    runs: dict[str, dict[int, dict]] = {}
    for r in reports:
        for name, rs in r["single_objective"].items():
            for x in rs:
                runs.setdefault(name, {})[x["seed"]] = x
    names = list(runs)
    seeds = sorted({s for rs in runs.values() for s in rs})
    lines = [
        f"# {title}",
        "",
        "Commands (each wrote one of the JSON files this table merges):",
        "",
        *[f"- `{c}`" for r in reports for c in r.get("commands", [r.get("command")])],
        "",
        f"Machine: {reports[-1]['machine']}. {BUDGET} Best KL after the whole budget "
        "(lower is better; bold: the seed's best); in brackets the best once the strategy "
        "had spent no more tokens than `evopress-adaptive`.",
        "",
    ]
    # the heuristics' KL (uniform, and the warm starts), one column each
    keys = {k for rs in runs.values() for x in rs.values() for k in x if k.endswith("_kl")}
    heuristics = {
        key[: -len("_kl")]: {
            s: x[key] for rs in runs.values() for s, x in rs.items() if x.get(key)
        }
        for key in sorted(keys - {"best_kl"}, key=lambda k: k != "uniform_kl")  # uniform first
    }
    heuristics = {h: v for h, v in heuristics.items() if v}
    lines += [
        "| seed | " + " | ".join([*names, *heuristics]) + " |",
        "|---" * (len(names) + 1 + len(heuristics)) + "|",
    ]
    for seed in seeds:
        ref = runs.get("evopress-adaptive", {}).get(seed)
        budget = ref["curve"][-1]["tokens"] if ref else math.inf
        best = min(rs[seed]["best_kl"] for rs in runs.values() if seed in rs)
        cells = []
        for name in names:
            x = runs[name].get(seed)
            if x is None:
                cells.append("–")
                continue
            v = f"**{x['best_kl']:.3f}**" if x["best_kl"] == best else f"{x['best_kl']:.3f}"
            eq = at_tokens(x, budget)
            cells.append(v + (f" ({eq:.3f})" if eq != x["best_kl"] else ""))
        cells += [f"{v[seed]:.3f}" if seed in v else "–" for v in heuristics.values()]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    common = [s for s in seeds if all(s in rs for rs in runs.values() if len(rs) == len(seeds))]
    full = [n for n in names if len(runs[n]) == len(seeds)]
    lines += [
        f"| mean of seeds {','.join(map(str, common))} | "
        + " | ".join(
            f"{statistics.mean(runs[n][s]['best_kl'] for s in common):.3f}" if n in full else "–"
            for n in names
        )
        + " |" * (len(heuristics) + 1),
    ]
    wins = {n: sum(1 for s in common if all(
        runs[n][s]["best_kl"] <= runs[o][s]["best_kl"] for o in full)) for n in full}  # fmt: skip
    lines += ["", "Seeds won among the strategies run on every seed: "
              + ", ".join(f"{n} {w}" for n, w in wins.items()) + "."]  # fmt: skip
    return lines


def main() -> None:
    for stem, render in (
        ("results", layer_drop),
        ("results_layerdrop_mo_adaptive", layer_drop),
        ("results_sparsity", sparsity),
        ("results_sparsity_mo", sparsity_mo),
        ("results_sparsity_mo_adaptive", sparsity_mo),
        ("results_sparsity_mo_offset", sparsity_mo),
    ):
        src = HERE / f"{stem}.json"
        if src.is_file():
            (HERE / f"{stem}.md").write_text("\n".join(render(json.loads(src.read_text()))) + "\n")
    for out, sources, title in (
        (
            "results_sparsity_adaptive",
            (
                "results_sparsity",
                "results_sparsity_seeds34",
                "results_sparsity_adaptive",
                "results_sparsity_seeds567",
            ),
            "Per-layer sparsity 60 %, eight seeds: EvoPress with adaptive switches vs the rest",
        ),
        (
            "results_sparsity_fisher",
            ("results_sparsity_fisher",),
            "Per-layer sparsity 60 %, every strategy warm-started from the Fisher allocation",
        ),
        (
            "results_layerdrop_adaptive",
            (
                "results",
                "results_layerdrop_seeds34",
                "results_layerdrop_adaptive",
                "results_layerdrop_seeds567",
            ),
            "Layer drop 7 of 30, eight seeds: EvoPress with adaptive switches vs the rest",
        ),
    ):
        files = [HERE / f"{stem}.json" for stem in sources]
        if all(f.is_file() for f in files):
            lines = per_seed([json.loads(f.read_text()) for f in files], title)
            (HERE / f"{out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
