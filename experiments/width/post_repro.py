"""Is post-training deterministic on one machine? Reruns seed 1's uniform WikiText-2
post-training of post_domain.py (after it has run on --work /tmp/evosearch-width-dom-s1) and
compares the weights with the first run's:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/width/post_repro.py

Output of the run quoted in README.md: post_repro.log.
"""

import json

import torch

from evosearch.data import DataSpec
from evosearch.models import load_model
from evosearch.pipeline import finetune

torch.set_num_threads(1)
w = "/tmp/evosearch-width-dom-s1"
data = DataSpec(source="/work/shared/data/wikitext-2-raw/wiki.valid.raw", seq_len=256, seed=2)
r = finetune(
    f"{w}/uniform/model",
    36864,
    "/tmp/repro_uniform_wt2",
    data=data,
    teacher="smollm2-135m",
    lr=1e-4,
    device="cpu",
)
a, _ = load_model(f"{w}/uniform_post_wikitext2")
b, _ = load_model("/tmp/repro_uniform_wt2")
diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
prev = json.load(open(f"{w}/uniform_post_wikitext2/finetune.json"))
print(
    "REPRO",
    json.dumps(
        {
            "max_abs_weight_diff": diff,
            "loss_last": r["loss_last"],
            "loss_last_before": prev["loss_last"],
        }
    ),
)
