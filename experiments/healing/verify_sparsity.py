"""Check from the saved files that healing kept the 70 % model's zeros exactly: the same
zero positions in every block linear of ``model/`` and of each ``healed-*/``.

    .venv/bin/python experiments/healing/verify_sparsity.py /tmp/evosearch-heal-bench/wanda70
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def zero_masks(model_dir: Path) -> dict[str, torch.Tensor]:
    """Weight name -> bool zero mask of every 2-D block weight in ``model_dir``."""
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if ".layers." in key and key.endswith("proj.weight"):
                    out[key] = fh.get_tensor(key) == 0
    return out


def main() -> None:
    root = Path(sys.argv[1])
    before = zero_masks(root / "model")
    report = {"layers": len(before), "zeros": int(sum(m.sum() for m in before.values()))}
    report["weights"] = int(sum(m.numel() for m in before.values()))
    for healed in sorted(root.glob("healed-*")):
        after = zero_masks(healed)
        report[healed.name] = {
            "zeros": int(sum(m.sum() for m in after.values())),
            "identical_zero_positions": after.keys() == before.keys()
            and all(torch.equal(before[k], after[k]) for k in before),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
