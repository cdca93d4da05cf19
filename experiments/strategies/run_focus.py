"""Multi-budget EvoPress with ``budget_focus`` (each generation serves one budget, in turn) on
the two multi-objective benchmarks of this folder, against the fronts already measured there.

    .venv/bin/python experiments/strategies/run_focus.py --space layer-drop --seeds 0,1,2
    .venv/bin/python experiments/strategies/run_focus.py --space sparsity --seeds 0,1,2 \\
        --db-dir /tmp/leveldb

Same settings, seeds and generations as ``run.py`` (layer drop, budgets 3, 6, 9, 12, 15) and
``run_sparsity_mo.py`` (50..70 %); only ``budget_focus`` differs. The single-objective front and
the default multi-budget front of each seed are read from ``results.json`` /
``results_sparsity_mo.json`` (those runs are deterministic in their seed, so they are not run
again). Writes ``results_focus.json``, one entry per space.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from evosearch.pipeline import run_search

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import DEFAULT_DATA, base_config, mo_config, score_fronts  # noqa: E402
from run_sparsity_mo import base_config as sparsity_base  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--space", choices=("layer-drop", "sparsity"), required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--focus", type=int, default=1)
    p.add_argument("--generations", type=int, default=None, help="default: as the source run")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--db-dir", help="level databases (sparsity; default: evosearch's cache)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results_focus.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.space == "layer-drop":
        source = json.loads((HERE / "results.json").read_text())["multi_objective"]
        default_name, objective = "evopress_grid", "params"
        gens = args.generations or 14
        config = mo_config(
            base_config(args.data_dir, gens),
            gens,
            0,
            strategy="evopress",
            drop_range=(3, 15, 3),
            budget_focus=args.focus,
        )
    else:
        source = json.loads((HERE / "results_sparsity_mo.json").read_text())["runs"]
        default_name, objective = "evopress", "density"
        gens = args.generations or 14
        config = dataclasses.replace(
            sparsity_base(args.data_dir, gens, args.db_dir), budget_focus=args.focus
        )
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    entry = report[args.space] = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, 2 cores, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, CPU; another benchmark shared the CPU",
        "status": "running",
        "focus": args.focus,
        "generations": gens + 1,
        "seeds": {},
    }
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = dataclasses.replace(config, seed=seed)
        run_dir = HERE / "runs_focus" / f"{args.space}-focus{args.focus}-s{seed}"
        t0 = time.perf_counter()
        res = run_search(cfg, run_dir, resume=True, log=print)
        rows = json.loads((run_dir / "pareto_front.json").read_text())
        fronts = {
            "focus": [(r["kl"], r[objective]) for r in rows["front"]],
            "default": [tuple(x) for x in source[str(seed)][default_name]["front"]],
            "single": [tuple(x) for x in source[str(seed)]["single"]["front"]],
        }
        seed_entry = {name: {"front": front} for name, front in fronts.items() if name != "single"}
        seed_entry["single"] = {"front": fronts["single"]}
        seed_entry["focus"].update(
            tokens=sum(e["tokens"] for e in res["evaluations"]),
            evaluations=len(res["evaluations"]),
            seconds=round(time.perf_counter() - t0, 1),
        )
        seed_entry["default"]["tokens"] = source[str(seed)][default_name]["tokens"]
        seed_entry["single"]["tokens"] = source[str(seed)]["single"]["tokens"]
        score_fronts(seed_entry, fronts, tuple(source[str(seed)]["reference"]))
        entry["seeds"][str(seed)] = seed_entry
        out.write_text(json.dumps(report, indent=1) + "\n")
    entry["status"] = "complete"
    out.write_text(json.dumps(report, indent=1) + "\n")
    write_table(report, out.with_suffix(".md"))


def write_table(report: dict, path: Path) -> None:
    """``results_focus.md``: per space and seed, each front's points, hypervolume and whether
    it weakly dominates the single-objective front."""
    lines = ["# Multi-budget EvoPress with budget_focus vs the default and the single runs", ""]
    for space, entry in report.items():
        reference = next(iter(entry["seeds"].values()))["reference"]
        lines += [
            f"## {space} (status: {entry['status']})",
            "",
            f"Command: `{entry['command']}`. {entry['machine']}. Focus {entry['focus']}, "
            f"{entry['generations']} generations; hypervolume against {reference}.",
            "",
            "| seed | front | fitness of its points | tokens | hypervolume "
            "| dominates the single front |",
            "|---|---|---|---|---|---|",
        ]
        names = {
            "focus": "focus (this run)",
            "default": "default multi-budget",
            "single": "5 single runs",
        }
        for seed, e in entry["seeds"].items():
            for key, label in names.items():
                pts = ", ".join(f"{a:.3f}" for a, _ in e[key]["front"])
                dom = "—" if key == "single" else ("yes" if e[key]["dominates_single"] else "no")
                lines.append(
                    f"| {seed} | {label} | {pts} | {e[key]['tokens']} | "
                    f"{e[key]['hypervolume']:.4g} | {dom} |"
                )
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        table_source = HERE / "results_focus.json"
        write_table(json.loads(table_source.read_text()), table_source.with_suffix(".md"))
    else:
        main()
