"""Metric search end to end on a tiny Llama: outputs, memo, rejection, resume, CLI, loading."""

from __future__ import annotations

import json
import logging
import math
import pickle

import pytest
import torch
from conftest import build_model, hf_tokenizer, random_ids

import evosearch.metric_search as ms
from evosearch.cli import main
from evosearch.engine import Evaluator
from evosearch.evaluation import Batch
from evosearch.forward import compute_dense_cache
from evosearch.gp import MetricGenome
from evosearch.metric_search import (
    MetricSearchConfig,
    MetricSpace,
    MetricWorker,
    run_metric_search,
)
from evosearch.pruning import block_linears, collect_stats, sparsity_of
from evosearch.symbolic import KNOWN_METRICS, get_pruner, parse
from fitness import KLDivergence

# a metric whose scores overflow to inf (not removable by canonicalisation: sub at the root)
OVERFLOW = "sub(sqr(pdiv(pdiv(W, 0), 0)), X)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_metric")
    model_dir = root / "tiny"
    build_model("llama", n_layers=2, max_position_embeddings=128).save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)
    text = root / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    return model_dir, text


def _config(tiny, **kw):
    model_dir, text = tiny
    values = dict(
        model=str(model_dir),
        data=str(text),
        n_sequences=4,
        seq_len=16,
        population=6,
        generations=3,
        max_depth=5,
        max_size=9,
        seed_metrics=("magnitude", "wanda", "pruner-zero", "sub(W, W)", OVERFLOW),
    )
    values.update(kw)
    return MetricSearchConfig(**values)


def _history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    run = tmp_path_factory.mktemp("ms") / "run"
    return run, run_metric_search(_config(tiny), run, log=lambda s: None)


def test_search_writes_its_outputs(finished):
    run, results = finished
    for name in ("config.json", "history.jsonl", "leaderboard.json", "leaderboard.md"):
        assert (run / name).is_file()
    history = _history(run)
    assert len(history) == results["counts"]["proposed"] == 6 + 3 * 4
    board = json.loads((run / "leaderboard.json").read_text())
    assert [r["fitness"] for r in board] == sorted(r["fitness"] for r in board)
    assert len({r["metric"] for r in board}) == len(board)
    assert board[0]["fitness"] == min(r["fitness"] for r in history if r["fitness"] is not None)
    assert results["generations"][-1]["best"] == board[0]["fitness"]
    # the best is the leaderboard entry with the lowest fitness on the held-out windows
    assert "seed 1" in results["holdout"] and "seed 0" in results["calibration"]
    assert all(r["holdout_fitness"] is not None for r in board)
    chosen = min(board, key=lambda r: r["holdout_fitness"])
    best = json.loads((run / "best_metric.json").read_text())
    assert best["canonical"] == chosen["metric"] == results["best"]["metric"]
    assert best["fitness"] == chosen["fitness"]
    assert (
        best["holdout_fitness"] == chosen["holdout_fitness"] == results["best"]["holdout_fitness"]
    )
    assert best["math"] and results["best"]["math"] == best["math"]
    # the seed metrics are scored on the held-out windows too (not the rejected ones)
    held = results["known_metrics_holdout"]
    assert set(held) == {"magnitude", "wanda", "pruner-zero"}
    for name, value in held.items():
        rows = [r for r in board if r["known_metric"] == name]
        if rows:
            assert rows[0]["holdout_fitness"] == value
    assert "held-out kl" in (run / "leaderboard.md").read_text()


def test_the_optuna_study_mirrors_the_evaluations(finished):
    import optuna

    run, results = finished
    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
    records = [json.loads(x) for x in (run / "evaluations.jsonl").read_text().splitlines()]
    assert len(study.trials) == len(records) == results["counts"]["evaluated"]
    for trial, rec in zip(study.trials, records):
        assert trial.user_attrs["genome"] == rec["genome"] and trial.value == rec["value"]
    assert study.best_trial.user_attrs["genome"] == results["leaderboard"][0]["metric"]


def test_without_holdout_the_best_is_the_search_best(tiny, tmp_path):
    results = run_metric_search(
        _config(tiny, generations=1, holdout_sequences=0), tmp_path / "run", log=lambda s: None
    )
    assert results["best"]["metric"] == results["leaderboard"][0]["metric"]
    assert results["best"]["holdout_fitness"] is None and results["known_metrics_holdout"] == {}


def test_leaderboard_groups_bit_identical_fitness(finished):
    run, _ = finished
    board = json.loads((run / "leaderboard.json").read_text())
    fitness = [r["fitness"] for r in board]
    assert len(set(fitness)) == len(fitness)
    for row in board:
        for other in row["same_fitness"]:
            assert parse(other).size() >= row["size"]
    # every metric that tied with the best is listed in the best row
    history = _history(run)
    ties = {r["canonical"] for r in history if r["fitness"] == board[0]["fitness"]}
    assert ties == {board[0]["metric"], *board[0]["same_fitness"]}


