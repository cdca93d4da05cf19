"""Layer-drop benchmark on SmolLM2-135M: the search from random genomes against the heuristics,
at a wall time no larger than SLEB's (issue 24, part 4).

Run from the repository root (results land next to this file):

    .venv/bin/python experiments/layer_drop/run.py --drops 7,4,11 --seeds 0,1,2

For each number of dropped blocks ``k``: SLEB (greedy, perplexity on ``--sleb-tokens``
calibration tokens per step), ShortGPT and angular distance, then the search once per seed,
started from random genomes only (no warm start), on a budget of ``--budget`` times SLEB's
(``--budget-kind time``: SLEB's seconds, the search's ``max_seconds``; ``tokens``: SLEB's
calibration tokens, as generations), timed in the same process under the same load. The
search's fitness is ``--fitness``: ``kl`` (KL from the dense model, the product's default) or
``ppl`` (calibration perplexity, what SLEB ranks by and what the held-out score measures). With
``--sublayers A:M,...``, the same search drops ``A`` attention and ``M`` MLP sublayers, once
per split, on ``--sublayer-budget`` (default ``--budget``) times SLEB's budget at
``--sublayer-k`` blocks (a greedy SLEB over sublayers would try about four times as many
removals as over blocks); each split's parameters
are recorded (``params_fraction``), so it is compared with the whole-block heuristics at the
same or a smaller parameter cut. A bare ``K`` means ``K:K`` (the parameters of ``K`` blocks).

Calibration: WikiText-2 *valid* only. Held out: the first ``--eval-windows`` non-overlapping
1,024-token windows of WikiText-2 *test*, scored in fp32.

``--sublayer-init aligned`` (the layer-drop space's default ``sublayer_init``) was a
benchmark-only option up to commit a814495, drawing the initial genomes from their own random
stream (``results_sublayers_25_2x_aligned_*.json``); the results before it used random ones.

The earlier benchmark (``results.json``, ``results.md``, ``results_warm.json``) was made by
this file at commit ada911c (``git show ada911c:experiments/layer_drop/run.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evosearch import Problem, SearchConfig, registry
from evosearch.engine import search
from evosearch.genome import Genome
from evosearch.jobs.models import evaluate_perplexity, load_eval_data
from evosearch.operators import switch_neighbours
from evosearch.problem import build_space
from evosearch.strategies import EvoPress, EvoPressConfig
from evosearch.strategy import Stage
from evosearch.surgery import apply_replacements
from fitness.perplexity import Perplexity
from search_spaces.layer_drop import SUBLAYER_INITS

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path("/work/shared/data")
HEURISTICS = ("sleb", "angular", "shortgpt")


def sleb_tokens_spent(n_allowed: int, k: int, tokens: int) -> int:
    """Calibration tokens SLEB scores: ``k`` greedy rounds over the blocks still kept."""
    return tokens * sum(n_allowed - s for s in range(k))


def generations_for(budget: float, loop: EvoPressConfig, neighbours: int) -> int:
    """Generations that fit in ``budget`` tokens beside the initial generation and, with
    ``polish``, one polish generation over ``neighbours`` genomes."""
    fixed = loop.generation_tokens(loop.initial_population)
    if loop.polish:
        fixed += loop.generation_tokens(neighbours + loop.parents, polishing=True)
    return max(0, int((budget - fixed) // loop.generation_tokens(loop.offspring + loop.parents)))


class HeldOut:
    """fp32 perplexity on the held-out windows, memoised by genome (a search that ends on a
    heuristic's genome costs nothing more)."""

    def __init__(self, source: str, windows: int) -> None:
        self.source, self.windows, self.memo = source, windows, {}
        self.data = None

    def __call__(self, problem: Problem, genome) -> float:
        key = (problem.space.sublayers, genome.key())
        if key not in self.memo:
            if self.data is None:
                self.data = load_eval_data(self.source, problem.tokenizer, 1024, self.windows)
            model = problem.model
            with apply_replacements(model, problem.space.replacements(model, genome)):
                self.memo[key] = evaluate_perplexity(model, self.data)
        return self.memo[key]

    def dense(self, problem: Problem) -> float:
        if "dense" not in self.memo:
            self.memo["dense"] = self(problem, problem.space.dense_genome())
        return self.memo["dense"]


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds, load average at the end)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - t0, 1), round(os.getloadavg()[0], 2)


