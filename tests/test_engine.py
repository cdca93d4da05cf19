"""evosearch.engine and evosearch.rundir: the search loop, memoised evaluation, run directories
and resuming a killed run."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import build_model, token_data

from evosearch.engine import Evaluator, sample_batch, search
from evosearch.errors import UserError
from evosearch.evaluation import Batch, CallableFitness, as_fitness
from evosearch.forward import compute_dense_cache
from evosearch.rundir import RunConfigMismatch, RunDir
from evosearch.strategies import EvoPress, EvoPressConfig, Stage
from evosearch.surgery import apply_replacements
from fitness import KLDivergence
from search_spaces import LayerDropSpace

N_BLOCKS = 6
CONFIG = EvoPressConfig(
    generations=4,
    offspring=4,
    initial_population=5,
    stages=(Stage(tokens=16, survivors=2), Stage(tokens=48, survivors=1)),
)
RUN_CONFIG = {"model": "tiny-llama", "num_drop": 2, "seed": 0}


@pytest.fixture(scope="module")
def setup():
    """A 6-block tiny llama, 8 x 8 calibration tokens and a prepared KL fitness."""
    model = build_model("llama", n_layers=N_BLOCKS)
    data = token_data(8, 8)
    dense = compute_dense_cache(model, data.input_ids)
    kl = KLDivergence()
    kl.prepare(model, data.input_ids, dense)
    space = LayerDropSpace(N_BLOCKS, num_drop=2)
    return model, data, dense, kl, space


def _strategy(space, seed=0):
    return EvoPress(space, config=CONFIG, rng=np.random.default_rng(seed))


class RecordingRunDir(RunDir):
    """A RunDir that also remembers every checkpoint it wrote, to replay a kill later."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.checkpoints: list[dict] = []

    def write_checkpoint(self, state: dict) -> None:
        self.checkpoints.append(copy.deepcopy(state))
        super().write_checkpoint(state)


def _run(setup, path, *, resume=False, run_cls=RunDir):
    model, data, dense, kl, space = setup
    run = run_cls(path)
    run.start(RUN_CONFIG, resume=resume)
    evaluator = Evaluator(model, space, kl, dense)
    result = search(
        _strategy(space), evaluator, data, seed=0, run=run, resume=resume, progress=None
    )
    return run, evaluator, result


def _lines(path) -> list[str]:
    return (path / "evaluations.jsonl").read_text().splitlines()


# -- search and the run directory ------------------------------------------------------------


def test_search_writes_config_evaluations_and_checkpoint(setup, tmp_path):
    run, evaluator, result = _run(setup, tmp_path / "run")
    space = setup[4]
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == RUN_CONFIG

    records = [json.loads(line) for line in _lines(tmp_path / "run")]
    assert len(records) == len(result.evaluations) == result.n_evaluations
    assert result.n_evaluations == evaluator.evaluations > 0
    assert records == result.evaluations
    assert {"genome", "batch", "tokens", "value", "seconds", "generation", "stage"} <= set(
        records[0]
    )
    assert len({(r["genome"], r["batch"]) for r in records}) == len(records)  # no repeats
    assert result.tokens == sum(r["tokens"] for r in records)

    state = run.checkpoint()["strategy"]
    assert state["generation"] == CONFIG.generations + 1
    assert [h["best"] for h in state["history"]] == [h["best"] for h in result.history]
    assert len(result.history) == CONFIG.generations + 1
    assert space.spec.is_valid(result.best)
    assert result.best.key() == result.history[-1]["best"]
    assert result.best_value == pytest.approx(result.history[-1]["value"])
    assert result.best_value > 0


def test_every_candidate_of_a_stage_sees_the_same_batch(setup, tmp_path):
    _, _, result = _run(setup, tmp_path / "run")
    batches: dict[tuple[int, int], set[str]] = {}
    for record in result.evaluations:
        batches.setdefault((record["generation"], record["stage"]), set()).add(record["batch"])
    assert all(len(b) == 1 for b in batches.values())
    assert len(batches) == (CONFIG.generations + 1) * len(CONFIG.stages)


def test_search_is_deterministic(setup, tmp_path):
    _, _, a = _run(setup, tmp_path / "a")
    _, _, b = _run(setup, tmp_path / "b")
    assert a.best == b.best
    assert a.history == b.history
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a.evaluations]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b.evaluations]