def test_each_canonical_metric_is_evaluated_once(finished):
    run, results = finished
    history = _history(run)
    evaluated = [r["canonical"] for r in history if not r["memo_hit"]]
    assert len(evaluated) == len(set(evaluated)) == results["counts"]["evaluated"]
    hits = [r for r in history if r["memo_hit"]]
    assert len(hits) == results["counts"]["memo_hits"]
    assert all(r["canonical"] in evaluated for r in hits)
    share = results["counts"]["memo_saved_share"]
    assert share == pytest.approx(len(hits) / len(history))


def test_unusable_metrics_are_rejected_with_a_reason(finished):
    run, results = finished
    by_expr = {r["expression"]: r for r in _history(run) if r["generation"] == 0}
    assert "constant" in by_expr["sub(W, W)"]["rejected"]
    assert by_expr["sub(W, W)"]["fitness"] is None
    assert "non-finite" in by_expr[OVERFLOW]["rejected"]
    assert by_expr["mul(W, X)"]["rejected"] is None
    assert by_expr["mul(W, X)"]["seed_metric"] == "wanda"
    assert results["counts"]["rejected"] >= 2
    assert results["known_metrics"]["wanda"] == by_expr["mul(W, X)"]["fitness"]


def test_discovered_metric_loads_back_as_a_pruner(finished, tiny):
    run, _ = finished
    pruner = get_pruner(str(run / "best_metric.json"))
    model = build_model("llama", n_layers=2)
    stats = collect_stats(model, random_ids(2, 16), gradients=True)
    for ref in block_linears(model):
        w = pruner.prune(ref.weight(model), stats[ref.name], 0.5)
        assert sparsity_of(w) == pytest.approx(0.5)
        w = pruner.prune(ref.weight(model), stats[ref.name], pattern=(2, 4))
        assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max() <= 2


def _count_search_evaluations(monkeypatch, stop_after: int | None = None) -> list:
    """Record (and, after ``stop_after``, kill) the search's evaluations: those on the 4
    search sequences, not the held-out check's."""
    calls = []
    original = Evaluator.outcome

    def counting(self, genome, batch):
        if batch.input_ids.shape[0] == 4:
            if stop_after is not None and len(calls) == stop_after:
                raise KeyboardInterrupt  # a kill in the middle of a generation
            calls.append(genome.key())
        return original(self, genome, batch)

    monkeypatch.setattr(Evaluator, "outcome", counting)
    return calls


def test_a_killed_search_resumes_without_re_evaluating(finished, tiny, tmp_path, monkeypatch):
    run, results = finished
    part = tmp_path / "run"
    calls = _count_search_evaluations(monkeypatch, stop_after=8)
    with pytest.raises(KeyboardInterrupt):
        run_metric_search(_config(tiny), part, log=lambda s: None)
    assert len(calls) == 8 and not (part / "results.json").exists()
    with open(part / "evaluations.jsonl", "a") as fh:
        fh.write('{"genome": "mul(W')  # half a line, as a kill mid-write leaves it
    monkeypatch.undo()
    calls = _count_search_evaluations(monkeypatch)
    resumed = run_metric_search(_config(tiny), part, resume=True, log=lambda s: None)
    assert len(calls) == results["counts"]["evaluated"] - 8
    assert resumed["best"] == results["best"] and resumed["leaderboard"] == results["leaderboard"]
    timeless = [
        [{k: v for k, v in r.items() if k != "seconds"} for r in _history(d)] for d in (part, run)
    ]
    assert timeless[0] == timeless[1]
    assert resumed["counts"]["replayed"] == 8


def test_a_run_of_the_earlier_loop_resumes_from_its_history(finished, tiny, tmp_path, monkeypatch):
    """A run directory holding only config.json and history.jsonl (the loop before the
    engine) resumes without scoring again what its history holds."""
    run, results = finished
    history = (run / "history.jsonl").read_text().splitlines()
    part = tmp_path / "run"
    part.mkdir()
    (part / "config.json").write_text((run / "config.json").read_text())
    keep = 9  # a kill during generation 1, with half a line written
    (part / "history.jsonl").write_text("\n".join(history[:keep]) + "\n" + history[keep][:20])
    calls = _count_search_evaluations(monkeypatch)
    resumed = run_metric_search(_config(tiny), part, resume=True, log=lambda s: None)
    new = _history(part)
    assert [r["canonical"] for r in new] == [json.loads(h)["canonical"] for h in history]
    expected = sum(not json.loads(h)["memo_hit"] for h in history[keep:])
    assert len(calls) == expected
    assert resumed["best"] == results["best"]


