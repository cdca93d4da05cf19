"""Merge ``results_<model>.json`` into ``results.json`` and print the markdown tables (and the
ranking table when ``ranking.json`` exists).

    .venv/bin/python experiments/healing/make_table.py > experiments/healing/results.md
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(h: dict) -> str:
    """1-minute load average at the start and end of a healing job (shared cores)."""
    run = h.get("run")
    if not run:
        return ""
    return f"{run['started']['load_average'][0]} -> {run['finished']['load_average'][0]}"


def healing_table(merged: dict) -> None:
    print("| model | healing tokens | steps | WikiText-2 test ppl | C4 ppl | held-out KL "
          "| blocks | sparsity (zeros) | healing wall s (upper bound) | load avg |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, res in merged.items():
        row = res.get(name, {})
        base = row.get("unhealed", {})
        if base:
            print(f"| {name} | 0 (unhealed) | | {base['wikitext2_test']:.2f} | {base['c4']:.2f} "
                  "| | | | | |")  # fmt: skip
        for key in sorted((k for k in row if k.startswith("healed_")), key=lambda k: int(k[7:])):
            h = row[key]
            sb, sa = h["structure_before"], h["structure_after"]
            print(
                f"| {name} | {h['tokens']} | {h['steps']} | {h['wikitext2_test']:.2f} "
                f"| {h['c4']:.2f} | {h['held_out_before']:.3f} -> {h['held_out_after']:.3f} "
                f"| {sb['blocks']} -> {sa['blocks']} "
                f"| {sb['sparsity']:.6f} ({sb['zeros']}) -> {sa['sparsity']:.6f} ({sa['zeros']}) "
                f"| {h['seconds']} | {_load(h)} |"
            )


def ranking_table(ranking: dict) -> None:
    """Wanda 70 %: the searched allocation vs the heuristics, before and after healing."""
    print("\n| allocation (Wanda 70 %) | measured sparsity | WikiText-2 before | after "
          "| C4 before | after | held-out KL before -> after | zeros kept "
          "| healing tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in ranking.items():
        if not isinstance(row, dict) or "unhealed" not in row:
            continue
        base = row["unhealed"]
        healed = [v for k, v in row.items() if k.startswith("healed_")]
        if not healed:
            print(f"| {name} | {row.get('sparsity', 0):.6f} | {base['wikitext2_test']:.2f} | "
                  f"(not healed yet) | {base['c4']:.2f} | | | | |")  # fmt: skip
            continue
        for h in healed:
            kept = "yes" if h["zeros_before"] == h["zeros_after"] else "NO"
            print(
                f"| {name} | {row.get('sparsity', 0):.6f} | {base['wikitext2_test']:.2f} "
                f"| {h['wikitext2_test']:.2f} | {base['c4']:.2f} | {h['c4']:.2f} "
                f"| {h['held_out_before']:.3f} -> {h['held_out_after']:.3f} "
                f"| {kept} ({h['zeros_after']}) | {h['tokens']} |"
            )


def main() -> None:
    merged = {}
    for file in sorted(HERE.glob("results_*.json")):
        merged[file.stem.removeprefix("results_")] = json.loads(file.read_text())
    (HERE / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    healing_table(merged)
    if (HERE / "ranking.json").is_file():
        ranking_table(json.loads((HERE / "ranking.json").read_text()))


if __name__ == "__main__":
    main()
