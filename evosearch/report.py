"""Run reports: a self-contained ``report.html`` with PNG figures, and ``pareto.csv/json``.

A report reads only the files a search leaves in its run directory (``results.json``), so it can
be rebuilt at any time and for runs made by older versions::

    out/
      report.html        figures inlined as base64 PNGs, the compared candidates as an SVG
                         scatter whose points show genome and metrics on hover; no network needed
      convergence.png    best fitness vs evaluations, calibration tokens and evaluation time
      layers.png         per-unit levels of every compared candidate (one heat-map strip each;
                         a quantization run: bits per weight of each layer kind by block)
      pareto.png         candidates: calibration fitness (and perplexity) vs share of units dropped
      pareto.csv/.json   every candidate with its genome, metrics, run and model path

Several runs given together are overlaid in one convergence figure and tabulated side by side.
Matplotlib is imported inside the plotting functions (Agg backend), so ``import evosearch``
stays fast.

Example:
    >>> write_report(["runs/d7"])            # writes runs/d7/report.html
    >>> write_report(["runs/d4", "runs/d7"], "runs/compare")
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evosearch.errors import atomic_write_text, read_json
from evosearch.genome import Genome
from evosearch.rundir import check_finished

__all__ = [
    "CandidatePoint",
    "RunRecord",
    "candidate_points",
    "convergence_curve",
    "load_run",
    "pareto_flags",
    "block_sparsities",
    "layer_bits",
    "level_bits",
    "unit_levels",
    "write_report",
]


@dataclass(frozen=True)
class RunRecord:
    """One finished run as the report sees it.

    Attributes:
        name: short label (the run directory's name, made unique among compared runs).
        path: the run directory.
        results: the parsed ``results.json``.
    """

    name: str
    path: Path
    results: dict[str, Any]

    @property
    def fitness_name(self) -> str:
        return self.results.get("config", {}).get("fitness", "fitness")

    @property
    def space(self) -> dict[str, Any]:
        return self.results.get("space", {})


@dataclass(frozen=True)
class CandidatePoint:
    """One compared candidate (the search result or a baseline) of one run.

    Attributes:
        run: the run's label; candidate: ``evopress``, ``random``, ``shortgpt``...
        genome: the genome key (one base-36 digit per unit).
        units_dropped: sum of the genome's levels (dropped blocks or sublayers).
        metrics: ``calibration <fitness>`` and ``ppl <source>`` values.
        model: the run's model path or name.
        pareto: not dominated by any other point (a smaller share dropped, or worse on every
            metric).
    """

    run: str
    candidate: str
    genome: str
    units_dropped: int
    metrics: dict[str, float]
    model: str
    pareto: bool = field(default=False, compare=False)

    @property
    def dropped_share(self) -> float:
        """Levels summed over units, per unit: the share of blocks (or of sublayers) dropped,
        comparable between block and sublayer searches of one model."""
        return self.units_dropped / max(1, len(self.genome))


def strategy_name(results: dict, default: str = "evopress") -> str:
    """The strategy of a run's results (a nested config's ``strategy.name``; earlier runs
    saved the name itself)."""
    strategy = results.get("config", {}).get("strategy", default)
    return strategy.get("name", default) if isinstance(strategy, dict) else strategy


def load_run(path: str | Path, name: str | None = None) -> RunRecord:
    """Read ``path/results.json``.

    Raises:
        FileNotFoundError: the directory holds no ``results.json`` (the search is unfinished).
        ValueError: ``results.json`` is not a search result (no ``history``).
    """
    path = Path(path)
    file = path / "results.json"
    if not file.is_file():
        check_finished(path, model=False)  # says what is missing and how to finish the run
    results = read_json(file, "cannot read the run's results")
    if "history" not in results:
        raise ValueError(f"{file} is not a search result (no 'history'); was it a baseline run?")
    return RunRecord(name or path.resolve().name, path, results)


def convergence_curve(results: dict[str, Any]) -> dict[str, list[float]]:
    """Best fitness after each generation against the cost spent so far.

    Costs are cumulated from the evaluation log up to and including each generation: number of
    evaluations, calibration tokens and evaluation seconds (forward time, not wall time).

    Returns:
        ``{"generation", "value", "elite_value", "elite_se", "evaluations", "tokens",
        "seconds"}``, one entry per generation of ``results["history"]``: ``value`` is the
        best genome's fitness on that generation's last batch, ``elite_value`` / ``elite_se``
        its estimate pooled over every sequence it has been scored on and the standard error
        (``nan`` where the run did not record them).
    """
    per_gen: dict[int, list[float]] = {}
    for record in results.get("evaluations", []):
        g = int(record.get("generation", 0))
        acc = per_gen.setdefault(g, [0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += float(record.get("tokens", 0))
        acc[2] += float(record.get("seconds", 0.0))
    keys = ("generation", "value", "elite_value", "elite_se", "evaluations", "tokens", "seconds")
    curve: dict[str, list[float]] = {k: [] for k in keys}
    for h in sorted(results.get("history", []), key=lambda h: h["generation"]):
        g = int(h["generation"])
        done = [acc for gen, acc in per_gen.items() if gen <= g]
        curve["generation"].append(g)
        curve["value"].append(float(h["value"]))
        for key in ("elite_value", "elite_se"):
            curve[key].append(math.nan if h.get(key) is None else float(h[key]))
        curve["evaluations"].append(sum(a[0] for a in done))
        curve["tokens"].append(sum(a[1] for a in done))
        curve["seconds"].append(sum(a[2] for a in done))
    return curve


def _genome_from_description(desc: dict[str, Any], space: dict[str, Any]) -> str:
    """Rebuild a layer-drop genome key from ``space.describe`` output (for old results)."""
    n = int(space.get("n_blocks", 0))
    if space.get("sublayers"):
        attn = set(desc.get("dropped_attention", [])) | set(desc.get("dropped_blocks", []))
        mlp = set(desc.get("dropped_mlp", [])) | set(desc.get("dropped_blocks", []))
        return "".join("1" if i in attn else "0" for i in range(n)) + "".join(
            "1" if i in mlp else "0" for i in range(n)
        )
    blocks = set(desc.get("dropped_blocks", []))
    return "".join("1" if i in blocks else "0" for i in range(n))


def _candidates(run: RunRecord) -> dict[str, str]:
    """``{candidate: genome key}``: the search result first, then the baselines."""
    results = run.results
    strategy = strategy_name(results)
    out = {strategy: results["best"]["genome"]}
    for name, desc in results.get("baselines", {}).items():
        if name not in out:
            out[name] = desc.get("genome") or _genome_from_description(desc, run.space)
    return out


def unit_levels(genome: str, space: dict[str, Any]) -> dict[str, list[int]]:
    """Levels of a genome laid out per block: ``{row label: [level of block 0, 1, ...]}``.

    A layer-drop genome over blocks is one row (1 = dropped); over sublayers, two rows
    (attention, MLP). Any other space is one row over its units, so per-layer sparsity or width
    levels show the same way.
    """
    levels = list(Genome.from_key(genome).levels)
    n = int(space.get("n_blocks", len(levels)))
    if space.get("space") == "layer-drop" and space.get("sublayers") and len(levels) == 2 * n:
        return {"attention": levels[:n], "mlp": levels[n:]}
    return {"dropped" if space.get("space") == "layer-drop" else "level": levels}


def candidate_points(runs: Sequence[RunRecord]) -> list[CandidatePoint]:
    """Every compared candidate of every run, with its metrics and Pareto flag."""
    points = []
    for run in runs:
        results = run.results
        calib = results.get("calibration_fitness", {})
        ppl = results.get("perplexity", {})
        candidates = _candidates(run)
        result_name = next(iter(candidates))
        for name, genome in candidates.items():
            metrics: dict[str, float] = {}
            if name in calib:
                metrics[f"calibration {run.fitness_name}"] = float(calib[name])
            elif name == result_name:  # results without a full-data rescoring: last stage's
                metrics[f"calibration {run.fitness_name}"] = float(
                    results["best"].get(run.fitness_name, float("nan"))
                )
            for source, value in ppl.get(name, {}).items():
                metrics[f"ppl {source}"] = float(value)
            points.append(
                CandidatePoint(
                    run=run.name,
                    candidate=name,
                    genome=genome,
                    units_dropped=sum(Genome.from_key(genome).levels),
                    metrics=metrics,
                    model=str(results.get("config", {}).get("model", "")),
                )
            )
        points.extend(_front_points(run))
    flags = pareto_flags(points)
    return [dataclasses.replace(p, pareto=flag) for p, flag in zip(points, flags)]


def _front_points(run: RunRecord) -> list[CandidatePoint]:
    """The points of a multi-objective run's front (``pareto_front.json``), if it has one."""
    path = run.path / "pareto_front.json"
    if not path.is_file():
        return []
    front = json.loads(path.read_text())["front"]
    return [
        CandidatePoint(
            run=run.name,
            candidate=f"front-{i + 1}",
            genome=row["genome"],
            units_dropped=sum(Genome.from_key(row["genome"]).levels),
            metrics={f"calibration {run.fitness_name}": float(row[run.fitness_name])},
            model=row.get("materialise", ""),
        )
        for i, row in enumerate(front)
    ]


