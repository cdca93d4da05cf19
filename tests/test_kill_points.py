"""A search killed at any of five points, then resumed, ends exactly where an undisturbed run
ends: same best, history, evaluations and totals, a study that agrees with the log, and no
stray files in the run directory or the level-database folder.

The kill is real: a subprocess runs with ``EVOSEARCH_KILL_AT=<point>[:N]`` and sends itself
SIGKILL there (:func:`evosearch.errors.kill_point`). The resume runs in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, hf_tokenizer

from evosearch.cli import main
from evosearch.errors import TMP_MARK

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]

# point[:N] -> where it strikes (a sparsity search, so a level database is built too)
POINTS = {
    "leveldb_build:3": "while the level database is being written",
    "evaluation:8": "after an evaluation is logged, before the study has it",
    "checkpoint:2": "after a checkpoint file, before the study's copy",
    "model_save": "while the best model is being saved",
    "results": "after the model, before results.json",
}


def _args(root: Path, out: Path, db: Path) -> list[str]:
    return [
        "search", "--space", "sparsity", "--target", "0.5", "--pruner", "magnitude",
        "--db-dir", str(db), "--model", str(root / "tiny"), "--data", str(root / "calib.txt"),
        "--n-sequences", "4", "--seq-len", "16", "--generations", "2", "--offspring", "4",
        "--initial-population", "2", "--stages", "16:2,64:1", "--out", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny model, its data, and an undisturbed run."""
    root = tmp_path_factory.mktemp("kill")
    build_model("llama", n_layers=6, max_position_embeddings=256).save_pretrained(root / "tiny")
    hf_tokenizer().save_pretrained(root / "tiny")
    (root / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert main(_args(root, root / "ref", root / "db_ref")) == 0
    return root


def _state(run: Path) -> dict:
    import optuna

    results = json.loads((run / "results.json").read_text())
    study = optuna.load_study(study_name=run.resolve().name, storage=f"sqlite:///{run}/study.db")
    log = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    return {
        "best": results["best"],
        "history": results["history"],
        "evaluations": [(e["genome"], e["batch"], e["value"]) for e in log],
        "totals": {k: results[k] for k in ("n_evaluations", "tokens", "failed_evaluations")},
        "trials": len(study.trials),
        "study_checkpoint": json.loads(study.user_attrs["checkpoint"]),
        "checkpoint": json.loads((run / "checkpoint.json").read_text()),
        "files": sorted(p.name for p in run.iterdir()),
        "model_files": sorted(p.name for p in (run / "model").iterdir()),
    }


@pytest.mark.parametrize("point", list(POINTS), ids=list(POINTS))
def test_killed_and_resumed_run_matches_an_undisturbed_one(reference, point):
    root = reference
    name = point.split(":")[0]
    out, db = root / f"run_{name}", root / f"db_{name}"
    env = {**os.environ, "EVOSEARCH_KILL_AT": point, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "evosearch.cli", *_args(root, out, db)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "results.json").exists()
    assert main([*_args(root, out, db), "--resume"]) == 0

    got, want = _state(out), _state(root / "ref")
    # one thread in both processes: the same arithmetic, so the same floats
    assert got["best"] == want["best"]
    assert got["history"] == want["history"]
    assert got["evaluations"] == want["evaluations"]
    assert got["totals"] == want["totals"]
    assert got["trials"] == got["totals"]["n_evaluations"] == len(got["evaluations"])
    assert got["study_checkpoint"] == got["checkpoint"]
    assert got["files"] == want["files"] and got["model_files"] == want["model_files"]
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]
    assert [p.name.startswith(".") for p in db.iterdir()] == [False]  # one database, no leftovers
