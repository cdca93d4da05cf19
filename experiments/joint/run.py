"""Joint drop x sparsity x bits on SmolLM2-135M (issue 26): one multi-budget EvoPress run per
set of dimensions and seed, at the same byte budgets and search settings.

    PYTHONPATH=$PWD .venv/bin/python experiments/joint/run.py --seeds 0,1,2
    PYTHONPATH=$PWD .venv/bin/python experiments/joint/run.py table

The calibration windows are the same for every seed (``--calib-seed``); a seed is the
search's random stream.

Drives the library directly (joint space, ``Evaluator``, ``MultiBudgetEvoPress``, ``search``),
as ``evosearch search`` does. Calibration: WikiText-2 *valid* (random windows); reported: each
budget's elite's WikiText-2 *test* perplexity on the first ``--eval-windows`` windows, and
where its bytes went. A finished variant is kept in ``runs/`` (rerun resumes at the next).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from evosearch.data import DataSpec, load_token_data
from evosearch.engine import Evaluator, search
from evosearch.forward import compute_dense_cache
from evosearch.jobs.models import evaluate_perplexity, load_eval_data
from evosearch.models import load_model
from evosearch.strategies import EvoPressConfig, MultiBudgetEvoPress, Stage
from evosearch.surgery import apply_replacements
from search_spaces.joint import JointConfig, JointSpace
from search_spaces.layer_drop_baselines import influence_order

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
        seed=args.calib_seed,
    )
    calib = load_token_data(spec, tok)
    test = load_eval_data(str(DATA / "wiki.test.raw"), tok, args.eval_len, args.eval_windows)
    # every candidate quantizes block 0, so no prefix is ever reused: keep only the teacher
    dense = compute_dense_cache(model, calib.input_ids, prefix_reuse=False, dtype=args.dtype)
    fitness = get_fitness("kl")
    fitness.prepare(model, calib.input_ids, dense)
    # the joint variants also start from drops of the blocks of least ShortGPT influence
    boundaries = compute_dense_cache(model, calib.input_ids).boundaries
    order = influence_order(boundaries)
    log(f"blocks by ShortGPT influence, least first: {order}")
    return dict(model=model, calib=calib, test=test, dense=dense, fitness=fitness, order=order)


def run_variant(s: dict, name: str, seed: int, args) -> dict:
    lo, hi, step = (float(x) for x in args.bits_range.split(","))
    config = JointConfig(bits_range=(lo, hi, step), dimensions=VARIANTS[name])
    space = JointSpace.build(
        s["model"], s["calib"].input_ids, config, model_id=args.model, log=log
    )
    stages = tuple(
        Stage(tokens=int(t), survivors=int(k))
        for t, k in (x.split(":") for x in args.stages.split(","))
    )
    starts = space.range_starts(s["order"] if args.drop_starts else ())
    if len(starts) > args.initial:
        raise SystemExit(f"--initial {args.initial} is below the {len(starts)} start genomes")
    loop = EvoPressConfig(
        generations=args.generations,
        offspring=args.offspring,
        initial_population=args.initial - len(starts),  # random genomes: equal evaluations
        stages=stages,
    )
    budgets, labels = space.range_budgets()
    strategy = MultiBudgetEvoPress(
        space,
        budgets=budgets,
        labels=labels,
        config=loop,
        rng=np.random.default_rng(seed),
        objectives=lambda g: (space.metrics(g)["bytes"],),
        initial=starts,
    )
    evaluator = Evaluator(s["model"], space, s["fitness"], s["dense"], prefix_reuse=False)
    result = search(strategy, evaluator, s["calib"], seed=seed, progress=log)
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
        log(
            f"seed {seed} {name} @{labels[n]} bits: test ppl {ppl:.3f}, "
            f"dropped {desc['dropped_blocks']}"
        )
    return {
        "variant": name,
        "dimensions": list(VARIANTS[name]),
        "starts": len(starts),
        "evaluations": result.n_evaluations,
        "search_seconds": round(result.seconds, 1),
        "points": points,
    }


def uniform_point(s: dict, bits: int, args) -> dict:
    """Uniform ``bits``-bit RTN (nothing dropped or pruned): the one genome at the top of
    every variant's front, so it is measured once."""
    config = JointConfig(bits=bits, dimensions=("bits",))
    space = JointSpace.build(
        s["model"], s["calib"].input_ids, config, model_id=args.model, log=log
    )
    genome = space.uniform_genome()
    with apply_replacements(s["model"], space.replacements(s["model"], genome)):
        ppl = evaluate_perplexity(s["model"], s["test"])
    m = space.metrics(genome)
    log(f"uniform {bits}-bit: {m['bytes']} bytes, test ppl {ppl:.3f}")
    return {
        "bits": bits,
        "bytes": m["bytes"],
        "bits_per_weight": m["bits_per_weight"],
        "test_ppl": ppl,
    }


