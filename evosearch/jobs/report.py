"""What a finished search tells its user: the summary lines, the selection warning, and the
HTML report (whose failure never loses the results)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from evosearch.config import SearchConfig

__all__ = ["held_out_verdict", "log_summary", "selection_warning", "write_report"]


def write_report(run_dir: Path, log: Callable[[str], None]) -> None:
    """The run's report; a failure here is logged, never raised: results.json is written."""
    try:
        from evosearch.report import write_report as write

        log(f"report: {write([run_dir])}")
    except Exception as exc:  # noqa: BLE001 - the search results must survive any report bug
        log(
            f"warning: report not written ({type(exc).__name__}: {exc}); "
            f"retry with `evosearch report {run_dir}`"
        )


def selection_warning(fitness: dict[str, float], config: SearchConfig) -> str | None:
    """A warning when a baseline scores better than the search's best on all calibration
    tokens (``fitness``: name -> value, lower is better, the search under its strategy's name):
    the search selected on minibatches too small to tell them apart."""
    name = config.strategy.name
    best = fitness[name]
    beaten = {n: v for n, v in fitness.items() if n != name and v < best}
    if not beaten:
        return None
    return (
        f"{', '.join(f'{n} ({v:.4f})' for n, v in sorted(beaten.items(), key=lambda kv: kv[1]))} "
        f"beat{'s' if len(beaten) == 1 else ''} the search's best ({best:.4f}) on all "
        f"{config.data.n_sequences * config.data.seq_len} calibration tokens, though the search "
        f"selected on {config.stages[-1].tokens}-token batches: give the last stage more tokens "
        "(--stages) or the search more generations"
    )


def selection_line(selection: dict, config: SearchConfig) -> str | None:
    """How sure the last generation's choice was: the final stage's flip rate and the best
    genome's estimate pooled over every sequence it was scored on (``None`` without them)."""
    if "flip_rate" not in selection and "elite_value" not in selection:
        return None
    parts = []
    if "flip_rate" in selection:
        rate = selection["flip_rate"]
        parts.append(
            f"the last stage's winner changes in {100 * rate:.0f}% of resampled "
            f"{config.stages[-1].tokens}-token batches"
            + (": give the last stage more tokens (--stages)" if rate > 0.2 else "")
        )
    if "elite_value" in selection:
        se = selection.get("elite_se")
        spread = "" if se is None else f" ± {se:.4f}"
        parts.append(
            f"best {config.fitness} {selection['elite_value']:.4f}{spread} pooled over "
            f"{selection['elite_tokens']:.0f} tokens"
        )
    return "selection: " + "; ".join(parts)


def log_summary(results: dict, config: SearchConfig, log) -> None:
    fit = results["calibration_fitness"]
    log(
        f"calibration {config.fitness} on all {config.data.n_sequences * config.data.seq_len} "
        "tokens: "
        + ", ".join(f"{n} {v:.4f}" for n, v in sorted(fit.items(), key=lambda kv: kv[1]))
    )
    # per-layer detail (e.g. 210 layer sparsities) stays in results.json, not in the log
    short = {
        k: v for k, v in results["best"].items() if not isinstance(v, (dict, list)) or len(v) <= 40
    }
    log(f"best: {short}")
    if line := selection_line(results.get("selection", {}), config):
        log(line)
    if "model_dir" in results:
        log(f"best model saved to {results['model_dir']}")
    if "healed" in results:
        h = results.get("healing", {})
        log(f"healed model (emitted) saved to {results['healed']}: {h.get('tokens')} tokens, "
            f"held-out loss {h.get('held_out_before')} -> {h.get('held_out_after')}")  # fmt: skip


def held_out_verdict(results: dict, config: SearchConfig) -> list[str]:
    """One line per held-out source: the search's perplexity against every baseline's, and
    whether it beats them all, only equals the best (the same genome, or the same value), or
    is worse than some. Empty without held-out perplexity or baselines."""
    table, genomes = results.get("perplexity"), results.get("baselines")
    name = config.strategy.name
    if not table or not genomes or name not in table:
        return []
    others = [n for n in genomes if n != name and n in table]
    if not others:
        return []
    lines = []
    for source, mine in table[name].items():
        ranked = sorted(others, key=lambda n: table[n][source])
        same = [n for n in ranked if genomes[n]["genome"] == genomes[name]["genome"]]
        ties = same or [n for n in ranked if abs(table[n][source] - mine) <= 1e-9 * mine]
        worse = [n for n in ranked if table[n][source] < mine and n not in ties]
        if worse:
            verdict = f"worse than {', '.join(worse)}"
        elif ties:
            how = "the same genome" if same else "the same perplexity"
            rest = [n for n in ranked if n not in ties]
            verdict = f"only equals {', '.join(ties)} ({how})"
            verdict += f", beats {', '.join(rest)}" if rest else ""
        else:
            verdict = "beats every baseline"
        scores = ", ".join(f"{n} {table[n][source]:.2f}" for n in ranked)
        where = Path(source).name
        if source == "generated":
            where = f"text generated with seed {config.seed + 1}"
        lines.append(
            f"held-out perplexity on {where}: {name} {mine:.2f} {verdict} "
            f"({scores}; dense {table['dense'][source]:.2f})"
        )
    return lines
