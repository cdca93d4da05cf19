"""Per-sequence perplexity of 4-block drops on every 512-token window of WikiText-2 *valid*
(bf16), and how many calibration tokens a paired comparison needs to rank them.

    .venv/bin/python experiments/layer_drop/paired_noise.py score \
        '[[12,13,14,26],[13,14,17,26],[13,14,15,17]]' /tmp/noise/seq.json
    .venv/bin/python experiments/layer_drop/paired_noise.py analyse /tmp/noise/seq.json

``score`` writes each genome's ``(total NLL, tokens)`` per window; ``analyse`` prints each
genome's perplexity on all windows, the mean and standard deviation of the per-window
difference of mean NLL between two genomes, the windows a 2-standard-error decision needs, and
how often a random subset of windows ranks the pair as all windows do. Output:
``paired_noise.log``. Issue 24, part 4, 4/30 blocks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_on_valid import wiki_windows  # noqa: E402

from evosearch.evaluation import Batch, Candidate  # noqa: E402
from evosearch.surgery import apply_replacements  # noqa: E402
from fitness.perplexity import Perplexity  # noqa: E402


def sequence_nll(problem, model, data, drop: list[int], micro_batch: int = 1) -> list:
    """``[total NLL, tokens]`` of each window of ``data`` with blocks ``drop`` dropped."""
    genome = problem.space.from_dropped(blocks=drop)
    candidate = Candidate(model, genome, sequences=[])
    with apply_replacements(model, problem.space.replacements(model, genome)):
        batch = Batch(tuple(range(data.n_sequences)), data.input_ids)
        Perplexity(micro_batch=micro_batch).partial(candidate, batch)
    return candidate.sequences


def score(genomes: list[list[int]], out: Path) -> None:
    problem, model, data = wiki_windows(4, 512, 521)  # every 512-token window of the split
    result = {}
    for drop in genomes:
        t0 = time.time()
        result[str(drop)] = sequence_nll(problem, model, data, drop, micro_batch=4)
        print(drop, f"{time.time() - t0:.0f}s", flush=True)
        out.write_text(json.dumps(result))


def analyse(path: Path) -> None:
    per_window = json.loads(path.read_text())
    names = list(per_window)
    nll = {k: np.array([t for t, _ in v]) for k, v in per_window.items()}
    count = np.array([c for _, c in per_window[names[0]]])
    for k in names:
        print(k, "ppl", np.exp(nll[k].sum() / count.sum()))
    rng = np.random.default_rng(0)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = (nll[a] - nll[b]) / count  # per window: difference of mean NLL
            m, s = diff.mean(), diff.std()
            print(f"{a} - {b}: mean {m:.5f} per-seq std {s:.4f}; "
                  f"seqs for 2 SE: {(2 * s / abs(m)) ** 2:.0f}")  # fmt: skip
            for n in (4, 16, 32, 64, 128, 256):
                picks = [rng.choice(len(diff), n, replace=False) for _ in range(4000)]
                wins = np.mean([diff[p].mean() < 0 for p in picks])
                print(f"   {n} seqs ({n * 512} tok): P({a} wins) = {wins:.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "score":
        score(json.loads(sys.argv[2]), Path(sys.argv[3]))
    else:
        analyse(Path(sys.argv[2]))
