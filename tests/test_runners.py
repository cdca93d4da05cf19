"""evosearch.runners: in-process and Ray evaluation give the same search; Ray workers that die
are replaced and their candidates re-run; failures keep their in-process meaning.

The Ray tests start a local Ray instance with 2 CPUs and at most 2 workers at a time (each
worker is a Python process that imports torch), so they stay small on a shared 2-core machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys

import numpy as np
import pytest
from conftest import build_model, hf_tokenizer, token_data

from evosearch.engine import Evaluator, sample_batch, search
from evosearch.forward import compute_dense_cache
from evosearch.runners import (
    InProcessRunner,
    Outcome,
    RayRunner,
    RayRunnerConfig,
    WorkerLostError,
    plan_shards,
)
from evosearch.strategies import EvoPress, EvoPressConfig, Stage
from fitness import KLDivergence
from search_spaces import LayerDropSpace

N_BLOCKS = 6
CONFIG = EvoPressConfig(
    generations=4,
    offspring=4,
    initial_population=5,
    stages=(Stage(tokens=16, survivors=2), Stage(tokens=48, survivors=1)),
)
WORKER = {"num_cpus": 0.5, "in_flight": 2}  # two workers fit the 2-CPU test instance


# -- what the workers rebuild ----------------------------------------------------------------


class KillOnce:
    """A fitness wrapper that SIGKILLs its own worker process at its ``at``-th call, once per
    test: the first worker to get there creates ``marker`` and dies mid-evaluation, so a
    replacement that re-runs the candidate does not die again. ``marker=None`` kills every
    time (a candidate that always takes its worker down)."""

    name = "kl"
    direction = "minimize"

    def __init__(self, inner, marker: str | None, at: int) -> None:
        self.inner, self.marker, self.at, self.calls = inner, marker, at, 0

    def prepare(self, model, input_ids, dense) -> None:
        self.inner.prepare(model, input_ids, dense)

    def __call__(self, candidate, batch) -> float:
        self.calls += 1
        if self.calls >= self.at and self._claim():
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(candidate, batch)

    def _claim(self) -> bool:
        if self.marker is None:
            return True
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False


class FailOnBlockZero:
    """KL, except that a genome dropping block 0 raises (or raises a TypeError, a bug)."""

    name = "kl"
    direction = "minimize"

    def __init__(self, exc: type[Exception] = RuntimeError) -> None:
        self.inner, self.exc = KLDivergence(), exc

    def prepare(self, model, input_ids, dense) -> None:
        self.inner.prepare(model, input_ids, dense)

    def __call__(self, candidate, batch) -> float:
        if candidate.genome.levels[0]:  # block 0 dropped
            raise self.exc("block 0 is load-bearing")
        return self.inner(candidate, batch)


class TinyRecipe:
    """Loads the saved tiny llama in the worker and prepares the fitness on shared data."""

    def __init__(self, model_dir: str, fitness=None) -> None:
        self.model_dir, self.fitness = model_dir, fitness

    def __call__(self, *, input_ids, dense) -> Evaluator:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
        fitness = self.fitness if self.fitness is not None else KLDivergence()
        fitness.prepare(model, input_ids, dense)
        return Evaluator(model, LayerDropSpace(N_BLOCKS, num_drop=2), fitness, dense)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for this module; test code is shipped to workers by value."""
    import ray  # installed by `make test` (the [ray] extra)
    import ray.cloudpickle

    for name in (__name__, "conftest"):
        ray.cloudpickle.register_pickle_by_value(sys.modules[name])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny llama saved to disk (what workers load), data, and the driver's session."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_model("llama", n_layers=N_BLOCKS).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    data = token_data(8, 8)
    dense = compute_dense_cache(model, data.input_ids)
    return str(path), model, data, dense


def _search(tiny, runner=None, fitness=None, progress=None):
    _, model, data, dense = tiny
    fitness = fitness if fitness is not None else KLDivergence()
    fitness.prepare(model, data.input_ids, dense)
    evaluator = Evaluator(model, LayerDropSpace(N_BLOCKS, num_drop=2), fitness, dense)
    strategy = EvoPress(evaluator.space, config=CONFIG, rng=np.random.default_rng(0))
    return search(strategy, evaluator, data, seed=0, progress=progress, runner=runner)


def _ray_runner(tiny, workers: int, fitness=None, **overrides) -> RayRunner:
    path, _, data, dense = tiny
    return RayRunner(
        TinyRecipe(path, fitness),
        shared={"input_ids": data.input_ids, "dense": dense},
        config=RayRunnerConfig(workers=workers, **{**WORKER, **overrides}),
    )


def _trajectory(result) -> tuple:
    records = [{k: v for k, v in r.items() if k != "seconds"} for r in result.evaluations]
    return result.best, result.best_value, result.history, records


# -- no Ray needed ---------------------------------------------------------------------------