def pareto_flags(points: Sequence[CandidatePoint]) -> list[bool]:
    """True for points no other point dominates.

    Objectives: maximise ``dropped_share`` (compression), minimise every metric both points
    have (calibration fitness, perplexities). Points sharing no metric do not dominate each
    other.
    """
    flags = []
    for p in points:
        dominated = False
        for q in points:
            if q is p:
                continue
            shared = sorted(set(p.metrics) & set(q.metrics))
            if not shared:
                continue
            no_worse = q.dropped_share >= p.dropped_share and all(
                q.metrics[k] <= p.metrics[k] for k in shared
            )
            better = q.dropped_share > p.dropped_share or any(
                q.metrics[k] < p.metrics[k] for k in shared
            )
            if no_worse and better:
                dominated = True
                break
        flags.append(not dominated)
    return flags


# -- figures ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(curve: dict[str, list[float]]) -> tuple[list[float], list[float]]:
    """The pooled estimate minus and plus its standard error (no band where there is none)."""
    se = [e if math.isfinite(e) else 0.0 for e in curve["elite_se"]]
    values = curve["elite_value"]
    return [v - e for v, e in zip(values, se)], [v + e for v, e in zip(values, se)]


def _plot_convergence(runs: Sequence[RunRecord], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    xs = (
        ("evaluations", "evaluations"),
        ("tokens", "calibration tokens"),
        ("seconds", "evaluation time (s)"),
    )
    for run in runs:
        curve = convergence_curve(run.results)
        pooled = any(math.isfinite(v) for v in curve["elite_value"])
        for ax, (key, label) in zip(axes, xs):
            x = curve[key]
            line = ax.step(
                x,
                curve["elite_value"] if pooled else curve["value"],
                where="post",
                marker="o",
                ms=3,
                label=f"{run.name}: elite, pooled ± SE" if pooled else run.name,
            )[0]
            if pooled:  # the per-batch value beside the pooled estimate
                lo, hi = _band(curve)
                ax.fill_between(x, lo, hi, step="post", alpha=0.2, color=line.get_color())
                ax.plot(
                    x,
                    curve["value"],
                    "x:",
                    ms=4,
                    color=line.get_color(),
                    alpha=0.7,
                    label=f"{run.name}: on its generation's batch",
                )
            ax.set_xlabel(label)
    names = sorted({run.fitness_name for run in runs})
    axes[0].set_ylabel(f"best {' / '.join(names)}")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Best genome's fitness: pooled over every sequence it was scored on (± standard "
        "error), and on each generation's last batch"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def block_sparsities(run: RunRecord) -> dict[str, list[float]] | None:
    """``{candidate: sparsity of each block}`` for a sparsity run (``None`` otherwise)."""
    results = run.results
    strategy = strategy_name(results)
    described = {strategy: results.get("best", {}), **results.get("baselines", {})}
    out = {n: d.get("block_sparsity") for n, d in described.items()}
    return out if out and all(isinstance(v, list) for v in out.values()) else None


def level_bits(level: int | str) -> float:
    """Bits per weight of a quantized layer's level: a bit-width, or a GGUF type's block bytes
    per weight (``Q4_0``: 4.5; scales included)."""
    if isinstance(level, (int, float)):
        return float(level)
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[level]]
    return 8 * nbytes / block


