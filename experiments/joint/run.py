"""Joint drop x sparsity x bits on SmolLM2-135M (issue 26): one multi-budget EvoPress run per
set of dimensions, at the same byte budgets, search settings and seed.

    PYTHONPATH=$PWD .venv/bin/python experiments/joint/run.py --seed 0
    PYTHONPATH=$PWD .venv/bin/python experiments/joint/run.py table

Drives the library directly (joint space, ``Evaluator``, ``MultiBudgetEvoPress``, ``search``),
as ``evosearch search`` does. Calibration: WikiText-2 *valid* (random windows); reported: each
budget's elite's WikiText-2 *test* perplexity on the first ``--eval-windows`` windows, and
where its bytes went. A finished variant is kept in ``runs/`` (rerun resumes at the next).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from evosearch.data import DataSpec, load_token_data
from evosearch.engine import Evaluator, search
from evosearch.forward import compute_dense_cache
from evosearch.jobs.models import evaluate_perplexity, load_eval_data
from evosearch.models import load_model
from evosearch.strategies import EvoPressConfig, MultiBudgetEvoPress, Stage
from evosearch.surgery import apply_replacements
from search_spaces.joint import JointConfig, JointSpace

HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data/wikitext-2-raw")
VARIANTS = {"bits": ("bits",), "drop+bits": ("drop", "bits"), "all": ("drop", "sparsity", "bits")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def session(args) -> dict:
    from fitness import get_fitness

    model, tok = load_model(args.model)
    spec = DataSpec(
        source=str(DATA / "wiki.valid.raw"),
        n_sequences=args.n_sequences,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    calib = load_token_data(spec, tok)
    test = load_eval_data(str(DATA / "wiki.test.raw"), tok, args.seq_len, args.eval_windows)
    # every candidate quantizes block 0, so no prefix is ever reused: keep only the teacher
    dense = compute_dense_cache(model, calib.input_ids, prefix_reuse=False)
    fitness = get_fitness("kl")
    fitness.prepare(model, calib.input_ids, dense)
    return dict(model=model, calib=calib, test=test, dense=dense, fitness=fitness)


def run_variant(s: dict, name: str, args) -> dict:
    lo, hi, step = (float(x) for x in args.bits_range.split(","))
    config = JointConfig(bits_range=(lo, hi, step), dimensions=VARIANTS[name])
    space = JointSpace.build(
        s["model"], s["calib"].input_ids, config, model_id=args.model, log=log
    )
    stages = tuple(
        Stage(tokens=int(t), survivors=int(k))
        for t, k in (x.split(":") for x in args.stages.split(","))
    )
    loop = EvoPressConfig(
        generations=args.generations,
        offspring=args.offspring,
        initial_population=0,
        stages=stages,
    )
    budgets, labels = space.range_budgets()
    strategy = MultiBudgetEvoPress(
        space,
        budgets=budgets,
        labels=labels,
        config=loop,
        rng=np.random.default_rng(args.seed),
        objectives=lambda g: (space.metrics(g)["bytes"],),
        initial=space.range_starts(),
    )
    evaluator = Evaluator(s["model"], space, s["fitness"], s["dense"], prefix_reuse=False)
    result = search(strategy, evaluator, s["calib"], seed=args.seed, progress=log)
    points = []
    for n in sorted(strategy.elites):
        genome, kl = strategy.elites[n][0].genome, strategy.elites[n][0].value
        with apply_replacements(s["model"], space.replacements(s["model"], genome)):
            ppl = evaluate_perplexity(s["model"], s["test"])
        desc = space.describe(genome)
        kept = [b for b in desc["blocks"] if b["kept"]]
        points.append(
            {
                "budget_bits": labels[n],
                "budget_bytes": space.budgets[n],
                "genome": genome.key(),
                "kl_last_stage": kl,
                "test_ppl": ppl,
                **{k: desc[k] for k in ("bytes", "bits_per_weight", "sparsity")},
                "dropped_blocks": desc["dropped_blocks"],
                "kept_bits_per_weight": round(
                    sum(8 * b["bytes"] for b in kept)
                    / sum(8 * b["bytes"] / b["bits_per_weight"] for b in kept),
                    3,
                ),
                "blocks": desc["blocks"],
            }
        )
        log(f"{name} @{labels[n]} bits: test ppl {ppl:.3f}, dropped {desc['dropped_blocks']}")
    return {
        "variant": name,
        "dimensions": list(VARIANTS[name]),
        "evaluations": result.n_evaluations,
        "search_seconds": round(result.seconds, 1),
        "points": points,
    }


def table(results: dict) -> str:
    lines = [
        "| seed | variant | budget (bits/w) | bytes | test ppl | dropped | sparsity | "
        "bits/w of kept blocks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seed, variants in sorted(results.get("seeds", {}).items()):
        for name, res in variants.items():
            for p in res["points"]:
                lines.append(
                    f"| {seed} | {name} | {p['budget_bits']} | {p['bytes']} | "
                    f"{p['test_ppl']:.2f} | {p['dropped_blocks'] or '-'} | "
                    f"{p['sparsity']:.3f} | {p['kept_bits_per_weight']} |"
                )
    dense = results.get("dense_test_ppl")
    return "\n".join(lines) + (f"\n\nDense model: test ppl {dense:.2f}.\n" if dense else "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("part", nargs="?", default="search", choices=["search", "table"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits-range", default="2.5,4.5,1")
    p.add_argument("--variants", default="bits,drop+bits,all")
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--offspring", type=int, default=6)
    p.add_argument("--stages", default="256:2,1024:1")
    p.add_argument("--n-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=4)
    args = p.parse_args()
    out = HERE / "results.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    if args.part == "table":
        (HERE / "results.md").write_text(table(results))
        return
    s = session(args)
    if "dense_test_ppl" not in results:
        results["dense_test_ppl"] = evaluate_perplexity(s["model"], s["test"])
    seed = results.setdefault("seeds", {}).setdefault(str(args.seed), {})
    results["settings"] = {**vars(args), "machine": platform.platform()}
    for name in args.variants.split(","):
        if name in seed:
            log(f"{name}: done earlier, kept")
            continue
        seed[name] = run_variant(s, name, args)
        out.write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "results.md").write_text(table(results))


if __name__ == "__main__":
    main()