def test_ray_runner_config_is_validated():
    assert RayRunnerConfig(num_cpus=0.25).threads == 1
    assert RayRunnerConfig(num_cpus=4).threads == 4
    for bad, match in [
        ({"workers": 0}, "workers"),
        ({"num_cpus": -1}, "num_cpus"),
        ({"num_gpus": -0.5}, "num_gpus"),
        ({"torch_threads": 0}, "torch_threads"),
        ({"max_retries": -1}, "max_retries"),
        ({"in_flight": 0}, "in_flight"),
        ({"address": ""}, "address"),
    ]:
        with pytest.raises(ValueError, match=match):
            RayRunnerConfig(**bad)


def test_in_process_runner_is_the_default_and_yields_in_order(tiny):
    _, model, data, dense = tiny
    default = _search(tiny)
    explicit = _search(tiny, runner=InProcessRunner())
    assert _trajectory(default) == _trajectory(explicit)
    kl = KLDivergence()
    kl.prepare(model, data.input_ids, dense)
    space = LayerDropSpace(N_BLOCKS, num_drop=2)
    evaluator = Evaluator(model, space, kl, dense)
    genomes = [space.from_dropped(blocks=b) for b in ([0, 1], [2, 5], [3, 4])]
    batch = sample_batch(data, 16, seed=0, generation=0, stage=0)
    outcomes = list(InProcessRunner().evaluate(evaluator, genomes, batch))
    assert [o.value for o in outcomes] == [evaluator.raw(g, batch) for g in genomes]
    assert evaluator.evaluations == 0 and not evaluator.cache  # a runner never memoises


def test_a_runner_that_loses_outcomes_is_an_error(tiny):
    class Short:
        def evaluate(self, evaluator, genomes, batch):
            yield Outcome(1.0, None, 0.0)

    with pytest.raises(RuntimeError, match="outcomes for"):
        _search(tiny, runner=Short())


# -- Ray -------------------------------------------------------------------------------------


def test_same_seed_same_search_in_process_and_on_1_or_2_ray_workers(ray_local, tiny):
    reference = _trajectory(_search(tiny))
    for workers in (1, 2):
        with _ray_runner(tiny, workers) as runner:
            assert len(set(runner.worker_pids())) == workers
            assert os.getpid() not in runner.worker_pids()
            assert _trajectory(_search(tiny, runner=runner)) == reference
            assert runner.replaced == 0


def test_plan_shards_cuts_equal_contiguous_pieces():
    assert plan_shards([4, 4, 4], 4) == [
        [(0, 0, 3)],
        [(0, 3, 4), (1, 0, 2)],
        [(1, 2, 4), (2, 0, 1)],
        [(2, 1, 4)],
    ]
    assert plan_shards([1], 3) == [[], [], [(0, 0, 1)]]
    rng = np.random.default_rng(0)
    for _ in range(50):
        units = rng.integers(1, 20, size=rng.integers(1, 6)).tolist()
        parts = int(rng.integers(1, 17))
        plan = plan_shards(units, parts)
        sizes = [sum(b - a for _, a, b in piece) for piece in plan]
        assert len(plan) == parts and max(sizes) - min(sizes) <= 1
        covered = sorted((i, u) for piece in plan for i, a, b in piece for u in range(a, b))
        assert covered == [(i, u) for i, n in enumerate(units) for u in range(n)]


def test_sharded_batches_give_the_in_process_search(ray_local, tiny):
    """Requests of 5 candidates on 2 workers are split by sequence (micro batch 1) across both
    workers, and the combined partial sums reproduce the in-process search exactly."""
    reference = _trajectory(_search(tiny, fitness=KLDivergence(micro_batch=1)))
    with _ray_runner(tiny, 2, KLDivergence(micro_batch=1)) as runner:
        result = _search(tiny, runner=runner, fitness=KLDivergence(micro_batch=1))
        assert runner.sharded > 0
    assert _trajectory(result) == reference
    with _ray_runner(tiny, 2, KLDivergence(micro_batch=1), shard=False) as runner:
        result = _search(tiny, runner=runner, fitness=KLDivergence(micro_batch=1))
        assert runner.sharded == 0
    assert _trajectory(result) == reference


def test_killed_workers_are_replaced_and_the_result_is_unchanged(ray_local, tiny, tmp_path):
    """One worker SIGKILLs itself in the middle of its 3rd evaluation; later the driver kills
    another worker's process between generations. Both are replaced, their candidates re-run,
    and the search is the undisturbed one."""
    # the same fitness, never killing (it gives no per-sequence sums: the pooled elite
    # estimate then pools batch values, and there is no flip rate)
    reference = _trajectory(_search(tiny, fitness=KillOnce(KLDivergence(), None, at=math.inf)))
    fitness = KillOnce(KLDivergence(), str(tmp_path / "killed"), at=3)
    with _ray_runner(tiny, 2, fitness) as runner:
        killed = []

        def kill_a_worker(message: str) -> None:
            if message.startswith("gen   2") and not killed:
                killed.append(runner.worker_pids()[1])
                os.kill(killed[0], signal.SIGKILL)

        result = _search(tiny, runner=runner, progress=kill_a_worker)
        assert (tmp_path / "killed").exists() and killed  # both kills happened
        assert runner.replaced == 2
        assert killed[0] not in runner.worker_pids()
    assert _trajectory(result) == reference


