"""The Optuna study as the search record: trials mirror evaluations, resume from the study."""

from __future__ import annotations

import json

import optuna
import pytest
from test_cli import _search_args, tiny_model_dir  # noqa: F401  (fixture re-used)

from evosearch.cli import main
from evosearch.genome import Genome


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


def _mo_args(model, text, out, *extra):
    return [
        "search",
        "--model",
        str(model),
        "--drop-range",
        "1,4",
        "--strategy",
        "nsga2",
        "--objectives",
        "params",
        "--data",
        str(text),
        "--n-sequences",
        "4",
        "--seq-len",
        "16",
        "--generations",
        "3",
        "--offspring",
        "6",
        "--sampler-tokens",
        "64",
        "--out",
        str(out),
        *extra,
    ]


def test_multi_objective_run_exports_a_pareto_front(tiny_model_dir, tmp_path):  # noqa: F811
    from evosearch.pareto import hypervolume, pareto_front

    model, text = tiny_model_dir
    out = tmp_path / "mo"
    assert main(_mo_args(model, text, out)) == 0
    pareto = json.loads((out / "pareto_front.json").read_text())
    assert pareto["objectives"] == ["kl", "params"]
    front = pareto["front"]
    points = [(p["kl"], p["params"]) for p in front]
    assert len(points) >= 2 and pareto_front(points) == list(range(len(points)))
    assert {len(p["dropped_blocks"]) for p in front} <= {1, 2, 3, 4}
    assert pareto["hypervolume"] == hypervolume(points, pareto["reference"]) > 0
    # the front dominates every evaluated trial: none is strictly better in both objectives
    for t in _study(out).trials:
        kl, params = t.value, t.user_attrs["params"]
        assert not any(kl < a and params < b for a, b in points)
    csv_lines = (out / "pareto_front.csv").read_text().splitlines()
    assert len(csv_lines) == len(front) + 1
    # materialise one Pareto point as a model
    target = tmp_path / "point"
    assert main(["export", str(out), "--genome", front[0]["genome"], "--out", str(target)]) == 0
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(target)
    assert saved.config.num_hidden_layers == 6 - len(front[0]["dropped_blocks"])


def test_single_objective_optuna_strategy_runs_and_resumes(tiny_model_dir, tmp_path):  # noqa: F811
    model, text = tiny_model_dir
    out = tmp_path / "tpe"
    args = _search_args(model, text, out, "--strategy", "tpe", "--sampler-tokens", "64")
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert len(first["history"]) == 4
    n = len(_study(out).trials)
    (out / "results.json").unlink()
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["best"] == first["best"] and len(_study(out).trials) == n


def _evopress_mo_args(model, text, out, *extra):
    return [
        "search", "--model", str(model), "--drop-range", "1,4", "--strategy", "evopress",
        "--data", str(text), "--n-sequences", "4", "--seq-len", "16", "--generations", "3",
        "--offspring", "6", "--initial-population", "4", "--stages", "16:3,64:1",
        "--out", str(out), *extra,
    ]  # fmt: skip


def test_evopress_over_a_budget_range_gives_one_point_per_budget(tiny_model_dir, tmp_path):  # noqa: F811
    from evosearch.pareto import hypervolume

    model, text = tiny_model_dir
    out = tmp_path / "mo-evopress"
    assert main(_evopress_mo_args(model, text, out)) == 0
    pareto = json.loads((out / "pareto_front.json").read_text())
    assert pareto["objectives"] == ["kl", "params"]  # params is the default second objective
    front = pareto["front"]
    points = [(p["kl"], p["params"]) for p in front]
    assert pareto["hypervolume"] == hypervolume(points, pareto["reference"]) > 0
    # one elite per budget, so at most one point per number of dropped blocks
    sizes = [len(p["dropped_blocks"]) for p in front]
    assert len(sizes) == len(set(sizes)) >= 2 and set(sizes) <= {1, 2, 3, 4}
    # no candidate scored on all the calibration tokens beats a front point in both objectives
    records = [json.loads(x) for x in (out / "evaluations.jsonl").read_text().splitlines()]
    params = {t.user_attrs["genome"]: t.user_attrs["params"] for t in _study(out).trials}
    for rec in records:
        if rec["tokens"] == 64:
            assert not any(rec["value"] < a and params[rec["genome"]] < b for a, b in points)
    # a resumed finished run evaluates nothing again and gives the same front
    n = len(records)
    assert main(_evopress_mo_args(model, text, out, "--resume")) == 0
    assert len((out / "evaluations.jsonl").read_text().splitlines()) == n
    assert json.loads((out / "pareto_front.json").read_text())["front"] == front


