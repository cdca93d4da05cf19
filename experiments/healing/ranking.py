"""Does the search's ranking survive healing? Wanda 70 % on SmolLM2-135M: the allocation the
sparsity benchmark's search found (EvoPress), the best heuristic there (OWL) and uniform, each
rebuilt from its genome in ``experiments/sparsity/results.json`` (same level database: 16 x 256
tokens of WikiText-2 *valid*, seed 0, level step 2 %, at most 4 levels from uniform), healed
with the same budget and data as ``run.py`` and evaluated before and after.

    PYTHONPATH=$PWD .venv/bin/python experiments/healing/ranking.py --tokens 32768 \\
        --out experiments/healing/ranking.json

Each finished (model, budget) is kept in ``--out`` and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import C4, HERE, WIKI_TEST, WIKI_VALID, _when, evaluate, stamped  # noqa: E402

from evosearch.data import DataSpec, load_token_data  # noqa: E402
from evosearch.genome import Genome  # noqa: E402
from evosearch.healing import EvalWindows, HealConfig, heal_saved_model  # noqa: E402
from evosearch.models import load_model  # noqa: E402

SPARSITY = HERE.parent / "sparsity" / "results.json"


def make_models(names: list[str], work: Path) -> dict[str, Path]:
    """Save each named genome of the Wanda 70 % benchmark as a sparse checkpoint."""
    from search_spaces.sparsity import SparsityConfig, SparsitySpace

    genomes = json.loads(SPARSITY.read_text())["results"]["wanda_70"]["genomes"]
    out = {n: work / f"wanda70_{n}" / "model" for n in names}
    missing = [n for n in names if not out[n].is_dir()]
    if missing:
        dense, tok = load_model("smollm2-135m")
        spec = DataSpec(source=WIKI_VALID, n_sequences=16, seq_len=256, seed=0)
        ids = load_token_data(spec, tok).input_ids
        config = SparsityConfig(sparsity=0.7, pruner="wanda", level_step=0.02, max_level_shift=4)
        space = SparsitySpace.build(dense, ids, config, log=stamped)
        for n in missing:
            space.save(dense, tok, Genome.from_key(genomes[n]), str(out[n]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/evosearch-heal-bench")
    p.add_argument("--models", default="evopress,owl,uniform")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wiki-windows", type=int, default=40)
    p.add_argument("--c4-windows", type=int, default=10)
    p.add_argument("--limit", type=int, default=0, help="zero-shot items per task (0: skip)")
    p.add_argument("--out", default=str(HERE / "ranking.json"))
    args = p.parse_args()
    args.eval_bf16 = True
    torch.set_num_threads(args.threads)
    out_file = Path(args.out)
    results = json.loads(out_file.read_text()) if out_file.is_file() else {}
    results.setdefault("runs", []).append({"argv": sys.argv, "started": _when()})
    names = args.models.split(",")
    models = make_models(names, Path(args.work))
    cache: dict = {}
    avoid = [EvalWindows(WIKI_TEST, 40, 1024), EvalWindows(C4, 40, 1024)]
    for name in names:
        row = results.setdefault(name, {})
        if "unhealed" not in row:
            row["unhealed"] = evaluate(models[name], args, cache)
            profile = json.loads((models[name] / "sparsity_profile.json").read_text())
            row["sparsity"] = profile.get("measured_sparsity", profile.get("sparsity"))
            out_file.write_text(json.dumps(results, indent=1) + "\n")
        key = f"healed_{args.tokens}"
        if key in row:
            continue
        healed = models[name].parent / f"healed-{args.tokens}"
        config = HealConfig(tokens=args.tokens, mode="full", lr=args.lr, seq_len=1024)
        started = _when()
        if not healed.is_dir():
            heal_saved_model(models[name], healed, config, data=DataSpec(source=C4, seed=1),
                             teacher="smollm2-135m", avoid=avoid, log=stamped)  # fmt: skip
        record = json.loads((healed / "healing.json").read_text())
        row[key] = {
            **evaluate(healed, args, cache),
            **{k: record[k] for k in ("tokens", "steps", "seconds", "held_out_before",
                                      "held_out_after")},
            "zeros_before": record["structure"]["zeros"],
            "zeros_after": record["structure_after"]["zeros"],
            "run": {"started": started, "finished": _when(), "threads": args.threads},
        }  # fmt: skip
        out_file.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