def _simulate_kill(src, dst, checkpoints, *, after_generation: int, extra: int) -> int:
    """Copy a finished run to ``dst`` as if it had been killed during generation
    ``after_generation + 1``: the checkpoint of ``after_generation`` and the log up to
    ``extra`` evaluations into the next generation. Returns the number of removed lines."""
    shutil.copytree(src, dst)
    lines = _lines(dst)
    records = [json.loads(line) for line in lines]
    keep = sum(1 for r in records if r["generation"] <= after_generation) + extra
    assert records[keep]["generation"] == after_generation + 1  # the kill is mid-generation
    (dst / "evaluations.jsonl").write_text("".join(line + "\n" for line in lines[:keep]))
    state = checkpoints[after_generation]
    assert state["strategy"]["generation"] == after_generation + 1
    (dst / "checkpoint.json").write_text(json.dumps(state))
    return len(lines) - keep


def test_resume_after_a_kill_repeats_nothing_and_changes_nothing(setup, tmp_path):
    run, _, full = _run(setup, tmp_path / "full", run_cls=RecordingRunDir)
    assert len(run.checkpoints) == CONFIG.generations + 1
    removed = _simulate_kill(
        tmp_path / "full", tmp_path / "killed", run.checkpoints, after_generation=1, extra=3
    )
    assert removed > 0

    _, evaluator, resumed = _run(setup, tmp_path / "killed", resume=True)
    assert evaluator.evaluations == removed  # only what the kill lost is evaluated again
    assert resumed.best == full.best
    assert resumed.best_value == pytest.approx(full.best_value, rel=1e-6)
    assert [h["best"] for h in resumed.history] == [h["best"] for h in full.history]
    assert [h["value"] for h in resumed.history] == pytest.approx(
        [h["value"] for h in full.history], rel=1e-6
    )
    keys = [(r["genome"], r["batch"]) for r in resumed.evaluations]
    assert keys == [(r["genome"], r["batch"]) for r in full.evaluations]
    assert len(_lines(tmp_path / "killed")) == len(_lines(tmp_path / "full"))
    # the pooled elite and the flip rate: from the checkpoint before the kill, the log after
    for key in ("elite_value", "elite_se", "elite_tokens", "flip_rate"):
        expected = [h[key] for h in full.history]
        assert [h[key] for h in resumed.history] == pytest.approx(expected, rel=1e-9), key


