"""Print the markdown tables of experiments/ray_scaling/README.md from the committed JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def overhead(name: str) -> None:
    r = json.loads((HERE / name).read_text())
    print(f"`{r['command']}`\n")
    print(
        "| workers | evals/s (ideal) | efficiency, 10/worker | efficiency, 30/worker "
        "| overhead ms/eval, all-in | fixed ms/request | marginal ms/eval | start-up s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in r["rows"]:
        print(
            f"| {x['workers']} | {x['throughput_eval_per_s']:.2f} "
            f"({x['ideal_throughput_eval_per_s']:.0f}) | {x['efficiency']:.1%} "
            f"| {x['long_efficiency']:.1%} | {x['overhead_ms_per_eval']:.1f} "
            f"| {x['fixed_ms_per_request']:.0f} | {x['marginal_overhead_ms_per_eval']:.1f} "
            f"| {x['startup_s']:.1f} |"
        )


def throughput(*names: str) -> None:
    print("| runner | workers | torch threads | evaluations | search s | evals/s | command |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in names:
        r = json.loads((HERE / name).read_text())
        for x in r["rows"]:
            print(
                f"| {x['runner']} | {x['workers']} | {x['torch_threads']} | "
                f"{x['n_evaluations']} | {x['search_seconds']:.1f} | "
                f"{x['evaluations_per_second']:.3f} | `{name}` |"
            )


if __name__ == "__main__":
    for name in sys.argv[1:] or ["overhead.json"]:
        overhead(name)
        print()
    throughput("throughput.json", "throughput_inprocess_1thread.json")
