"""The Optuna study as the search record: trials mirror evaluations, resume from the study."""

from __future__ import annotations

import json

import optuna
from test_cli import _search_args, tiny_model_dir  # noqa: F401  (fixture re-used)

from evosearch.cli import main


def _study(out):
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def test_every_evaluation_is_a_trial(tiny_model_dir, tmp_path):  # noqa: F811
    model, text = tiny_model_dir
    out = tmp_path / "run"
    assert main(_search_args(model, text, out)) == 0
    records = [json.loads(x) for x in (out / "evaluations.jsonl").read_text().splitlines()]
    trials = _study(out).trials
    assert len(trials) == len(records)
    for trial, rec in zip(trials, records):
        assert trial.user_attrs["genome"] == rec["genome"]
        assert trial.value == rec["value"]
        assert trial.intermediate_values == {rec["tokens"]: rec["value"]}
        assert sum(trial.params.values()) == 2  # two blocks dropped
        assert trial.user_attrs["blocks_kept"] == 4
        assert 0 < trial.user_attrs["params_fraction"] < 1
    results = json.loads((out / "results.json").read_text())
    assert results["best"]["blocks_kept"] == 4


def test_resume_from_study_without_files(tiny_model_dir, tmp_path):  # noqa: F811
    model, text = tiny_model_dir
    out = tmp_path / "run"
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    assert main(_search_args(model, text, out, "--storage", storage)) == 0
    first = json.loads((out / "results.json").read_text())
    study = optuna.load_study(study_name="run", storage=storage)
    n_trials = len(study.trials)
    for name in ("evaluations.jsonl", "checkpoint.json", "config.json", "results.json"):
        (out / name).unlink()
    assert main(_search_args(model, text, out, "--storage", storage, "--resume")) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["best"] == first["best"]
    assert second["history"] == first["history"]
    assert len(optuna.load_study(study_name="run", storage=storage).trials) == n_trials
    assert not (out / "evaluations.jsonl").exists()  # nothing was evaluated again