class _WorkerRunner:
    """Evaluates on the evaluator its factory built, as a Ray worker does (without Ray)."""

    def __init__(self, factory) -> None:
        self.worker, self.calls = factory(), 0

    def evaluate(self, evaluator, genomes, batch):
        for genome in genomes:
            self.calls += 1
            yield self.worker.outcome(genome, batch)

    def close(self) -> None:
        pass


def test_a_worker_built_from_the_config_gives_the_same_search(finished, tiny, tmp_path):
    _, results = finished
    runner = _WorkerRunner(pickle.loads(pickle.dumps(MetricWorker(_config(tiny)))))
    again = run_metric_search(_config(tiny), tmp_path / "run", log=lambda s: None, runner=runner)
    assert runner.calls == results["counts"]["evaluated"]
    assert again["best"] == results["best"] and again["leaderboard"] == results["leaderboard"]


def test_metric_search_on_a_ray_worker(finished, tiny, tmp_path):
    ray = pytest.importorskip("ray")
    from evosearch.runners import RayRunner, RayRunnerConfig

    _, results = finished
    config = _config(tiny, generations=1, holdout_sequences=0)
    reference = run_metric_search(config, tmp_path / "here", log=lambda s: None)
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with RayRunner(MetricWorker(config), config=RayRunnerConfig(workers=1)) as runner:
            there = run_metric_search(config, tmp_path / "ray", log=lambda s: None, runner=runner)
    finally:
        ray.shutdown()
    assert there["leaderboard"] == reference["leaderboard"]
    assert there["counts"] == reference["counts"]


def test_cli_metric_search_on_ray_gives_the_in_process_search(tiny, tmp_path):
    ray = pytest.importorskip("ray")
    model_dir, text = tiny
    base = ["metric-search", "--model", str(model_dir), "--data", str(text), "--seed", "3"]
    small = ["--n-sequences", "2", "--seq-len", "16", "--population", "4", "--generations", "1"]
    assert main([*base, *small, "--out", str(tmp_path / "here")]) == 0
    try:
        flags = ["--runner", "ray", "--workers", "1", "--out", str(tmp_path / "ray")]
        assert main([*base, *small, *flags]) == 0
    finally:
        ray.shutdown()
    here, there = (
        json.loads((tmp_path / d / "results.json").read_text()) for d in ("here", "ray")
    )
    assert there["leaderboard"] == here["leaderboard"] and there["counts"] == here["counts"]
    assert main([*base, "--runner", "ray", "--workers", "0", "--out", str(tmp_path / "w")]) == 2


def test_resume_and_out_dir_guards(finished, tiny):
    run, _ = finished
    with pytest.raises(ValueError, match="--resume"):
        run_metric_search(_config(tiny), run, log=lambda s: None)
    with pytest.raises(ValueError, match="different config"):
        run_metric_search(_config(tiny, seed=5), run, resume=True, log=lambda s: None)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # nn.Linear and GPT-2's Conv1D