def layer_bits(run: RunRecord) -> dict[str, dict[str, list[float]]] | None:
    """``{candidate: {layer kind: bits per weight of that layer in block 0, 1, ...}}`` for a
    quantization run (``None`` otherwise), from each candidate's ``layer_levels``; a layer
    outside the blocks (a token embedding unit) is its own kind with one value."""
    results = run.results
    described = {strategy_name(results): results.get("best", {}), **results.get("baselines", {})}
    levels = [d.get("layer_levels") for d in described.values()]
    if not all(isinstance(x, dict) for x in levels) or not all(
        isinstance(v, (int, float, str)) for x in levels for v in x.values()
    ):  # not one bit-width per layer (e.g. the joint space's [sparsity, bits] pairs)
        return None
    out: dict[str, dict[str, list[float]]] = {}
    for name, desc in described.items():
        kinds: dict[str, dict[int, float]] = {}
        for layer, level in desc["layer_levels"].items():
            parts = layer.split(".")
            block = next((int(p) for p in parts if p.isdigit()), -1)
            kinds.setdefault(parts[-1], {})[block] = level_bits(level)
        out[name] = {k: [v for _, v in sorted(b.items())] for k, b in kinds.items()}
    return out


def _quant_table(run: RunRecord) -> str:
    """Per candidate: bits per weight, bytes and the mean bits of each layer kind."""
    bits = layer_bits(run) or {}
    results = run.results
    described = {strategy_name(results): results.get("best", {}), **results.get("baselines", {})}
    kinds = list(dict.fromkeys(k for per in bits.values() for k in per))
    rows = [
        [name, desc.get("bits_per_weight", ""), desc.get("quant_bytes", "")]
        + [sum(bits[name][k]) / len(bits[name][k]) if k in bits[name] else "" for k in kinds]
        for name, desc in described.items()
    ]
    return _table(["candidate", "bits/weight", "bytes", *kinds], rows, "bits")