def config_for(args, k: int, sublayers: bool, attention: int | None = None) -> SearchConfig:
    return SearchConfig.from_dict(
        dict(
            num_drop=k,
            sublayers=sublayers,
            **({"attention_drop": attention} if attention is not None else {}),
            **({"sublayer_init": args.sublayer_init} if sublayers else {}),
            data=args.calibration,
            n_sequences=args.n_sequences,
            seq_len=args.seq_len,
            seed=0,
            sleb_tokens=args.sleb_tokens,
            save_model=False,
        )
    )


def at_budget(problem: Problem, config: SearchConfig) -> Problem:
    """``problem`` with the space of ``config`` (another number of dropped blocks), built as
    the product builds it: the model, calibration data and dense cache do not depend on it, so
    they are computed once."""
    problem.config = config
    problem.space = build_space(config, problem.model, problem.data.input_ids, lambda _: None)
    return problem


def search_k(
    args, problem: Problem, out: dict, sleb_seconds=None, seeds=None, save=lambda: None
) -> None:
    """One budget (``out["k"]``, ``out["sublayers"]``) into ``out``: the heuristics (unless
    ``sublayers``), then the search once per seed on a token budget of ``--budget`` times
    SLEB's at ``k``; ``save`` is called after each method."""
    k, sublayers = out["k"], out["sublayers"]
    config = config_for(args, k, sublayers, out.get("attention"))
    problem = at_budget(problem, config)
    space = problem.space
    out["methods"] = {}
    if not sublayers:
        for name in HEURISTICS:
            genome, secs, load = timed(
                registry.baseline("layer-drop", name), problem, config, print
            )
            out["methods"][name] = {"genome": genome.key(), "seconds": secs, "load": load}
            save()
        sleb_seconds = out["methods"]["sleb"]["seconds"]
    out["sleb_seconds"] = sleb_seconds
    k_sleb = out.get("sleb_k", k)  # a sublayer split: SLEB's budget at that many blocks
    scale = args.sublayer_budget if sublayers and args.sublayer_budget else args.budget
    budget = scale * sleb_tokens_spent(len(space.allowed), k_sleb, args.sleb_tokens)
    loop = EvoPressConfig(
        generations=1,
        offspring=args.offspring,
        initial_population=args.initial_population,
        stages=args.stages,
        locality=args.locality,
        polish=args.polish,
        polish_moves=args.polish_moves,
        polish_stages=args.polish_stages or None,
    )
    # a polish round races the elite's neighbourhood: all k * (n - k) switches, or about
    # 3 local ones per dropped unit once the drops form runs
    units_dropped = k * (2 if space.sublayers else 1)
    neighbours = len(switch_neighbours(space.random_genome(np.random.default_rng(0)), space.spec))
    if args.polish_moves == "local":
        neighbours = 3 * units_dropped
    generations, seconds = generations_for(budget, loop, neighbours), None
    if args.budget_kind == "time":  # the generations are only an upper bound
        generations, seconds = 1000, scale * sleb_seconds
    loop = dataclasses.replace(loop, generations=generations, max_seconds=seconds)
    out.update(
        search_tokens_budget=int(budget), search_seconds_budget=seconds, loop=_plain(loop),
        fitness=args.fitness,
    )  # fmt: skip
    for fit, seed in itertools.product(args.fitness, args.seeds if seeds is None else seeds):
        strategy = EvoPress(space, config=loop, rng=np.random.default_rng(seed))
        evaluator = problem.evaluator()
        if fit == "ppl":
            evaluator = dataclasses.replace(evaluator, fitness=Perplexity())
        result, secs, load = timed(
            search, strategy, evaluator, problem.data, seed=seed, progress=_progress(k, seed),
            max_seconds=loop.max_seconds,
        )  # fmt: skip
        name = f"search_{seed}" if len(args.fitness) == 1 else f"search_{fit}_{seed}"
        out["methods"][name] = {
            "fitness": fit,
            "genome": result.best.key(),
            "seconds": secs,
            "load": load,
            "evaluations": result.n_evaluations,
            "tokens": result.tokens,
            "generations_run": strategy.generation,
            "polish_generations": sum(1 for h in strategy.history if h.get("polish")),
            # distinct best genomes, the most recent first (the final choice's candidates)
            "elites": list(dict.fromkeys(h["best"] for h in strategy.history[::-1])),
        }
        print(f"k={k} sublayers={sublayers} seed {seed}: {space.describe(result.best)} "
              f"{secs}s (sleb {sleb_seconds}s) load {load}", flush=True)  # fmt: skip
        save()


