"""Perplexity of given k-block drops on the whole WikiText-2 *valid* split (bf16, non-overlapping
1,024-token windows): does more calibration text rank them as the held-out test split does?

    .venv/bin/python experiments/layer_drop/rank_on_valid.py 4 240 \
        '[[13,14,17,26],[12,13,14,17],[13,14,15,17],[14,16,17,18],[12,13,14,26],[3,4,5,6]]'

Prints one line per genome (``rank_on_valid.log``). Issue 24, part 4, 4/30 blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DEFAULT_DATA, config_for  # noqa: E402

from evosearch import Problem  # noqa: E402
from evosearch.jobs.models import evaluate_perplexity, load_eval_data  # noqa: E402
from evosearch.surgery import apply_replacements  # noqa: E402


def wiki_windows(k: int, seq_len: int, windows: int, split: str = "valid", dtype=torch.bfloat16):
    """``(problem, model in dtype, windows)``: SmolLM2 with a ``k``-block drop space and the
    first ``windows`` non-overlapping ``seq_len``-token windows of WikiText-2 ``split``."""
    torch.set_num_threads(2)
    wiki = DEFAULT_DATA / "wikitext-2-raw"
    valid = str(wiki / "wiki.valid.raw")
    args = argparse.Namespace(calibration=valid, n_sequences=32, seq_len=512, sleb_tokens=2048)
    problem = Problem(config_for(args, k, False), log=lambda _: None)
    model = problem.model.to(dtype)
    data = load_eval_data(str(wiki / f"wiki.{split}.raw"), problem.tokenizer, seq_len, windows)
    print("windows", data.n_sequences, flush=True)
    return problem, model, data


def main() -> None:
    k, windows, genomes = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    problem, model, data = wiki_windows(k, 1024, windows)
    for drop in genomes:
        genome = problem.space.from_dropped(blocks=drop)
        t0 = time.time()
        with apply_replacements(model, problem.space.replacements(model, genome)):
            ppl = evaluate_perplexity(model, data)
        print(drop, round(ppl, 3), f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