def _plot_layers(runs: Sequence[RunRecord], path: Path) -> None:
    if all(layer_bits(run) for run in runs):
        return _plot_bits(runs, path)
    plt = _pyplot()
    rows: list[tuple[str, list[float]]] = []
    sparsity = all(block_sparsities(run) for run in runs)
    for run in runs:
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        if sparsity:
            rows.extend((f"{prefix}{n}", v) for n, v in block_sparsities(run).items())
            continue
        for name, genome in _candidates(run).items():
            for kind, levels in unit_levels(genome, run.space).items():
                suffix = "" if kind in ("dropped", "level") else f" ({kind})"
                label = f"{prefix}{name}{suffix}"
                rows.append((label, levels))
    width = max(len(levels) for _, levels in rows)
    grid = [levels + [0] * (width - len(levels)) for _, levels in rows]
    if sparsity:
        low, top = min(min(r) for r in grid), max(max(r) for r in grid)
        label, ticks = "block sparsity", None
    else:
        low, top = 0, max(1, max(max(r) for r in grid))
        label = "level (1 = dropped)" if top == 1 else "level"
        ticks = list(range(top + 1))
    _heat_map(plt, rows, grid, width, path, vmin=low, vmax=top, label=label, ticks=ticks)


def _plot_bits(runs: Sequence[RunRecord], path: Path) -> None:
    """Bits per weight of every block layer (one strip per candidate and layer kind)."""
    plt = _pyplot()
    rows: list[tuple[str, list[float]]] = []
    for run in runs:
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        for name, kinds in (layer_bits(run) or {}).items():
            rows.extend((f"{prefix}{name} {k}", v) for k, v in kinds.items() if len(v) > 1)
    width = max(len(v) for _, v in rows)
    grid = [v + [float("nan")] * (width - len(v)) for _, v in rows]
    values = [x for r in grid for x in r if x == x]
    _heat_map(
        plt, rows, grid, width, path, vmin=min(values), vmax=max(values),
        label="bits per weight", ticks=None, cmap="viridis",
    )  # fmt: skip


