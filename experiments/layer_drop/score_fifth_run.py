"""Scoring of the fifth run's last searches, run once as ``.venv/bin/python score_fifth_run.py``
from the repository root (held-out perplexity only for the 4-block final-choice genomes):
calibration KL / perplexity and held-out perplexity of the aligned-start sublayer seeds 1 and 2
(``/tmp/ld5/results_aligned_12.json``, the unscored output of ``run.py``; scored copy:
``results_sublayers_25_2x_aligned_12.json``), then held-out perplexity of the 4-block genomes of
``/tmp/ld5/results_final_4.json`` (``results_final_4.json``) not scored before. Output:
``score_fifth_run.log``. It shared the cores with nothing timed."""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DEFAULT_DATA, HeldOut, at_budget, config_for, score_kl

from evosearch import Problem
from evosearch.genome import Genome

torch.set_num_threads(2)
data = DEFAULT_DATA / "wikitext-2-raw"
args = argparse.Namespace(
    calibration=str(data / "wiki.valid.raw"), n_sequences=32, seq_len=512, sleb_tokens=2048
)
problem = Problem(config_for(args, 7, True, 9), log=lambda _: None)
held = HeldOut(str(data / "wiki.test.raw"), 40)
aligned = json.load(open("/tmp/ld5/results_aligned_12.json"))
run = aligned["sublayer_runs"]["9:7"]
score_kl(args, problem, run)
p = at_budget(problem, config_for(args, 7, True, 9))
for name, m in run["methods"].items():
    m["heldout_ppl"] = held(p, Genome.from_key(m["genome"]))
    print("aligned", name, m["calibration_ppl"], m["heldout_ppl"], flush=True)
    json.dump(aligned, open("/tmp/ld5/scored_aligned_12.json", "w"), indent=1)
r = json.load(open("/tmp/ld5/results_final_4.json"))
out = {}
p = at_budget(problem, config_for(args, 4, False))
for name, m in r["runs"]["4"]["methods"].items():
    if name in ("search_0", "search_2", "angular"):
        out[name] = (m["genome"], held(p, Genome.from_key(m["genome"])))
        print("final4", name, out[name], flush=True)
        json.dump(out, open("/tmp/ld5/heldout_final4.json", "w"), indent=1)
