"""The front door: a user's fitness file and a third-party space package reach every route the
built-in ones reach (CLI, ``evosearch.run``, Ray workers, resume after ``kill -9``, report)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import build_model, hf_tokenizer

import evosearch
from evosearch import registry
from evosearch.cli import main

ROOT = Path(__file__).resolve().parents[1]

USER_FITNESS = '''
import os, signal
import torch


def score(model, batch):
    """Mean next-token loss of the candidate (lower is better)."""
    kill_at = os.environ.get("KILL_AT_CALL")
    if kill_at:
        calls = int(os.environ.get("_CALLS", "0")) + 1
        os.environ["_CALLS"] = str(calls)
        if calls == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
    out = model(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False)
    return float(out.loss)
'''

TOY_SPACE = """
from evosearch import register_space
from search_spaces.layer_drop import LayerDropSpace, param_counts


def build(ctx):
    n = len(ctx.model.model.layers)
    return LayerDropSpace(n, num_drop=1, counts=param_counts(ctx.model))


register_space("toy-drop-one", build)
"""

CONFIG = {
    "num_drop": 2, "n_sequences": 4, "seq_len": 16, "generations": 2, "offspring": 4,
    "initial_population": 4, "stages": [[16, 2], [64, 1]],
}  # fmt: skip
FLAGS = [
    "--drop", "2", "--n-sequences", "4", "--seq-len", "16", "--generations", "2",
    "--offspring", "4", "--initial-population", "4", "--stages", "16:2,64:1",
]  # fmt: skip


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A folder as a user has it: a tiny model, calibration text and ``user_fit.py``."""
    root = tmp_path_factory.mktemp("user")
    model_dir = root / "tiny"
    build_model("llama", n_layers=6, max_position_embeddings=256).save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)
    (root / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    (root / "user_fit.py").write_text(USER_FITNESS)
    return root


def _summary(run: Path) -> tuple:
    results = json.loads((run / "results.json").read_text())
    return results["best"], results["history"], results["n_evaluations"]


def _py_config(user_dir: Path) -> dict:
    return {**CONFIG, "model": str(user_dir / "tiny"), "data": str(user_dir / "calib.txt")}


def test_user_fitness_gives_the_same_search_on_the_cli_on_ray_and_from_python(
    user_dir, tmp_path, monkeypatch
):
    pytest.importorskip("ray")
    monkeypatch.chdir(user_dir)
    base = ["search", "--model", "tiny", "--data", "calib.txt", *FLAGS]
    ray_flags = ["--runner", "ray", "--workers", "2", "--worker-cpus", "0.5"]
    cli_run = tmp_path / "cli"
    assert main([*base, "--fitness", "user_fit:score", *ray_flags, "--out", str(cli_run)]) == 0
    import ray

    ray.shutdown()
    sys.path.insert(0, str(user_dir))
    import user_fit

    py_run = tmp_path / "py"
    evosearch.run(_py_config(user_dir), out=py_run, fitness=user_fit.score, log=lambda _: None)
    assert _summary(cli_run) == _summary(py_run)
    saved = json.loads((cli_run / "config.json").read_text())
    assert saved["fitness"] == "user_fit:score" and saved["runner"]["name"] == "ray"
    assert json.loads((py_run / "config.json").read_text())["fitness"] == "user_fit:score"
    assert "user_fit:score" in (cli_run / "report.html").read_text()


def _run_killed(cmd: list[str], cwd: Path, at: int) -> None:
    env = {**os.environ, "KILL_AT_CALL": str(at), "PYTHONPATH": f"{ROOT}:{cwd}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{cwd}"}
    env.pop("KILL_AT_CALL", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_route_resumes_after_kill_9_to_the_undisturbed_result(user_dir, tmp_path):
    cli = [sys.executable, "-m", "evosearch.cli", "search", "--model", "tiny", "--data",
           "calib.txt", *FLAGS, "--fitness", "user_fit:score"]  # fmt: skip
    script = textwrap.dedent(f"""
        import sys, evosearch, user_fit
        evosearch.run({_py_config(user_dir)!r}, out=sys.argv[1], fitness=user_fit.score)
    """)
    (tmp_path / "py_route.py").write_text(script)
    py = [sys.executable, str(tmp_path / "py_route.py")]
    for name, cmd, out in (
        ("cli", cli, ["--out"]),
        ("py", py, []),
    ):
        clean, killed = tmp_path / f"{name}-clean", tmp_path / f"{name}-killed"
        _run([*cmd, *out, str(clean)], user_dir)
        _run_killed([*cmd, *out, str(killed)], user_dir, at=9)
        assert not (killed / "results.json").exists()
        resume = ["--resume"] if name == "cli" else []
        _run([*cmd, *out, str(killed), *resume], user_dir)
        assert _summary(killed)[:2] == _summary(clean)[:2], name  # best and history

        def keys(run: Path) -> list:
            lines = (run / "evaluations.jsonl").read_text().splitlines()
            return [(json.loads(x)["genome"], json.loads(x)["batch"]) for x in lines]

        assert len(keys(killed)) == len(set(keys(killed))), "evaluated twice on one batch"
        assert sorted(keys(killed)) == sorted(keys(clean))


@pytest.fixture
def toy_space_package(tmp_path, monkeypatch):
    """A third-party package that registers a space through an ``evosearch.spaces`` entry
    point, installed (as a folder with its dist-info) on the path."""
    site = tmp_path / "site"
    (site / "toy_space").mkdir(parents=True)
    (site / "toy_space" / "__init__.py").write_text(TOY_SPACE)
    info = site / "toy_space-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-space\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[evosearch.spaces]\ntoy = toy_space\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_loaded", set())  # read the entry points again
    yield
    registry._SPACES.pop("toy-drop-one", None)


def test_a_space_registered_by_entry_point_runs_from_cli_and_python(
    toy_space_package, user_dir, tmp_path
):
    assert "toy-drop-one" in registry.spaces()
    base = ["search", "--model", str(user_dir / "tiny"), "--data", str(user_dir / "calib.txt")]
    flags = FLAGS[2:]  # no --drop: the toy space drops one block
    out = tmp_path / "cli"
    assert main([*base, *flags, "--space", "toy-drop-one", "--out", str(out)]) == 0
    config = {k: v for k, v in _py_config(user_dir).items() if k != "num_drop"}
    results = evosearch.run(
        {**config, "space": {"name": "toy-drop-one"}}, out=tmp_path / "py", log=lambda _: None
    )
    assert len(results["best"]["dropped_blocks"]) == 1
    assert _summary(out) == _summary(tmp_path / "py")


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["demo", "sparsity", "width"])
def test_flat_configs_of_earlier_runs_read_as_the_nested_config(name):
    """``config.json`` files written before the nested config (saved here from the previous
    version) read into the nested config with every setting where it belongs."""
    from evosearch.config import SearchConfig

    flat = json.loads((DATA / f"legacy_{name}_config.json").read_text())
    config = SearchConfig.from_dict(flat)
    assert SearchConfig.from_dict(config.to_dict()) == config  # nested form round-trips
    if name == "demo":
        import yaml

        demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        assert demo.pop("evaluation")["ppl"] == ["generated"]  # added later: held-out text
        assert config == SearchConfig.from_dict(demo)
        assert config.space.settings.num_drop == 7 and config.stages[0].tokens == 512
    elif name == "sparsity":
        assert (
            config.space.settings.sparsity == 0.6 and config.space.settings.pruner == "magnitude"
        )
        assert config.runner.name == "ray" and config.runner.ray.workers == 2
        assert config.evaluation.ppl == ("x.txt",) and config.data.n_sequences == 4
    else:
        assert config.space.settings.target == 0.4 and config.selection_training.tokens == (
            100,
            400,
        )
        assert config.selection_training.train.lr == 3e-4