def _heat_map(
    plt, rows, grid, width, path: Path, *, vmin, vmax, label, ticks, cmap="Reds"
) -> None:
    fig, ax = plt.subplots(
        figsize=(min(16, 3 + 0.35 * width), 1 + 0.38 * len(rows)), constrained_layout=True
    )
    image = ax.imshow(
        grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_xticks(range(width), [str(i) for i in range(width)], fontsize=7)
    ax.set_xticks([x - 0.5 for x in range(1, width)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(rows))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("block index")
    bar = fig.colorbar(image, ax=ax, pad=0.01, ticks=ticks)
    bar.set_label(label)
    ax.set_title("Per-layer picture of the compared candidates")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _metric_names(points: Sequence[CandidatePoint]) -> list[str]:
    names: list[str] = []
    for p in points:
        names.extend(k for k in p.metrics if k not in names)
    return names


def _plot_pareto(points: Sequence[CandidatePoint], path: Path) -> None:
    plt = _pyplot()
    metrics = _metric_names(points)
    fig, axes = plt.subplots(
        1,
        max(1, len(metrics)),
        figsize=(4.6 * max(1, len(metrics)), 3.6),
        constrained_layout=True,
        squeeze=False,
    )
    multi = len({q.run for q in points}) > 1
    for ax, metric in zip(axes[0], metrics):
        # candidates that coincide (same units, same value) share one point and one label
        groups: dict[tuple[int, float], list[CandidatePoint]] = {}
        for p in points:
            if metric in p.metrics:
                groups.setdefault((p.dropped_share, p.metrics[metric]), []).append(p)
        for (x, y), group in groups.items():
            front = any(p.pareto for p in group)
            ax.scatter(
                x,
                y,
                s=60 if front else 36,
                marker="*" if front else "o",
                edgecolor="black",
                linewidth=0.5,
            )
            label = ", ".join(f"{p.run}:{p.candidate}" if multi else p.candidate for p in group)
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
        shares = sorted({x for x, _ in groups})
        ax.set_xticks(shares, [f"{x:.0%}" for x in shares])
        ax.set_xlim(shares[0] - 0.05, shares[-1] + 0.05)
        ax.set_xlabel("share of units dropped")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle("Compared candidates (star: Pareto-optimal; lower is better)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- files -----------------------------------------------------------------------------------


def _write_pareto_files(points: Sequence[CandidatePoint], out: Path) -> None:
    rows = [
        {
            "run": p.run,
            "candidate": p.candidate,
            "model": p.model,
            "genome": p.genome,
            "units_dropped": p.units_dropped,
            "dropped_share": round(p.dropped_share, 6),
            "pareto": p.pareto,
            **p.metrics,
        }
        for p in points
    ]
    (out / "pareto.json").write_text(json.dumps(rows, indent=1) + "\n")
    columns = ["run", "candidate", "model", "genome", "units_dropped", "dropped_share", "pareto"]
    columns += _metric_names(points)
    with (out / "pareto.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], klass: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{klass}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img class="figure" alt="{html.escape(alt)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)} '
        f"({html.escape(path.name)})</figcaption></figure>"
    )


def _svg_scatter(points: Sequence[CandidatePoint], metric: str) -> str:
    """An inline SVG scatter of ``metric`` vs share dropped; each point's ``<title>`` is its
    tooltip (genome and metrics), shown by the browser on hover without any script."""
    pts = [p for p in points if metric in p.metrics]
    if not pts:
        return ""
    w, h, m = 440, 260, 72
    xs = [p.dropped_share for p in pts]
    ys = [p.metrics[metric] for p in pts]
    x0, x1 = min(xs) - 0.05, max(xs) + 0.05
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or abs(y0) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m)

    def sy(y: float) -> float:
        return h - m + (y0 - y) / (y1 - y0) * (h - 2 * m)

    parts = [
        f'<svg class="scatter" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img">',
        f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="#333"/>',
        f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="#333"/>',
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">share of units dropped</text>',
        f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" '
        f'text-anchor="middle">{html.escape(metric)}</text>',
    ]
    for y in sorted({min(ys), max(ys)}):
        parts.append(
            f'<text x="{m - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" class="tick">'
            f"{_fmt(y)}</text>"
        )
    for x in sorted(set(xs)):
        parts.append(
            f'<text x="{sx(x):.1f}" y="{h - m + 14}" text-anchor="middle" class="tick">'
            f"{x:.0%}</text>"
        )
    multi = len({p.run for p in pts}) > 1
    for i, p in enumerate(pts):
        tip = "\n".join(
            [
                f"{p.run}: {p.candidate}" if multi else p.candidate,
                f"genome {p.genome}",
                f"units dropped {p.units_dropped} ({p.dropped_share:.0%})",
            ]
            + [f"{k} {v:.6g}" for k, v in p.metrics.items()]
            + (["Pareto-optimal"] if p.pareto else [])
        )
        jitter = (i % 5 - 2) * 3  # candidates often share (units, value): fan them out
        klass = "point pareto" if p.pareto else "point"
        parts.append(
            f'<circle class="{klass}" cx="{sx(p.dropped_share) + jitter:.1f}" '
            f'cy="{sy(p.metrics[metric]):.1f}" r="6" data-candidate="{html.escape(p.candidate)}">'
            f"<title>{html.escape(tip)}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 0.8em 0; } img.figure { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #666; }
svg.scatter { border: 1px solid #eee; margin-right: 1em; font-size: 11px; }
svg.scatter .tick { font-size: 10px; fill: #555; }
circle.point { fill: #4477aa; fill-opacity: 0.75; stroke: #222; }
circle.pareto { fill: #ee6677; } circle.point:hover { stroke-width: 3; }
code { background: #f6f6f6; padding: 0 3px; }
"""


def _run_summary_rows(runs: Sequence[RunRecord]) -> list[list[Any]]:
    def row(label: str, fn) -> list[Any]:
        return [label] + [fn(r) for r in runs]

    def best_value(r: RunRecord) -> Any:
        return r.results.get("calibration_fitness", {}).get(
            strategy_name(r.results, ""),
            r.results["best"].get(r.fitness_name, ""),
        )

    return [
        row("model", lambda r: r.results.get("config", {}).get("model", "")),
        row(
            "space", lambda r: ", ".join(f"{k}={v}" for k, v in r.space.items() if k != "allowed")
        ),
        row("strategy", lambda r: strategy_name(r.results, "")),
        row("fitness", lambda r: r.fitness_name),
        row("generations", lambda r: len(r.results.get("history", [])) - 1),
        row("evaluations", lambda r: r.results.get("n_evaluations", "")),
        row("calibration tokens", lambda r: r.results.get("tokens", "")),
        row("search seconds", lambda r: r.results.get("search_seconds", "")),
        row("best genome", lambda r: r.results["best"]["genome"]),
        row("best: dropped blocks", lambda r: r.results["best"].get("dropped_blocks", "")),
        row("best: calibration fitness (all tokens)", best_value),
        row("best: bits per weight", lambda r: r.results["best"].get("bits_per_weight", "")),
        row("export: file bytes", lambda r: r.results.get("export", {}).get("file_bytes", "")),
        row("export: load + generate s (dense)", _export_seconds),
    ]


def _export_seconds(r: RunRecord) -> str:
    e = r.results.get("export", {})
    if "load_seconds" not in e:
        return ""
    return (
        f"{e['load_seconds']} + {e['generate_seconds']} "
        f"({e.get('dense_load_seconds')} + {e.get('dense_generate_seconds')})"
    )


def _comparison_table(run: RunRecord) -> str:
    results = run.results
    names = list(_candidates(run))
    ppl = results.get("perplexity", {})
    sources = sorted({s for v in ppl.values() for s in v})
    header = ["candidate", "genome", "dropped", f"calibration {run.fitness_name}"]
    header += [f"ppl {s}" for s in sources]
    rows = []
    if "dense" in ppl:
        rows.append(["dense", "", "", ""] + [ppl["dense"].get(s, "") for s in sources])
    desc = {strategy_name(results): results["best"]}
    desc.update(results.get("baselines", {}))
    for name in names:
        d = desc.get(name, {})
        dropped = d.get("dropped_blocks", [])
        if "dropped_attention" in d:
            dropped = f"attn {d['dropped_attention']}, mlp {d['dropped_mlp']}"
        rows.append(
            [
                name,
                _candidates(run)[name],
                dropped,
                results.get("calibration_fitness", {}).get(name, ""),
            ]
            + [ppl.get(name, {}).get(s, "") for s in sources]
        )
    return _table(header, rows, "comparison")


def _svg_curve(values: Sequence[float], width: int = 420, height: int = 140) -> str:
    """An inline SVG polyline of ``values`` (a training loss per step)."""
    lo, hi = min(values), max(values)
    span, n = (hi - lo) or 1.0, max(1, len(values) - 1)
    pts = " ".join(
        f"{10 + (width - 20) * i / n:.1f},{10 + (height - 20) * (hi - v) / span:.1f}"
        for i, v in enumerate(values)
    )
    return (
        f'<svg width="{width}" height="{height}" role="img"><title>training loss per step '
        f'({hi:.4g} .. {lo:.4g})</title><polyline fill="none" stroke="#1f77b4" '
        f'points="{pts}"/></svg>'
    )


_HEAL_COLUMNS = ["model", "path", "held-out loss", "blocks", "sparsity", "block params",
                 "quantized layers (on their grid)"]  # fmt: skip


def _healing_section(runs: Sequence[RunRecord]) -> list[str]:
    """Unhealed vs healed model of every run with ``healed/healing.json``: tokens, held-out
    loss, structure before and after, data notes and the training curve."""
    body = []
    for run in runs:
        file = run.path / "healed" / "healing.json"
        if not file.is_file():
            continue
        rec = json.loads(file.read_text())
        before, after = rec.get("structure", {}), rec.get("structure_after", {})
        rows = [
            ["unhealed", rec.get("model", ""), rec.get("held_out_before", ""),
             before.get("blocks"), before.get("sparsity"), before.get("block_parameters"),
             before.get("quantized_layers", 0)],
            ["healed (emitted)", rec.get("out", ""), rec.get("held_out_after", ""),
             after.get("blocks"), after.get("sparsity"), after.get("block_parameters"),
             after.get("quantized_layers", 0)],
        ]  # fmt: skip
        data = rec.get("data", {})
        body.append(f"<h2>Healing{': ' + html.escape(run.name) if len(runs) > 1 else ''}</h2>")
        body.append(_table(_HEAL_COLUMNS, rows))
        body.append(
            f"<p>{rec.get('tokens')} tokens of {html.escape(str(data.get('source', '')))} in "
            f"{rec.get('steps')} steps ({html.escape(str(rec.get('mode')))}, lr {rec.get('lr')}, "
            f"distilled from {html.escape(str(rec.get('teacher')))}), {rec.get('seconds')} s. "
            + " ".join(html.escape(n) for n in data.get("notes", []))
            + "</p>"
        )
        if rec.get("losses"):
            body.append(_svg_curve(rec["losses"]))
    return body


def _allocation_points(run: RunRecord) -> list[dict[str, Any]]:
    """The points whose description says where their bytes went (``blocks``: per block kept or
    dropped, bytes, sparsity, bits): the Pareto front, else the best genome."""
    file = run.path / "pareto_front.json"
    if file.is_file():
        front = json.loads(file.read_text()).get("front", [])
        if front and "blocks" in front[0]:
            return front
    best = run.results.get("best", {})
    return [best] if "blocks" in best else []


def _block_strip(blocks: Sequence[dict[str, Any]]) -> str:
    """One cell per block: ``-`` dropped, else its bits per weight and its sparsity."""
    return " ".join(
        f"{b['block']}:"
        + (f"{b['bits_per_weight']:.2g}b" if b["kept"] else "-")
        + (f"/{b['sparsity']:.0%}" if b["kept"] and b["sparsity"] else "")
        for b in blocks
    )


def _bytes_section(runs: Sequence[RunRecord]) -> list[str]:
    """Where each point's bytes went (spaces whose descriptions have ``blocks``, e.g. the joint
    drop x sparsity x bits space): blocks dropped, sparsity, bits of the kept blocks."""
    body = []
    for run in runs:
        points = _allocation_points(run)
        if not points:
            continue
        name = run.fitness_name
        rows = []
        for p in sorted(points, key=lambda p: p.get("bytes", 0)):
            kept = [b for b in p["blocks"] if b["kept"]]
            kept_bytes = sum(b["bytes"] for b in kept)
            rows.append(
                [p.get("genome", "")[:12], p.get(name, ""), p.get("bytes", ""),
                 p.get("bits_per_weight", ""), len(p["blocks"]) - len(kept),
                 p.get("sparsity", ""), 8 * kept_bytes / max(1, _kept_weights(kept)),
                 _block_strip(p["blocks"])]
            )  # fmt: skip
        title = f": {html.escape(run.name)}" if len(runs) > 1 else ""
        body.append(f"<h2>Where the bytes went{title}</h2>")
        body.append(
            _table(
                [
                    "genome",
                    name,
                    "bytes",
                    "bits/weight",
                    "blocks dropped",
                    "sparsity",
                    "bits/weight of kept blocks",
                    "per block: bits/weight / sparsity (- dropped)",
                ],
                rows,
            )  # fmt: skip
        )
        note = run.space.get("sparse_storage")
        body.append(
            "<p>Bytes of the block linears as the export format stores them (codes, scales, "
            "zero points); a dropped block costs none. "
            + (html.escape(note) + ".</p>" if note else "</p>")
        )
    return body


def _kept_weights(kept: Sequence[dict[str, Any]]) -> float:
    """Weights of the kept blocks, from their bytes and bits per weight."""
    return sum(8 * b["bytes"] / b["bits_per_weight"] for b in kept if b["bits_per_weight"])


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write ``report.html``, the PNG figures and ``pareto.csv/json`` for one or more runs.

    Args:
        run_dirs: finished run directories (each with ``results.json``).
        out_dir: where to write; default the run directory when there is one run.

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: no runs, or several runs and no ``out_dir``.
        FileNotFoundError: a run directory without ``results.json``.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    if out_dir is None:
        if len(run_dirs) > 1:
            raise ValueError("comparing several runs needs an output directory (--out)")
        out_dir = run_dirs[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = _load_runs(run_dirs)
    points = candidate_points(runs)
    _write_pareto_files(points, out)
    for name, (_, plot) in _FIGURES.items():
        plot(runs, out / name)
    _plot_pareto(points, out / "pareto.png")
    title = (
        f"evosearch report: {runs[0].name}"
        if len(runs) == 1
        else f"evosearch report: {len(runs)} runs compared"
    )
    body = [f"<h1>{html.escape(title)}</h1>", *_sections(runs, points, out)]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    path = out / "report.html"
    atomic_write_text(path, page)
    return path


_FIGURES = {
    "convergence.png": ("Best fitness vs evaluations, tokens and time", _plot_convergence),
    "layers.png": ("Per-layer picture (dropped units) of the compared candidates", _plot_layers),
}


def _load_runs(run_dirs: Sequence[str | Path]) -> list[RunRecord]:
    """The runs, named by their folder (``name#2`` for a second folder of the same name)."""
    runs: list[RunRecord] = []
    seen: dict[str, int] = {}
    for d in run_dirs:
        base = Path(d).resolve().name
        seen[base] = seen.get(base, 0) + 1
        runs.append(load_run(d, base if seen[base] == 1 else f"{base}#{seen[base]}"))
    return runs


def _sections(runs: list[RunRecord], points, out: Path) -> list[str]:
    """The report's sections after its title, as HTML fragments."""
    body = [
        "<h2>Runs</h2>",
        _table(["", *(r.name for r in runs)], _run_summary_rows(runs), "runs"),
    ]
    body.append("<h2>Search progress</h2>")
    body.append(_img(out / "convergence.png", _FIGURES["convergence.png"][0]))
    body.append(
        "<p>Best value of each generation at the fidelity it was selected at; x: cumulative "
        "evaluations, calibration tokens and forward seconds from the evaluation log.</p>"
    )
    body.append("<h2>Compared with the baselines</h2>")
    for run in runs:
        if len(runs) > 1:
            body.append(f"<h3>{html.escape(run.name)}</h3>")
        body.append(_comparison_table(run))
    body.append(
        "<p>Calibration fitness on all calibration tokens (lower is better); perplexities on "
        "the run's evaluation sets where it computed them.</p>"
    )
    body.extend(_healing_section(runs))
    body.extend(_bytes_section(runs))
    body.append("<h2>Per-layer picture</h2>")
    for run in runs:
        if layer_bits(run):
            head = f"<h3>{html.escape(run.name)}: bits per layer</h3>" if len(runs) > 1 else ""
            body.append(head + _quant_table(run))
    body.append(_img(out / "layers.png", _FIGURES["layers.png"][0]))
    body.append("<h2>Candidates and Pareto front</h2>")
    body.append(
        "<p>Hover a point for its genome and metrics. Red (star in the PNG): Pareto-optimal, "
        "no other candidate drops at least as large a share of units and is at least as good on "
        "every metric both have. Calibration fitness compares runs only when they share "
        "calibration data (model, data, seed). Also in <code>pareto.csv</code> and "
        "<code>pareto.json</code>.</p>"
    )
    body.append(
        "<div>" + "".join(_svg_scatter(points, m) for m in _metric_names(points)) + "</div>"
    )
    body.append(_img(out / "pareto.png", "Compared candidates"))
    return body
