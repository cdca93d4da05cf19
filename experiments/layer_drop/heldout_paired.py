"""Can the held-out score tell two k-block drops apart? Per-window NLL on the benchmark's held-out
windows (the first 40 non-overlapping 1,024-token windows of WikiText-2 *test*, fp32, as
``run.py`` scores them), and each genome's paired difference from a reference genome.

    .venv/bin/python experiments/layer_drop/heldout_paired.py 4 \
        '[[12,13,14,17],[12,13,14,26],[13,14,17,26],[13,14,15,17],[4,5,17,26]]'

The first genome is the reference. Per genome: held-out perplexity, the mean over windows of
its difference in mean NLL from the reference, that mean's standard error, and the perplexity
ratio's 95 % interval. Output: ``heldout_paired.log``. Issue 24, part 4, 4/30 blocks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_noise import sequence_nll  # noqa: E402
from rank_on_valid import wiki_windows  # noqa: E402


def per_window(k: int, genomes: list[list[int]], windows: int = 40) -> dict[str, np.ndarray]:
    """``{str(drop): per-window mean NLL}`` on the held-out windows, fp32."""
    problem, model, data = wiki_windows(k, 1024, windows, split="test", dtype=torch.float32)
    out = {}
    for drop in genomes:
        t0 = time.time()
        out[str(drop)] = np.array([nll / n for nll, n in sequence_nll(problem, model, data, drop)])
        ppl = np.exp(out[str(drop)].mean())  # the windows hold equally many tokens
        print(drop, f"held-out ppl {ppl:.2f}", f"{time.time() - t0:.0f}s", flush=True)
    return out


def compare(nll: dict[str, np.ndarray]) -> None:
    """Each genome against the first: mean paired NLL difference, its standard error, and the
    perplexity ratio's 95 % interval (a ratio above 1: worse than the reference)."""
    names = list(nll)
    reference = nll[names[0]]
    for name in names[1:]:
        diff = nll[name] - reference
        mean, se = diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))
        low, high = np.exp(mean - 1.96 * se), np.exp(mean + 1.96 * se)
        print(
            f"{name} vs {names[0]}: NLL {mean:+.4f} ± {se:.4f} (SE, {len(diff)} windows); "
            f"ppl ratio {np.exp(mean):.4f}, 95 % interval [{low:.4f}, {high:.4f}]",
            flush=True,
        )


if __name__ == "__main__":
    compare(per_window(int(sys.argv[1]), json.loads(sys.argv[2])))