def test_a_stepped_drop_range_searches_only_its_grid(tiny_model_dir, tmp_path):  # noqa: F811
    model, text = tiny_model_dir
    for strategy in ("evopress", "nsga2"):
        out = tmp_path / strategy
        argv = _evopress_mo_args(model, text, out, "--sampler-tokens", "64")
        argv[argv.index("1,4")] = "1,5,2"
        argv[argv.index("evopress")] = strategy
        assert main(argv) == 0
        records = [json.loads(x) for x in (out / "evaluations.jsonl").read_text().splitlines()]
        sizes = {sum(int(c, 36) for c in r["genome"]) for r in records}
        assert sizes <= {1, 3, 5} and len(sizes) >= 2


def test_budget_focus_serves_one_budget_per_generation(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    model, text = tiny_model_dir
    out = tmp_path / "focus"
    assert main(_evopress_mo_args(model, text, out, "--budget-focus", "1")) == 0
    assert json.loads((out / "config.json").read_text())["strategy"]["budget_focus"] == 1
    records = [json.loads(x) for x in (out / "evaluations.jsonl").read_text().splitlines()]
    first_stage = {}
    for r in records:  # generations 1..3 on 16 tokens: offspring of budgets 1, 2, 3 in turn
        if r["generation"] > 0 and r["tokens"] == 16:
            first_stage.setdefault(r["generation"], set()).add(
                sum(Genome.from_key(r["genome"]).levels)
            )
    assert first_stage == {1: {1}, 2: {2}, 3: {3}}
    bad = _evopress_mo_args(model, text, tmp_path / "bad", "--budget-focus", "1")
    bad[bad.index("--drop-range") : bad.index("--drop-range") + 2] = ["--drop", "2"]
    assert main(bad) == 2
    assert "budget_focus" in capsys.readouterr().err


def test_adaptive_switches_from_the_cli(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    model, text = tiny_model_dir
    for extra in ((), ("--drop-range", "1,4")):  # single budget, then multi-budget
        out = tmp_path / f"adaptive{len(extra)}"
        argv = _evopress_mo_args(model, text, out, "--adaptive-switches")
        if extra:
            argv += ["--budget-focus", "1"]  # combines with the other multi-budget options
        else:
            argv[argv.index("--drop-range") : argv.index("--drop-range") + 2] = ["--drop", "2"]
        assert main(argv) == 0
        saved = json.loads((out / "config.json").read_text())
        assert saved["strategy"]["loop"]["adaptive_switches"] is True
        state = json.loads((out / "checkpoint.json").read_text())["strategy"]
        assert state["switch_scale"] >= 1
        assert all("switch_scale" in h for h in state["history"])
    bad = _evopress_mo_args(model, text, tmp_path / "bad", "--adaptive-switches")
    bad[bad.index("evopress")] = "tpe"
    assert main(bad) == 2
    assert "adaptive_switches" in capsys.readouterr().err
    # a run written before the setting existed resumes (it ran without adaptive switches)
    old = tmp_path / "old"
    argv = _evopress_mo_args(model, text, old)
    assert main(argv) == 0
    cfg = json.loads((old / "config.json").read_text())
    del cfg["strategy"]["loop"]["adaptive_switches"]  # a key its version did not write
    (old / "config.json").write_text(json.dumps(cfg))
    assert main([*argv, "--resume"]) == 0
    assert main([*argv, "--resume", "--adaptive-switches"]) == 2
    assert "adaptive_switches" in capsys.readouterr().err


def test_measured_latency_falls_when_blocks_are_dropped():
    import torch
    from conftest import build_model, random_ids

    from evosearch.evaluation import measure_latency
    from evosearch.surgery import apply_replacements
    from search_spaces import LayerDropSpace

    model = build_model("llama", n_layers=8, hidden_size=256, intermediate_size=1024)
    ids = random_ids(1, 128)
    torch.set_num_threads(1)
    dense = measure_latency(model, ids)
    space = LayerDropSpace(8, num_drop=6)
    genome = space.from_dropped(blocks=range(1, 7))
    with apply_replacements(model, space.replacements(model, genome)):
        two_blocks = measure_latency(model, ids)
    assert 0 < two_blocks < 0.8 * dense  # a quarter of the blocks
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, ids, repeats=0)


def test_latency_can_be_an_objective(tiny_model_dir, tmp_path):  # noqa: F811
    model, text = tiny_model_dir
    out = tmp_path / "latency"
    argv = _evopress_mo_args(model, text, out, "--objectives", "params,latency")
    assert main(argv) == 0
    pareto = json.loads((out / "pareto_front.json").read_text())
    assert pareto["objectives"] == ["kl", "params", "latency"]
    assert pareto["reference"][2] > 0  # the dense model's measured latency
    assert all(p["latency"] > 0 for p in pareto["front"])