def test_a_candidate_that_keeps_killing_workers_stops_the_search_clearly(ray_local, tiny):
    with _ray_runner(tiny, 1, KillOnce(KLDivergence(), None, at=1), max_retries=1) as runner:
        with pytest.raises(WorkerLostError, match="lost its Ray worker 2 times"):
            _search(tiny, runner=runner)
        assert runner.replaced == 1


def test_failed_candidates_are_recorded_and_bugs_raise_as_in_process(ray_local, tiny):
    reference = _search(tiny, fitness=FailOnBlockZero())
    failed = [r for r in reference.evaluations if "error" in r]
    assert failed and all(r["value"] is None for r in failed)
    assert "RuntimeError: block 0 is load-bearing" in failed[0]["error"]
    with _ray_runner(tiny, 1, FailOnBlockZero()) as runner:
        assert _trajectory(_search(tiny, runner=runner)) == _trajectory(reference)
    with _ray_runner(tiny, 1, FailOnBlockZero(TypeError)) as runner:
        with pytest.raises(TypeError, match="load-bearing"):
            _search(tiny, runner=runner)


def test_cli_search_on_ray_and_resume_in_process(ray_local, tmp_path):
    """``evosearch search --runner ray`` gives the in-process result; a run may be resumed
    with other runner settings, since they cannot change results."""
    from evosearch.cli import main

    model_dir = tmp_path / "tiny"
    build_model("llama", n_layers=N_BLOCKS).save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)  # workers load the model as the driver does
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    args = [
        "search", "--model", str(model_dir), "--drop", "2", "--data", str(text),
        "--n-sequences", "4", "--seq-len", "16", "--generations", "2", "--offspring", "4",
        "--initial-population", "4", "--stages", "16:2,64:1",
    ]  # fmt: skip
    ray_args = ["--runner", "ray", "--workers", "2", "--worker-cpus", "0.5"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), *ray_args]) == 0
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    on_ray = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert on_ray["config"]["runner"]["name"] == "ray"
    assert on_ray["config"]["runner"]["ray"]["workers"] == 2
    assert on_ray["best"] == local["best"]
    assert on_ray["history"] == local["history"]
    lines = (tmp_path / "ray" / "evaluations.jsonl").read_text().splitlines()
    assert main([*args, "--out", str(tmp_path / "ray"), "--resume"]) == 0
    assert (tmp_path / "ray" / "evaluations.jsonl").read_text().splitlines() == lines
    assert main([*args, "--out", str(tmp_path / "ray"), "--resume", "--seed", "1"]) == 2


def test_local_ray_refuses_more_cpus_than_it_has(ray_local, tiny):
    with pytest.raises(ValueError, match="local Ray instance has 2;"):
        _ray_runner(tiny, 3, num_cpus=1)


def test_importing_evosearch_does_not_import_ray():
    import subprocess

    code = (
        "import sys, evosearch, evosearch.runners, evosearch.pipeline, evosearch.cli; "
        "sys.exit('ray' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_runner_settings_are_validated_and_ignored_on_resume(tmp_path):
    from evosearch.pipeline import RUNNER_FIELDS, SearchConfig
    from evosearch.rundir import RunConfigMismatch, RunDir

    config = SearchConfig.from_dict(dict(num_drop=2, runner="ray", workers=4, worker_gpus=0.5))
    assert config.ray_config() == RayRunnerConfig(workers=4, num_cpus=1.0, num_gpus=0.5)
    with pytest.raises(ValueError, match="runner must be one of"):
        SearchConfig.from_dict(dict(num_drop=2, runner="dask"))
    with pytest.raises(ValueError, match="workers must be >= 1"):
        SearchConfig.from_dict(dict(num_drop=2, runner="ray", workers=0))
    run = RunDir(tmp_path)
    assert run.start(config.to_dict(), resume=False, ignore=RUNNER_FIELDS) is False
    local = SearchConfig.from_dict(
        dict(num_drop=2)
    )  # in process, other runner settings: same results
    assert run.start(local.to_dict(), resume=True, ignore=RUNNER_FIELDS) is True
    with pytest.raises(RunConfigMismatch, match="differs in seed"):
        run.start(
            SearchConfig.from_dict(dict(num_drop=2, seed=1)).to_dict(),
            resume=True,
            ignore=RUNNER_FIELDS,
        )