def table(results: dict) -> str:
    """Test perplexity per budget, variant and seed, the dominance check per seed, and where
    each point's bytes went."""
    seeds = sorted(results.get("seeds", {}))
    names = [n for n in VARIANTS if all(n in results["seeds"][sd] for sd in seeds)]
    if not seeds or not names:
        return "No finished seed yet.\n"
    budgets = [p["budget_bits"] for p in results["seeds"][seeds[0]][names[0]]["points"]]
    ppl = {
        (sd, n, p["budget_bits"]): p["test_ppl"]
        for sd in seeds for n in names for p in results["seeds"][sd][n]["points"]
    }  # fmt: skip
    head = "| budget (bits/w) | " + " | ".join(f"{n} (seeds {', '.join(seeds)})" for n in names)
    lines = [head + " |", "| --- |" + " --- |" * len(names)]
    for b in budgets:
        cells = [" / ".join(f"{ppl[sd, n, b]:.2f}" for sd in seeds) for n in names]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "Dominance on test perplexity, per seed (every budget):", ""]
    for big, small in (("all", "bits"), ("all", "drop+bits"), ("drop+bits", "bits")):
        if big in names and small in names:
            lines.append(f"- {big} vs {small}: " + "; ".join(
                f"seed {sd} " + dominance([ppl[sd, big, b] for b in budgets],
                                          [ppl[sd, small, b] for b in budgets])
                for sd in seeds))  # fmt: skip
    lines += ["", "Where the bytes went:", "",
              "| seed | variant | budget | bytes | test ppl | dropped | sparsity | "
              "bits/w of kept blocks | evaluations | search s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for sd in seeds:
        for n in names:
            res = results["seeds"][sd][n]
            for p in res["points"]:
                lines.append(
                    f"| {sd} | {n} | {p['budget_bits']} | {p['bytes']} | {p['test_ppl']:.2f} | "
                    f"{p['dropped_blocks'] or '-'} | {p['sparsity']:.3f} | "
                    f"{p['kept_bits_per_weight']} | {res['evaluations']} | "
                    f"{res['search_seconds']} |"
                )
    dense, top = results.get("dense_test_ppl"), results.get("uniform_8bit")
    if top:
        lines += ["", f"Uniform 8-bit ({top['bits_per_weight']:.2f} bits/w, {top['bytes']} bytes, "
                  f"the top of every front): test ppl {top['test_ppl']:.2f}."]  # fmt: skip
    return "\n".join(lines) + (f"\n\nDense model: test ppl {dense:.2f}.\n" if dense else "\n")


def dominance(a: list[float], b: list[float]) -> str:
    """Whether front ``a`` weakly dominates front ``b`` (lower perplexity at every budget)."""
    if all(x <= y for x, y in zip(a, b)):
        return "dominates" + (" strictly" if any(x < y for x, y in zip(a, b)) else " (equal)")
    worse = sum(x > y for x, y in zip(a, b))
    return f"does not dominate (worse at {worse} of {len(a)} budgets)"


def plot(results: dict, path: Path) -> None:
    """Test perplexity against bytes, a line per variant and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green")))
    top = results.get("uniform_8bit")
    for sd, variants in sorted(results.get("seeds", {}).items()):
        for n, res in variants.items():
            points = [*res["points"], *([top] if top else [])]
            xs = [p["bytes"] / 2**20 for p in points]
            ys = [p["test_ppl"] for p in points]
            ax.plot(xs, ys, "o-", color=colours[n], alpha=0.7, label=n if sd == "0" else None)
    if results.get("dense_test_ppl"):
        ax.axhline(results["dense_test_ppl"], color="grey", ls=":", label="dense")
    ax.set(xscale="linear", yscale="log", xlabel="bytes of the block linears (MiB)",
           ylabel="WikiText-2 test perplexity")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("part", nargs="?", default="search", choices=["search", "table"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--bits-range", default="2.66,5.66,1.5")
    p.add_argument("--variants", default="bits,drop+bits,all")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--offspring", type=int, default=6)
    p.add_argument("--stages", default="256:2,1024:1")
    p.add_argument("--n-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 where fast)")
    p.add_argument(
        "--initial", type=int, default=12, help="generation 0: the starts plus random genomes"
    )
    p.add_argument(
        "--drop-starts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="joint variants also start from drops of the least influential blocks",
    )
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}

    def write() -> None:
        out.write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".md").write_text(table(results))
        plot(results, out.with_suffix(".png"))

    if args.part == "table":
        write()
        return
    torch.set_num_threads(args.threads)
    s = session(args)
    if "dense_test_ppl" not in results:
        results["dense_test_ppl"] = evaluate_perplexity(s["model"], s["test"])
    if "uniform_8bit" not in results:
        results["uniform_8bit"] = uniform_point(s, 8, args)
    results["status"] = "partial"
    results["command"] = "python " + " ".join(__import__("sys").argv)
    results["settings"] = {
        **vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch "
        f"threads, torch {torch.__version__}",
    }
    seeds = [int(x) for x in args.seeds.split(",")]
    for seed in seeds:  # a seed's variants side by side, so a stopped run keeps whole seeds
        done = results.setdefault("seeds", {}).setdefault(str(seed), {})
        for name in args.variants.split(","):
            if name in done:
                log(f"seed {seed} {name}: done earlier, kept")
                continue
            done[name] = run_variant(s, name, seed, args)
            write()
    results["status"] = "complete"
    write()


if __name__ == "__main__":
    main()
