"""What a finished search tells its user: the summary lines, the selection warning, and the
HTML report (whose failure never loses the results)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from evosearch.config import SearchConfig

__all__ = ["log_summary", "selection_warning", "write_report"]


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
    if "model_dir" in results:
        log(f"best model saved to {results['model_dir']}")
    if "healed" in results:
        h = results.get("healing", {})
        log(f"healed model (emitted) saved to {results['healed']}: {h.get('tokens')} tokens, "
            f"held-out loss {h.get('held_out_before')} -> {h.get('held_out_after')}")  # fmt: skip
