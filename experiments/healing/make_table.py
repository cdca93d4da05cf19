"""Merge ``results_<model>.json`` into ``results.json`` and print the markdown table.

    .venv/bin/python experiments/healing/make_table.py > experiments/healing/results.md
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    merged = {}
    for file in sorted(HERE.glob("results_*.json")):
        merged[file.stem.removeprefix("results_")] = json.loads(file.read_text())
    (HERE / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    print("| model | healing tokens | steps | WikiText-2 test ppl | C4 ppl | held-out KL "
          "| blocks | sparsity (zeros) | healing wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, res in merged.items():
        row = res.get(name, {})
        base = row.get("unhealed", {})
        if base:
            print(f"| {name} | 0 (unhealed) | | {base['wikitext2_test']:.2f} | {base['c4']:.2f} "
                  "| | | | |")  # fmt: skip
        for key in sorted((k for k in row if k.startswith("healed_")), key=lambda k: int(k[7:])):
            h = row[key]
            sb, sa = h["structure_before"], h["structure_after"]
            print(
                f"| {name} | {h['tokens']} | {h['steps']} | {h['wikitext2_test']:.2f} "
                f"| {h['c4']:.2f} | {h['held_out_before']:.3f} -> {h['held_out_after']:.3f} "
                f"| {sb['blocks']} -> {sa['blocks']} "
                f"| {sb['sparsity']:.6f} ({sb['zeros']}) -> {sa['sparsity']:.6f} ({sa['zeros']}) "
                f"| {h['seconds']} |"
            )


if __name__ == "__main__":
    main()