def test_resume_after_a_kill_mid_write_keeps_a_readable_log(setup, tmp_path):
    """A kill can cut the last line of evaluations.jsonl short. The resumed run must not glue
    its first new record onto that fragment, or the record is lost to the next resume."""
    run, _, full = _run(setup, tmp_path / "full", run_cls=RecordingRunDir)
    removed = _simulate_kill(
        tmp_path / "full", tmp_path / "killed", run.checkpoints, after_generation=1, extra=2
    )
    next_line = _lines(tmp_path / "full")[len(_lines(tmp_path / "killed"))]
    with (tmp_path / "killed" / "evaluations.jsonl").open("a") as fh:
        fh.write(next_line[: len(next_line) // 2])  # half a record, no newline

    _, evaluator, resumed = _run(setup, tmp_path / "killed", resume=True)
    assert evaluator.evaluations == removed
    assert resumed.best == full.best
    logged = RunDir(tmp_path / "killed").evaluations()
    assert len(logged) == len(full.evaluations)


def test_run_dir_start(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.start({"a": 1, "b": 2}, resume=False) is False
    assert run.start({"a": 1, "b": 2}, resume=True) is True
    with pytest.raises(UserError, match="resume"):
        RunDir(tmp_path / "run").start({"a": 1, "b": 2}, resume=False)
    with pytest.raises(RunConfigMismatch) as info:
        RunDir(tmp_path / "run").start({"a": 1, "b": 3}, resume=True)
    assert str(info.value).split("differs in")[1].startswith(" b (2 -> 3)")
    with pytest.raises(RunConfigMismatch) as info:
        RunDir(tmp_path / "run").start({"a": 1, "b": 2, "c": 0}, resume=True)
    assert str(info.value).split("differs in")[1].startswith(" c (None -> 0)")
    # a setting added after the run was written: the run had its legacy value
    assert RunDir(tmp_path / "run").start({"a": 1, "b": 2, "c": 0}, resume=True, legacy={"c": 0})
    with pytest.raises(RunConfigMismatch, match="differs in c"):
        RunDir(tmp_path / "run").start({"a": 1, "b": 2, "c": 1}, resume=True, legacy={"c": 0})


def test_run_dir_ignores_a_truncated_last_line(tmp_path):
    run = RunDir(tmp_path)
    run.append_evaluation({"genome": "01", "batch": "0", "value": 1.0})
    with (tmp_path / "evaluations.jsonl").open("a") as fh:
        fh.write('{"genome": "1')
    assert run.evaluations() == [{"genome": "01", "batch": "0", "value": 1.0}]
    assert RunDir(tmp_path / "empty").evaluations() == []
    assert RunDir(tmp_path / "empty").checkpoint() is None


# -- Evaluator -------------------------------------------------------------------------------


class CountingFitness:
    name = "count"
    direction = "minimize"

    def __init__(self, value=1.0):
        self.calls = 0
        self.value = value

    def __call__(self, candidate, batch) -> float:
        self.calls += 1
        return self.value() if callable(self.value) else self.value


def test_duplicates_are_never_evaluated_twice(setup):
    model, data, dense, _, space = setup
    fitness = CountingFitness(2.5)
    evaluator = Evaluator(model, space, fitness, dense)
    genome = space.from_dropped(blocks=[1, 4])
    batch = sample_batch(data, 16, seed=0, generation=0, stage=0)
    first = evaluator(genome, batch)
    second = evaluator(genome, batch)
    assert first[0] == second[0] == 2.5
    assert first[1] is not None and second[1] is None
    assert fitness.calls == evaluator.evaluations == 1
    assert evaluator.tokens == batch.n_tokens
    other_batch = sample_batch(data, 16, seed=0, generation=0, stage=1)
    assert other_batch.key() != batch.key()
    evaluator(genome, other_batch)  # same genome, other tokens: a new evaluation
    evaluator(space.from_dropped(blocks=[0, 1]), batch)
    assert fitness.calls == evaluator.evaluations == 3


def test_failed_and_non_finite_evaluations_are_infinite(setup):
    model, data, dense, _, space = setup
    batch = sample_batch(data, 16, seed=0, generation=0, stage=0)

    def boom():
        raise RuntimeError("out of something")

    value, record = Evaluator(model, space, CountingFitness(boom), dense)(
        space.from_dropped(blocks=[0, 1]), batch
    )
    assert value == math.inf
    assert record["value"] is None and "out of something" in record["error"]
    value, record = Evaluator(model, space, CountingFitness(math.nan), dense)(
        space.from_dropped(blocks=[0, 1]), batch
    )
    assert value == math.inf and "non-finite" in record["error"]


def test_search_fails_loudly_when_every_candidate_fails(setup):
    model, data, dense, _, space = setup

    def boom():
        raise ValueError("bad candidate")

    evaluator = Evaluator(model, space, CountingFitness(boom), dense)
    with pytest.raises(UserError, match="bad candidate"):
        search(_strategy(space), evaluator, data, progress=None)


def test_maximised_fitness_is_negated_for_the_strategy(setup):
    model, data, dense, _, space = setup
    evaluator = Evaluator(model, space, CallableFitness(_first_logit, direction="maximize"), dense)
    genome = space.from_dropped(blocks=[2, 3])
    batch = sample_batch(data, 16, seed=0, generation=0, stage=0)
    raw = evaluator.raw(genome, batch)
    assert evaluator(genome, batch)[0] == -raw

    result = search(_strategy(space), evaluator, data, progress=None)
    final = sample_batch(
        data, CONFIG.stages[-1].tokens, seed=0, generation=CONFIG.generations, stage=1
    )
    final_values = [-v for (_, b), v in evaluator.cache.items() if b == final.key()]
    assert result.best_value == max(final_values)  # reported in its own direction
    assert result.best_value == pytest.approx(evaluator.raw(result.best, final))
    assert result.history[-1]["value"] == result.best_value


def _first_logit(model, batch) -> float:
    return model(input_ids=batch.input_ids, use_cache=False).logits[:, -1, 0].mean().item()


# -- user fitness ----------------------------------------------------------------------------


def test_a_plain_callable_plugs_in_as_a_fitness(setup):
    model, data, dense, kl, space = setup
    seen = []

    def mean_nll(model, batch) -> float:
        seen.append((type(model).__name__, type(batch).__name__))
        out = model(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False)
        return out.loss.item()

    fitness = as_fitness(mean_nll)
    assert isinstance(fitness, CallableFitness)
    assert (fitness.name, fitness.direction) == ("mean_nll", "minimize")
    evaluator = Evaluator(model, space, fitness, dense)
    result = search(_strategy(space), evaluator, data, progress=None)
    assert seen and set(seen) == {("LlamaForCausalLM", "Batch")}
    assert len(seen) == result.n_evaluations

    # the reported best value is the callable's value on the materialised best genome
    final_tokens = CONFIG.stages[-1].tokens
    batch = sample_batch(
        data, final_tokens, seed=0, generation=CONFIG.generations, stage=len(CONFIG.stages) - 1
    )
    with apply_replacements(model, space.replacements(model, result.best)), torch.no_grad():
        expected = model(input_ids=batch.input_ids, labels=batch.input_ids).loss.item()
    assert result.best_value == pytest.approx(expected, rel=1e-6)


def test_as_fitness_passes_protocol_objects_through_and_rejects_non_callables():
    kl = KLDivergence()
    assert as_fitness(kl) is kl
    with pytest.raises(TypeError, match="callable"):
        as_fitness(42)
    with pytest.raises(ValueError, match="direction"):
        CallableFitness(lambda m, b: 0.0, direction="up")


# -- sample_batch ----------------------------------------------------------------------------


def test_sample_batch_is_deterministic_and_differs_across_stages():
    data = token_data(32, 8)
    a = sample_batch(data, 40, seed=0, generation=2, stage=1)
    b = sample_batch(data, 40, seed=0, generation=2, stage=1)
    assert a.indices == b.indices and torch.equal(a.input_ids, b.input_ids)
    assert len(a.indices) == 5  # ceil(40 / 8) sequences
    assert list(a.indices) == sorted(set(a.indices))
    assert torch.equal(a.input_ids, data.input_ids[list(a.indices)])
    keys = {
        sample_batch(data, 40, seed=0, generation=g, stage=s).key()
        for g in range(3)
        for s in range(2)
    }
    assert len(keys) == 6
    assert sample_batch(data, 40, seed=1, generation=2, stage=1).key() != a.key()


def test_sample_batch_takes_everything_when_asked_for_more():
    data = token_data(4, 8)
    batch = sample_batch(data, 1000, seed=0, generation=0, stage=0)
    assert batch.indices == (0, 1, 2, 3)
    assert batch.n_tokens == 32


def test_batch_split():
    data = token_data(5, 4)
    batch = Batch(tuple(range(5)), data.input_ids)
    parts = list(batch.split(2))
    assert [p.indices for p in parts] == [(0, 1), (2, 3), (4,)]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), data.input_ids)


# -- wall-clock budget -----------------------------------------------------------------------


class FakeClock:
    """``time`` for the engine: a clock that moves only when a fitness says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class TimedFitness:
    """Costs ``per_token`` fake seconds per token; the value is the dropped blocks' index sum
    (lower is better: the first blocks)."""

    name, direction = "timed", "minimize"

    def __init__(self, clock: FakeClock, per_token: float = 0.01) -> None:
        self.clock, self.per_token = clock, per_token

    def __call__(self, candidate, batch) -> float:
        self.clock.now += self.per_token * batch.n_tokens
        return float(sum(i for i, v in enumerate(candidate.genome.levels) if v))


def _timed_search(setup, monkeypatch, config, max_seconds, *, strategy=None, run=None):
    import evosearch.engine as engine

    model, data, dense, _, space = setup
    clock = FakeClock()
    monkeypatch.setattr(engine, "time", clock)
    strategy = strategy or EvoPress(space, config=config, rng=np.random.default_rng(0))
    evaluator = Evaluator(model, space, TimedFitness(clock), dense)
    lines: list[str] = []
    result = search(
        strategy, evaluator, data, max_seconds=max_seconds, progress=lines.append, run=run
    )
    return strategy, result, clock.now, lines


def test_a_time_budget_ends_the_evolution_early_then_polishes_within_it(setup, monkeypatch):
    long = dataclasses.replace(CONFIG, generations=40, polish=1)
    _, _, unlimited, _ = _timed_search(setup, monkeypatch, long, None)
    budget = unlimited / 3
    strategy, result, spent, lines = _timed_search(setup, monkeypatch, long, budget)
    assert spent <= budget
    evolution = [h for h in strategy.history if not h.get("polish")]
    assert 1 < len(evolution) < long.generations + 1
    assert strategy.history[-1].get("polish")  # the polish still ran, inside the budget
    assert any(line.startswith("time budget: finishing") for line in lines)
    assert all(line.endswith(f"s of {budget:.0f}s") for line in lines if line.startswith("gen"))
    # the next generation plus the polish would not have fitted
    assert spent + (unlimited / (long.generations + 2)) > budget * 0.9


class SlowingFitness(TimedFitness):
    """A machine that slows down: each evaluation costs ``slowdown`` times the one before."""

    def __init__(self, clock: FakeClock, slowdown: float) -> None:
        super().__init__(clock)
        self.slowdown = slowdown

    def __call__(self, candidate, batch) -> float:
        self.per_token *= self.slowdown
        return super().__call__(candidate, batch)


def _overshoots(setup, monkeypatch, margin: float) -> list[float]:
    """Budgets (out of 12) that a search on a machine 0.5 % slower per evaluation overshoots,
    with the deadline's prediction padded by ``margin``."""
    import evosearch.engine as engine

    model, data, dense, _, space = setup
    monkeypatch.setattr(engine._Deadline, "margin", margin)
    monkeypatch.setattr(engine, "time", clock := FakeClock())
    long = dataclasses.replace(CONFIG, generations=40, polish=1)
    over = []
    for budget in range(10, 130, 10):
        clock.now = 0.0
        strategy = EvoPress(space, config=long, rng=np.random.default_rng(0))
        evaluator = Evaluator(model, space, SlowingFitness(clock, 1.005), dense)
        search(strategy, evaluator, data, max_seconds=budget, progress=None)
        over += [budget] if clock.now > budget else []
    return over


def test_the_time_budget_is_padded_against_a_machine_that_slows_down(setup, monkeypatch):
    assert _overshoots(setup, monkeypatch, margin=0.0)  # the bare prediction overshoots
    assert _overshoots(setup, monkeypatch, margin=0.1) == []


def test_a_time_budget_stops_a_strategy_without_finish_at_a_generation(setup, monkeypatch):
    from evosearch.strategies import MultiBudgetEvoPress

    model, data, dense, _, space = setup
    long = dataclasses.replace(CONFIG, generations=40)
    strategy = MultiBudgetEvoPress(
        space, budgets=[1, 2], config=long, rng=np.random.default_rng(0),
        objectives=lambda g: (float(sum(g.levels)),),
    )  # fmt: skip
    assert not hasattr(strategy, "finish")
    _, result, spent, lines = _timed_search(setup, monkeypatch, long, 5.0, strategy=strategy)
    assert spent <= 5.0
    assert 0 < len(strategy.history) < long.generations + 1 and not strategy.done
    assert any(line.startswith("time budget: stopping") for line in lines)


def test_a_resumed_run_keeps_its_time_budget_decision(setup, monkeypatch, tmp_path):
    long = dataclasses.replace(CONFIG, generations=40, polish=1)
    _, _, unlimited, _ = _timed_search(setup, monkeypatch, long, None)
    run = RecordingRunDir(tmp_path / "first")
    run.start(RUN_CONFIG, resume=False)
    first, result, spent, _ = _timed_search(setup, monkeypatch, long, unlimited / 3, run=run)
    # the kill: after the generation at which the budget ended the evolution
    finished = next(c for c in run.checkpoints if c["strategy"]["last_generation"] < 40)
    assert finished["seconds"] > 0 and not finished["stopped"]
    again = RunDir(tmp_path / "first")
    again.write_checkpoint(finished)
    resumed = EvoPress(setup[4], config=long, rng=np.random.default_rng(0))
    resumed_result = search(
        resumed, Evaluator(*setup[:1], setup[4], TimedFitness(FakeClock()), setup[2]),
        setup[1], run=again, resume=True, progress=None, max_seconds=unlimited / 3,
    )  # fmt: skip
    assert resumed.last_generation == first.last_generation
    assert resumed_result.best == result.best
    assert [h["best"] for h in resumed.history] == [h["best"] for h in first.history]
