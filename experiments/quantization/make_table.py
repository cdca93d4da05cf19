"""Collect ``runs/*.json`` of ``run.py`` into ``results.json`` (next to the parts it already
holds) and the tables of ``results.md``."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _per_layer(r: dict) -> list[str]:
    """Per layer kind: mean bits (int) or the count of each type (GGUF), per allocation; and
    the searched allocation's bits per block."""
    levels = r.get("layer_bits") or r.get("layer_types")
    out = ["| allocation | " + " | ".join(_kinds(levels)) + " |"]
    out.append("|---" * (len(_kinds(levels)) + 1) + "|")
    for name, per_layer in levels.items():
        cells = []
        for kind in _kinds(levels):
            vals = [v for k, v in per_layer.items() if _kind(k) == kind]
            if all(isinstance(v, int) for v in vals):
                cells.append(f"{sum(vals) / len(vals):.2f}")
            else:
                cells.append(" ".join(f"{t}x{vals.count(t)}" for t in sorted(set(vals))))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if "block_bits" in r:
        out += ["", "Searched bits per weight by block (0..29, scales and zeros included): "]
        out.append(", ".join(f"{b:.2f}" for b in r["block_bits"]["searched"]))
    return out


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _kinds(levels: dict) -> list[str]:
    first = next(iter(levels.values()))
    return list(dict.fromkeys(_kind(k) for k in first))


def main() -> None:
    # parts already in results.json are kept unless runs/ holds a (complete) rerun of them
    file = HERE / "results.json"
    runs = json.loads(file.read_text()) if file.is_file() else {}
    runs.update(
        {p.stem: json.loads(p.read_text()) for p in sorted((HERE / "runs").glob("*.json"))}
    )
    runs = dict(sorted(runs.items()))
    (HERE / "results.json").write_text(json.dumps(runs, indent=1) + "\n")
    lines = []
    for name, r in runs.items():
        lines += [f"## {name}", "", f"`{r['command']}` ({r['machine']})", ""]
        lines += ["| allocation | bits/weight | WikiText-2 test ppl |", "|---|---:|---:|"]
        for k, v in r["test_ppl"].items():
            bits = r["bits_per_weight"].get(k)
            lines.append(f"| {k} | {'' if bits is None else f'{bits:.4f}'} | {v:.3f} |")
        lines += ["", "| export | file bytes | load s | generate s (32 tok) | max logit diff |"]
        lines += ["|---|---:|---:|---:|---:|"]
        exports = r.get("exports_ct") or r.get("exports_gguf")
        for k, v in {**exports, "dense (safetensors fp32)": r["dense_latency"]}.items():
            diff = v.get("max_abs_logit_diff")
            lines.append(
                f"| {k} | {v['file_bytes']:,} | {v['load_seconds']} | {v['generate_seconds']} "
                f"| {'' if diff is None else f'{diff:.2e}'} |"
            )
        lines += ["", *_per_layer(r), ""]
        db = r["database_bytes"] / 2**20
        lines += [
            "",
            f"Database {db:.0f} MiB, built in {r['database_build_seconds']} s; search "
            f"{r['evaluations']} evaluations in {r['search_seconds']} s "
            f"({r['evaluations_per_second']} evaluations/s); wall {r['wall_seconds']} s.",
            "",
        ]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