def test_metric_space_matches_a_manual_prune_and_keeps_the_model(arch):
    model = build_model(arch, n_layers=2)
    ids = random_ids(3, 16)
    stats = collect_stats(model, ids, gradients=True)
    dense = compute_dense_cache(model, ids, prefix_reuse=False)
    kl = KLDivergence()
    kl.prepare(model, ids, dense)
    batch = Batch((0, 1, 2), ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluator = Evaluator(model, MetricSpace(stats, sparsity=0.5), kl, dense, prefix_reuse=False)
    value = evaluator.raw(MetricGenome(parse(KNOWN_METRICS["wanda"])), batch)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ms.MetricError, match="constant"):
        evaluator.raw(MetricGenome(parse("sub(G, G)")), batch)
    outcome = evaluator.outcome(MetricGenome(parse("sub(G, G)")), batch)
    assert "constant" in outcome.error and math.isnan(outcome.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the same pruning done by hand through the built-in Wanda pruner
    from evosearch.evaluation import Candidate
    from evosearch.genome import Genome
    from evosearch.pruning import set_weight_

    wanda = get_pruner("wanda")
    for ref in block_linears(model):
        set_weight_(ref.module(model), wanda.prune(ref.weight(model), stats[ref.name], 0.5))
    manual = kl(Candidate(model, Genome((0,)), 0, dense), batch)
    assert value == pytest.approx(manual, rel=1e-6)
    assert value > 0


def test_cli_metric_search_and_errors(tiny, tmp_path, capsys):
    model_dir, text = tiny
    base = ["metric-search", "--model", str(model_dir), "--data", str(text)]
    small = ["--n-sequences", "2", "--seq-len", "16", "--population", "4", "--generations", "1"]
    out = tmp_path / "cli"
    assert main([*base, *small, "--pattern", "2:4", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["target"] == "2:4"
    assert "gen   1/1" in capsys.readouterr().out
    assert main([*base, *small, "--out", str(out), "--resume"]) == 2  # config differs (target)
    assert "different config" in capsys.readouterr().err
    assert main([*base, "--sparsity", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main([*base, "--pattern", "2-4", "--out", str(tmp_path / "y")]) == 2
    assert "pattern" in capsys.readouterr().err
    assert main([*base, "--pattern", "2:3", *small, "--out", str(tmp_path / "z")]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main([*base, "--seed-metrics", "eval(W)", "--out", str(tmp_path / "w")]) == 2
    assert "unknown name" in capsys.readouterr().err
    # the grammar's constants and the held-out check reach the config; bad values are errors
    flags = ["--const-prob", "0", "--holdout-sequences", "0", "--out", str(tmp_path / "c")]
    assert main([*base, *small, *flags]) == 0
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["const_prob"] == 0 and saved["holdout_sequences"] == 0
    assert "held-out" not in capsys.readouterr().out
    assert main([*base, "--holdout-sequences", "-1", "--out", str(tmp_path / "h")]) == 2
    assert "holdout_sequences" in capsys.readouterr().err
    assert main([*base, "--const-prob", "1.5", "--out", str(tmp_path / "p")]) == 2
    assert "const_prob" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"fitness": "acc"}, "fitness"),
        ({"population": 1}, "population"),
        ({"terminals": ("W", "Q")}, "terminal"),
        ({"elitism": 16}, "elitism"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetricSearchConfig(**kwargs)


def test_config_round_trips_through_json():
    cfg = MetricSearchConfig(pattern="2:4", terminals=("W", "X"), seed_metrics=("wanda",))
    again = MetricSearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert set(cfg.seed_trees()) == {"wanda"}
    assert set(MetricSearchConfig(terminals=("W", "X")).seed_trees()) == {"magnitude", "wanda"}
    with pytest.raises(ValueError, match="unknown"):
        MetricSearchConfig.from_dict({"popsize": 3})


# The search's result for seed 0 on the tiny model, as written before metric search moved onto
# evosearch.engine.search: a guard that the move kept the trajectory and the values.
GOLDEN_BEST = ("mul(W, exp(G))", 0.08830679208040237, 0.061477724462747574)
GOLDEN_BOARD = [
    ("mul(X, mms(W))", 0.07391931116580963),
    ("mul(W, X)", 0.07460473477840424),
    ("mul(mms(G), sqr(W))", 0.08146839588880539),
    ("pdiv(mul(G, W), 0.026)", 0.08297856897115707),
    ("mul(W, exp(G))", 0.08830679208040237),
    ("W", 0.08956246078014374),
    ("mul(W, exp(X))", 0.09519680589437485),
    ("mul(X, mms(G))", 0.14587752521038055),
    ("G", 0.1561250537633896),
    ("mul(W, mms(rown(pdiv(G, W))))", 0.17194265127182007),
]
GOLDEN_COUNTS = {"proposed": 18, "evaluated": 17, "memo_hits": 1, "rejected": 2}


def test_golden_result_for_seed_0(finished):
    run, results = finished
    best = results["best"]
    assert best["metric"] == GOLDEN_BEST[0]
    assert best["fitness"] == pytest.approx(GOLDEN_BEST[1], rel=1e-5)
    assert best["holdout_fitness"] == pytest.approx(GOLDEN_BEST[2], rel=1e-5)
    board = [(r["metric"], r["fitness"]) for r in results["leaderboard"]]
    assert [m for m, _ in board] == [m for m, _ in GOLDEN_BOARD]
    assert [v for _, v in board] == pytest.approx([v for _, v in GOLDEN_BOARD], rel=1e-5)
    assert {k: results["counts"][k] for k in GOLDEN_COUNTS} == GOLDEN_COUNTS
    assert [g["best_metric"] for g in results["generations"]] == [
        "mul(W, X)",
        "mul(W, X)",
        "mul(W, X)",
        "mul(X, mms(W))",
    ]
    assert results["known_metrics"]["wanda"] == pytest.approx(0.07460473477840424, rel=1e-5)
    history = _history(run)
    assert [r["canonical"] for r in history[:6]] == [
        "W",
        "mul(W, X)",
        "mul(mms(G), sqr(W))",
        "0",
        "sub(sqr(pdiv(pdiv(W, 0), 0)), X)",
        "pdiv(G, W)",
    ]