def score_kl(args, problem: Problem, run: dict) -> None:
    """Calibration KL and perplexity of each method on every calibration token."""
    problem = at_budget(
        problem, config_for(args, run["k"], run["sublayers"], run.get("attention"))
    )
    full, evaluator = problem.full_batch(), problem.evaluator()
    ppl = dataclasses.replace(evaluator, fitness=Perplexity())
    memo: dict[str, tuple[float, float]] = {}
    for m in run["methods"].values():
        genome = Genome.from_key(m["genome"])
        m.update(problem.space.describe(genome))
        m["params_fraction"] = problem.space.metrics(genome)["params_fraction"]
        if m["genome"] not in memo:
            memo[m["genome"]] = evaluator.raw(genome, full), ppl.raw(genome, full)
        m["calibration_kl"], m["calibration_ppl"] = memo[m["genome"]]


def score_held_out(args, problem: Problem, run: dict, held_out: HeldOut, save) -> None:
    """Held-out perplexity of each method, saved after each (they are slow on a busy CPU)."""
    problem = at_budget(
        problem, config_for(args, run["k"], run["sublayers"], run.get("attention"))
    )
    for m in run["methods"].values():
        m["heldout_ppl"] = held_out(problem, Genome.from_key(m["genome"]))
        save()


def _progress(k: int, seed: int):
    return lambda line: print(f"k={k} seed {seed}: {line}", flush=True)


def _pairs(stages) -> list[list[int]]:
    return [[s.tokens, s.survivors] for s in stages]


