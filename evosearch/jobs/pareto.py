"""The Pareto front of a multi-objective search: ``pareto_front.json`` / ``.csv`` and its
hypervolume."""

from __future__ import annotations

import json
from typing import Any

from evosearch.evaluation import measure_latency
from evosearch.rundir import RunDir

__all__ = ["write_pareto"]


def write_pareto(problem, run: RunDir, strategy, evaluations: list[dict], log) -> dict[str, Any]:
    """Write the front of ``strategy`` into ``run`` and return its summary."""
    dense_extra = {}
    if "latency" in problem.config.objectives:
        dense_extra["latency"] = measure_latency(problem.model, problem.data.input_ids[:1])
    return _pareto(problem.config, run, strategy, problem.space, log, evaluations, dense_extra)


def _pareto(
    config,
    run: RunDir,
    strategy,
    space,
    log,
    evaluations: list[dict],
    dense_extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The Pareto front of a multi-objective run, its hypervolume, and pareto_front.json/.csv."""
    import csv

    from evosearch.pareto import hypervolume

    names = [config.fitness, *config.objectives]
    front = sorted(strategy.pareto(), key=lambda p: p[1])
    if config.hv_reference is not None:
        reference = list(config.hv_reference)
    else:
        dense = (
            space.dense_metrics()
            if hasattr(space, "dense_metrics")
            else space.metrics(space.dense_genome())
        )
        dense = {**dense, **(dense_extra or {})}
        worst = max(e["value"] for e in evaluations if e.get("value") is not None)
        reference = [worst, *(dense[o] for o in config.objectives)]
    rows = []
    for genome, values in front:
        rows.append(
            {
                "genome": genome.key(),
                **dict(zip(names, values)),
                **space.metrics(genome),
                **space.describe(genome),
                "materialise": f"evosearch export {run.path} --genome {genome.key()} --out DIR",
            }
        )
    hv = hypervolume([v for _, v in front], reference)
    run.write_json(
        "pareto_front.json",
        {"objectives": names, "reference": reference, "hypervolume": hv, "front": rows},
    )
    with run.file("pareto_front.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else names)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
            )
    log(
        f"pareto front: {len(rows)} points over {names}, hypervolume {hv:.6g} "
        f"(reference {reference})"
    )
    return {"objectives": names, "reference": reference, "hypervolume": hv, "size": len(rows)}