def test_a_run_directory_of_the_earlier_version_resumes(user_dir, tmp_path, monkeypatch):
    """A finished run whose ``config.json`` has the flat keys resumes without evaluating
    anything again, and a changed setting is still refused."""
    from evosearch.config import SearchConfig

    monkeypatch.chdir(user_dir)
    argv = ["search", "--model", "tiny", "--data", "calib.txt", *FLAGS, "--out", str(tmp_path)]
    argv += ["--dtype", "float32", "--kl-top-k", "0"]  # how the earlier version evaluated
    assert main(argv) == 0
    nested = json.loads((tmp_path / "config.json").read_text())
    flat = {
        "model": "tiny", "space": "layer-drop", "num_drop": 2, "data": "calib.txt",
        "n_sequences": 4, "seq_len": 16, "generations": 2, "offspring": 4,
        "initial_population": 4, "stages": [[16, 2], [64, 1]], "pruner": "wanda",
        "width_train_tokens": [], "sparsity": None, "workers": 1, "runner": "inprocess",
    }  # fmt: skip
    from evosearch.jobs.search import _upgrade

    assert _upgrade(flat) == nested  # flat, and evaluated as the earlier version did
    assert SearchConfig.from_dict(flat).dtype == "auto"  # a flat YAML of today: new defaults
    (tmp_path / "config.json").write_text(json.dumps(flat))
    lines = (tmp_path / "evaluations.jsonl").read_text()
    assert main([*argv, "--resume"]) == 0
    assert (tmp_path / "evaluations.jsonl").read_text() == lines
    assert main([*argv, "--resume", "--seed", "3"]) == 2
    today = argv[: argv.index("--dtype")]  # today's defaults: bf16 where native, top-256 KL
    assert main([*today, "--resume"]) == 2
