"""Render results_equal_time.json (the search from random genomes at SLEB's wall time) and,
when present, results_sublayers.json (sublayer searches at several attention/MLP splits) as
results_equal_time.md; or another results file of run.py, given as the argument, as the same
name with ``.md``.

.venv/bin/python experiments/layer_drop/make_table_equal_time.py [results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import sublayer_runs  # noqa: E402

HEURISTICS = ("sleb", "angular", "shortgpt")


def _fmt(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _rows(run: dict, best_heldout: float | None) -> list[str]:
    rows = []
    for name, m in run["methods"].items():
        ppl = m.get("heldout_ppl")
        verdict = ""
        if name.startswith("search") and ppl is not None and best_heldout is not None:
            verdict = "better" if ppl < best_heldout - 1e-9 else (
                "equal" if abs(ppl - best_heldout) <= 1e-9 else "worse")  # fmt: skip
        blocks = m.get("dropped_blocks")
        if run["sublayers"]:
            blocks = f"attn {m.get('dropped_attention')}, mlp {m.get('dropped_mlp')}"
            if "dropped_attention" not in m:
                blocks = "not scored (see the note)"
        cut = _fmt(1 - m["params_fraction"], ".3f") if "params_fraction" in m else "–"
        rows.append(
            f"| {name} | {m.get('fitness', '–')} | {blocks} | {cut} | "
            f"{_fmt(m.get('calibration_kl'), '.4f')} | {_fmt(m.get('calibration_ppl'))} | "
            f"{_fmt(ppl)} | "
            f"{verdict} | {m['seconds']:.0f} | {m['load']:.1f} | {m.get('evaluations', '–')} | "
            f"{m.get('tokens', '–')} |"
        )
    return rows


def _budget(run: dict) -> str:
    """The search's budget: SLEB's seconds (a wall-clock budget) or its tokens."""
    if run.get("search_seconds_budget") is not None:
        return f"Search budget: {run['search_seconds_budget']:.1f} s of wall time."
    return (
        f"Search budget: {run['search_tokens_budget']} calibration tokens; "
        f"{run['loop']['generations']} generations."
    )


def _load_note(r: dict) -> str:
    """Whether the timed methods ran alone (1-minute load average, our own threads included,
    at the end of each method)."""
    loads = [m["load"] for run in r["runs"].values() for m in run["methods"].values()]
    if loads and max(loads) <= r["settings"]["threads"] + 1.0:
        return (
            f"Nothing else ran while the methods were timed (load average {min(loads):.1f}-"
            f"{max(loads):.1f} with our own {r['settings']['threads']} threads)."
        )
    return (
        "The cores were shared with other jobs (load average in the table: 1-minute, at the "
        "end of each method), so seconds are upper bounds."
    )


def _fitness(s: dict) -> str:
    names = {"kl": "KL(dense‖candidate) with the top-256 teacher", "ppl": "perplexity"}
    chosen = s.get("fitness", ["kl"])
    return " and, in separate searches, ".join(names[f] for f in chosen)


def _budget_rule(s: dict) -> str:
    sublayers = ""
    if s.get("sublayer_budget"):
        sublayers = f" ({s['sublayer_budget']}× for the sublayer searches)"
    if s.get("budget_kind", "tokens") == "time":
        return (
            f"a wall-clock budget of {s['budget']}× SLEB's seconds at the same number of "
            f"blocks{sublayers} (`max_seconds`: the evolution ends when the next generation "
            "and the polish would not fit)"
        )
    return (
        f"generations chosen so that its calibration tokens fit in {s['budget']}× SLEB's"
        f"{sublayers}"
    )


def _polish_stages(s: dict) -> str:
    return f", stages {s['polish_stages']}" if s.get("polish_stages") else ""


def _best_heuristic(run: dict) -> tuple[str, float] | tuple[None, None]:
    scored = [(run["methods"][h].get("heldout_ppl"), h) for h in HEURISTICS]
    if any(v is None for v, _ in scored):
        return None, None
    value, name = min(scored)
    return name, value


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else HERE / "results_equal_time.json"
    r = json.loads(path.read_text())
    extra = HERE / "results_sublayers.json"
    splits = json.loads(extra.read_text()) if extra.is_file() and not argv else None
    s = r["settings"]
    lines = [
        "# Layer drop on SmolLM2-135M: the search from random genomes at SLEB's wall time",
        "",
        f"Status: **{r['status']}**. Command: `{r['command']}`",
        "",
        *([f"Scored again by: `{r['scored_by']}`", ""] if "scored_by" in r else []),
        *([f"Note: {r['note']}", ""] if "note" in r else []),
        f"Machine: {r['machine'].replace(' (shared)', '')}. {_load_note(r)} SLEB and the "
        "searches ran one after another in the same process. Calibration: WikiText-2 *valid*, "
        f"{s['n_sequences']} random windows of {s['seq_len']} tokens (seed 0); search "
        f"fitness {_fitness(s)}; both in bf16. SLEB: perplexity on "
        f"{s['sleb_tokens']} calibration tokens per step. Search: no warm start "
        f"({s['initial_population']} random genomes), {s['offspring']} offspring, stages "
        f"{s['stages']}, locality {s['locality']}, polish {s['polish']} ({s['polish_moves']} "
        f"moves{_polish_stages(s)}), {_budget_rule(s)}. Held out: the first "
        f"{s['eval_windows']} non-overlapping 1,024-token windows of WikiText-2 *test*, fp32.",
        "",
    ]
    blocks = [(f"{k}/30 blocks", run) for k, run in r["runs"].items()]
    for source in (r, splits or {}):
        for run in sublayer_runs(source):
            a = run.get("attention", run["k"])
            title = f"sublayers: {a} attention + {run['k']} MLP of 30"
            if source is splits:
                title += f" (status {splits['status']}; command: `{splits['command']}`)"
                title += f"\n\nNote: {splits['note']}" if "note" in splits else ""
            blocks.append((title, {**run, "k": run.get("sleb_k", run["k"])}))
    for title, run in blocks:
        k = str(run["k"])
        reference = r["runs"].get(k, run)
        heur, best = _best_heuristic(reference)
        lines += [
            f"## {title}",
            "",
            f"{_budget(run)} SLEB took {run['sleb_seconds']} s. "
            f"Best whole-block heuristic on held-out text: {heur or '–'} {_fmt(best)}.",
            "",
            "| method | search fitness | dropped | share of all parameters cut | calibration KL "
            "| calibration ppl | held-out ppl | vs best heuristic | seconds | load | evaluations "
            "| tokens |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *_rows(run, best),
            "",
        ]
    if "dense_heldout_ppl" in r:
        lines += [f"Dense model, held out: {r['dense_heldout_ppl']:.2f}.", ""]
    path.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