def _plain(loop: EvoPressConfig) -> dict:
    d = dict(loop.__dict__)
    d["stages"] = _pairs(loop.stages)
    if loop.polish_stages:
        d["polish_stages"] = _pairs(loop.polish_stages)
    return d


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--drops", default="7,4,11")
    p.add_argument("--seeds", default="0,1,2", help="'' runs the heuristics only")
    p.add_argument(
        "--sublayers", default="", help="A:M,...: also sublayer searches (A attention, M MLP)"
    )
    p.add_argument("--sublayer-k", type=int, default=7, help="SLEB's budget at K blocks")
    p.add_argument("--sublayer-seeds", default="0", help="seeds of the sublayer search")
    p.add_argument(
        "--sublayer-init",
        default="aligned",
        choices=SUBLAYER_INITS,
        help="the sublayer searches' initial genomes (the space's sublayer_init): random "
        "sublayers, or random whole blocks first (the product's default)",
    )
    p.add_argument("--n-sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sleb-tokens", type=int, default=2048)
    p.add_argument("--budget", type=float, default=1.0, help="search budget / SLEB's")
    p.add_argument("--budget-kind", default="time", choices=("time", "tokens"))
    p.add_argument(
        "--sublayer-budget",
        type=float,
        help="the sublayer searches' budget / SLEB's at --sublayer-k blocks (default: --budget)",
    )
    p.add_argument("--fitness", default="kl", help="the search's fitness: kl, ppl or kl,ppl")
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--initial-population", type=int, default=32)
    p.add_argument("--stages", default="512:2,2048:1")
    p.add_argument("--locality", type=float, default=0.5)
    p.add_argument("--polish", type=int, default=3)
    p.add_argument("--polish-moves", default="local", choices=("all", "local"))
    p.add_argument("--polish-stages", default="", help="tokens:survivors,... ('': --stages)")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(HERE / "results_equal_time.json"))
    p.add_argument(
        "--rescore",
        help="a results file of this script: score its genomes again (calibration KL and "
        "--eval-windows held-out windows) into --out, searching nothing",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]  # none: the heuristics only
    args.fitness = args.fitness.split(",")
    if bad := set(args.fitness) - {"kl", "ppl"}:
        p.error(f"--fitness takes kl and ppl, not {sorted(bad)}")
    try:
        args.stages, args.polish_stages = (
            Stage.parse(text) if text else () for text in (args.stages, args.polish_stages)
        )
    except ValueError as error:
        p.error(str(error))
    data = Path(args.data_dir) / "wikitext-2-raw"
    args.calibration = str(data / "wiki.valid.raw")
    held_out = HeldOut(str(data / "wiki.test.raw"), args.eval_windows)
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} torch threads, torch {torch.__version__}, CPU",
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "data_dir", "calibration")},
            "stages": _pairs(args.stages),
            "polish_stages": _pairs(args.polish_stages),
        },
        "status": "partial",
        "runs": {},
    }
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    if args.rescore:
        report = json.loads(Path(args.rescore).read_text())
        for key in ("n_sequences", "seq_len", "sleb_tokens"):
            setattr(args, key, report["settings"][key])
        report["settings"]["eval_windows"] = args.eval_windows
        report["scored_by"] = "python " + " ".join(sys.argv)
        k = int(next(iter(report["runs"]), args.sublayer_k))
        problem = Problem(config_for(args, k, False), log=lambda _: None)
        status = report["status"]  # scoring again completes no search
        score_all(args, report, problem, held_out, save)
        report["status"] = status
        save()
        return
    drops, k = [int(x) for x in args.drops.split(",") if x], args.sublayer_k
    problem = Problem(config_for(args, (drops or [k])[0], False), log=lambda _: None)
    runs = report["runs"]
    for k in drops:  # searches first, so a run stopped during scoring keeps them
        runs[str(k)] = {"k": k, "sublayers": False}
        search_k(args, problem, runs[str(k)], save=save)
    k = args.sublayer_k
    sleb = runs[str(k)]["sleb_seconds"] if str(k) in runs else None
    seeds = [int(x) for x in args.sublayer_seeds.split(",")]
    for split in filter(None, args.sublayers.split(",")):
        a, m = (int(x) for x in (split.split(":") if ":" in split else (split, split)))
        run = {"k": m, "attention": a, "sleb_k": k, "sublayers": True}
        report.setdefault("sublayer_runs", {})[f"{a}:{m}"] = run
        search_k(args, problem, run, sleb, seeds, save)
    score_all(args, report, problem, held_out, save)


def score_all(args, report: dict, problem: Problem, held_out: HeldOut, save) -> None:
    """Calibration KL of every method of every run, then held-out perplexity, then dense."""
    scored = [*report["runs"].values(), *sublayer_runs(report)]
    for run in scored:
        score_kl(args, problem, run)
        save()
    for run in scored:
        score_held_out(args, problem, run, held_out, save)
    report["dense_heldout_ppl"] = held_out.dense(problem)
    report["status"] = "complete"
    save()


def sublayer_runs(report: dict) -> list[dict]:
    """The sublayer searches of a results file (``"sublayers"``: one ``K:K`` search, as
    written before the splits)."""
    runs = list(report.get("sublayer_runs", {}).values())
    return [report["sublayers"], *runs] if "sublayers" in report else runs


if __name__ == "__main__":
    main()
