"""Bad inputs end in one line and exit code 2, and leave nothing behind.

One table of probes, each a command line run in-process on a tiny 6-block Llama: the exit code,
a fragment of the message, and (for a search that fails) no run directory afterwards. The
kill-point test is in ``test_kill_points.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, hf_tokenizer
from helpers import search_args

from evosearch.cli import main

torch.set_num_threads(1)


@dataclass
class Ctx:
    """Paths a probe builds its command line from; ``tmp`` is the probe's own folder."""

    model: Path
    text: Path
    run: Path  # a finished run (a copy per probe)
    tmp: Path
    run_model: Path  # the model the run was made with

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def search(self, *extra: str) -> list[str]:
        return search_args(self.model, self.text, self.out, *extra)

    def yaml(self, text: str) -> list[str]:
        cfg = self.tmp / "c.yaml"
        head = f"model: {self.model}\ndata: {self.text}\nn_sequences: 4\nseq_len: 16\n"
        cfg.write_text(head + text)
        return ["search", "--config", str(cfg), "--out", str(self.out)]

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def resume(self, *extra: str) -> list[str]:
        return search_args(self.run_model, self.text, self.run, "--resume", *extra)


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _unsupported_model(c: Ctx) -> list[str]:
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, is_decoder=True,
    )  # fmt: skip
    BertLMHeadModel(config).save_pretrained(c.tmp / "bert")  # no MLP module: not discoverable
    hf_tokenizer().save_pretrained(c.tmp / "bert")
    return search_args(c.tmp / "bert", c.text, c.out)


def _deep_metric(c: Ctx) -> list[str]:
    expression = "abs(" * 3000 + "W" + ")" * 3000
    metric = c.file("deep.json", json.dumps({"expression": expression}))
    return ["search", "--space", "sparsity", "--target", "0.5", "--pruner", str(metric),
            "--model", str(c.model), "--data", str(c.text), "--n-sequences", "4",
            "--seq-len", "16", "--out", str(c.out)]  # fmt: skip


def _damaged_leveldb(c: Ctx) -> list[str]:
    db = c.tmp / "db"
    args = ["search", "--space", "sparsity", "--target", "0.5", "--pruner", "magnitude",
            "--db-dir", str(db), "--model", str(c.model), "--data", str(c.text),
            "--n-sequences", "4", "--seq-len", "16", "--generations", "0", "--offspring", "2",
            "--initial-population", "0", "--stages", "16:1", "--out"]  # fmt: skip
    assert main([*args, str(c.tmp / "first")]) == 0
    _truncate(next(db.glob("*/00003.safetensors")))
    return [*args, str(c.out)]


def _sublayer_run_without_drops(c: Ctx) -> list[str]:
    run = c.tmp / "sub"
    # 3 attention + 2 MLP sublayers: at least one attention sublayer alone, kept in the drops file
    sub = ("--sublayers", "--attention-drop", "3", "--generations", "0")
    assert main(search_args(c.model, c.text, run, *sub)) == 0
    (run / "model" / "evosearch_drops.json").unlink()
    return ["eval", str(run), "--ppl", str(c.text), "--seq-len", "16", "--windows", "1"]


def _other_budget_genome(c: Ctx) -> list[str]:
    genome = json.loads((c.run / "best_genome.json").read_text())["genome"]
    three = genome.replace("0", "1", 1)  # one block more than the run's budget of two
    return ["export", str(c.run), "--genome", three, "--out", str(c.tmp / "exp")]


def _mutated(c: Ctx, mutate: Callable[[Path], None], *cmd: str) -> list[str]:
    mutate(c.run)
    return [*cmd[:1], str(c.run), *cmd[1:]]


EVAL = ("eval", "--ppl", "{text}", "--seq-len", "16", "--windows", "1")


def _eval_run(c: Ctx, mutate: Callable[[Path], None]) -> list[str]:
    mutate(c.run)
    return ["eval", str(c.run), "--ppl", str(c.text), "--seq-len", "16", "--windows", "1"]


def _rm(name: str) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return mutate


def _write(name: str, data: str) -> Callable[[Path], None]:
    return lambda run: (run / name).write_text(data)


# (id, command line builder, expected exit code, message fragment, search leaves no out dir)
PROBES: list[tuple[str, Callable[[Ctx], list[str]], int, str, bool]] = [
    ("missing model", lambda c: c.search("--model", "/no/such/model"), 2, "not found", True),
    ("unsupported architecture", _unsupported_model, 2, "bert", True),
    ("too many blocks", lambda c: c.search("--drop", "6"), 2, "cannot drop 6", True),
    ("missing data", lambda c: c.search("--data", "/no/such.txt"), 2, "/no/such.txt", True),
    (
        "non-UTF-8 data",
        lambda c: c.search("--data", str(c.file("bin.txt", b"ok\xff\xfe\x00"))),
        2,
        "bin.txt: not UTF-8",
        True,
    ),
    (
        "bad jsonl data",
        lambda c: c.search("--data", str(c.file("d.jsonl", "{oops\n"))),
        2,
        "d.jsonl:1: not valid JSON",
        True,
    ),
    (
        "unknown data format",
        lambda c: c.search("--data", str(c.file("d.csv", "a,b"))),
        2,
        "unknown data format",
        True,
    ),
    (
        "negative seed",
        lambda c: c.search("--seed", "-1"),
        2,
        "(seed): expected an integer >= 0",
        True,
    ),
    ("cuda device", lambda c: c.search("--device", "cuda:99"), 2, "(device): 'cuda:99'", True),
    ("bogus device", lambda c: c.search("--device", "tpu"), 2, "invalid device (device)", True),
    ("bogus storage", lambda c: c.search("--storage", "bogus://x"), 2, "bogus://x", True),
    ("empty journal", lambda c: c.search("--storage", "journal:"), 2, "journal:PATH", True),
    ("decreasing stages", lambda c: c.search("--stages", "64:2,16:1"), 2, "grow from stage", True),
    (
        "survivors > offspring",
        lambda c: c.search("--stages", "16:9,64:1"),
        2,
        "survivors <= offspring",
        True,
    ),
    ("growing survivors", lambda c: c.search("--stages", "16:1,64:2"), 2, "shrink", True),
    ("unparsable stages", lambda c: c.search("--stages", "abc"), 2, "tokens:survivors", True),
    ("non-int flag", lambda c: c.search("--drop", "two"), 2, "invalid int value", True),
    ("unknown fitness", lambda c: c.search("--fitness", "mse"), 2, "unknown fitness 'mse'", True),
    ("zero sequences", lambda c: c.search("--n-sequences", "0"), 2, "n_sequences", True),
    ("short seq-len", lambda c: c.search("--seq-len", "1"), 2, "seq_len", True),
    ("negative generations", lambda c: c.search("--generations", "-1"), 2, "generations", True),
    ("zero offspring", lambda c: c.search("--offspring", "0"), 2, "offspring", True),
    ("unknown baseline", lambda c: c.search("--baselines", "bogus"), 2, "unknown baselines", True),
    (
        "zero eval windows",
        lambda c: c.search("--eval-windows", "0"),
        2,
        "evaluation.windows",
        True,
    ),
    ("allowed out of range", lambda c: c.search("--allowed", "9-12"), 2, "outside 0..5", True),
    ("reversed drop range", lambda c: c.search("--drop-range", "5,3"), 2, "drop_range", True),
    (
        "yaml string int",
        lambda c: c.yaml('num_drop: "two"\n'),
        2,
        "(space.num_drop): expected int",
        True,
    ),
    ("yaml float int", lambda c: c.yaml("num_drop: 2.5\n"), 2, "got 2.5 (a float)", True),
    (
        "yaml float generations",
        lambda c: c.yaml("num_drop: 2\ngenerations: 2.7\n"),
        2,
        "(strategy.loop.generations): expected int",
        True,
    ),
    (
        "yaml string list",
        lambda c: c.yaml("num_drop: 2\nbaselines: shortgpt\n"),
        2,
        "(baselines): expected list of str, got the string 'shortgpt'",
        True,
    ),
    ("yaml bool as int", lambda c: c.yaml("num_drop: true\n"), 2, "(space.num_drop)", True),
    ("yaml syntax", lambda c: c.yaml("num_drop: [1, 2\n"), 2, "bad YAML", True),
    ("yaml unknown key", lambda c: c.yaml("generashuns: 3\n"), 2, "generashuns", True),
    (
        "yaml not a mapping",
        lambda c: ["search", "--config", str(c.file("l.yaml", "- 1\n")), "--out", str(c.out)],
        2,
        "mapping",
        True,
    ),
    (
        "missing config file",
        lambda c: ["search", "--config", "/no/c.yaml", "--out", str(c.out)],
        2,
        "config file not found",
        True,
    ),
    ("deep metric", _deep_metric, 2, "nested too deeply", True),
    (
        "truncated level database",
        _damaged_leveldb,
        2,
        "00003.safetensors): 00003.safetensors is truncated",
        True,
    ),
    (
        "run exists",
        lambda c: search_args(c.run_model, c.text, c.run),
        2,
        "already holds a run",
        False,
    ),
    (
        "resume, other config",
        lambda c: c.resume("--seed", "5"),
        2,
        "config differs in seed",
        False,
    ),
    (
        "resume, checkpoint not JSON",
        lambda c: _mutated(c, _write("checkpoint.json", "{x"), "x") and c.resume(),
        2,
        "checkpoint.json): not valid JSON",
        False,
    ),
    (
        "resume, checkpoint schema",
        lambda c: _mutated(c, _write("checkpoint.json", "[1]"), "x") and c.resume(),
        2,
        'expected {"strategy"',
        False,
    ),
    (
        "resume, checkpoint inner schema",
        lambda c: (
            _mutated(c, _write("checkpoint.json", '{"strategy": {"x": 1}}'), "x") and c.resume()
        ),
        2,
        "does not fit this strategy",
        False,
    ),
    (
        "resume, config not JSON",
        lambda c: _mutated(c, _write("config.json", "{"), "x") and c.resume(),
        2,
        "config.json): not valid JSON",
        False,
    ),
    (
        "eval, no results",
        lambda c: _eval_run(c, _rm("results.json")),
        2,
        "results.json is missing; finish it with",
        False,
    ),
    ("eval, no model", lambda c: _eval_run(c, _rm("model")), 2, "model/ is missing", False),
    (
        "eval, truncated weights",
        lambda c: _eval_run(c, lambda r: _truncate(r / "model" / "model.safetensors")),
        2,
        "model.safetensors has 100 bytes",
        False,
    ),
    (
        "eval, no tokenizer",
        lambda c: _eval_run(c, _rm("model/tokenizer.json")),
        2,
        "tokenizer.json is missing",
        False,
    ),
    (
        "eval, empty drops file",
        lambda c: _eval_run(c, _write("model/evosearch_drops.json", "")),
        2,
        "evosearch_drops.json): not valid JSON",
        False,
    ),
    (
        "eval, sublayer run without its drops file",
        _sublayer_run_without_drops,
        2,
        "evosearch_drops.json is missing",
        False,
    ),
    (
        "eval, results not JSON",
        lambda c: _eval_run(c, _write("results.json", "{")),
        2,
        "results.json): not valid JSON",
        False,
    ),
    (
        "eval, truncated plain model",
        lambda c: (
            _truncate(c.model / "model.safetensors")
            or ["eval", str(c.model), "--ppl", str(c.text)]
        ),
        2,
        "model.safetensors is truncated",
        False,
    ),
    (
        "eval, text shorter than a window",
        lambda c: ["eval", str(c.run), "--ppl", str(c.file("s.txt", "short")), "--seq-len", "16"],
        2,
        "fewer than one window of 16",
        False,
    ),
    (
        "eval, negative limit",
        lambda c: [
            "eval",
            str(c.run),
            "--tasks",
            "piqa",
            "--data-dir",
            str(c.tmp),
            "--limit",
            "-1",
        ],
        2,
        "--limit",
        False,
    ),
    ("eval, nothing to do", lambda c: ["eval", str(c.run)], 2, "--ppl and/or --tasks", False),
    ("export, other budget", _other_budget_genome, 2, "is not a genome of", False),
    (
        "export, incomplete run",
        lambda c: _mutated(
            c, _rm("results.json"), "export", "--genome", "0", "--out", str(c.tmp / "e")
        ),
        2,
        "incomplete run",
        False,
    ),
    (
        "report, incomplete run",
        lambda c: _mutated(c, _rm("results.json"), "report"),
        2,
        "results.json is missing",
        False,
    ),
    (
        "report, no such run",
        lambda c: ["report", str(c.tmp / "nope")],
        2,
        "not a run directory",
        False,
    ),
]


def make_base(root: Path) -> tuple[Path, Path, Path]:
    """A tiny model with a real tokenizer, calibration text, and one finished run in ``root``."""
    model = root / "tiny"
    build_model("llama", n_layers=6, max_position_embeddings=256).save_pretrained(model)
    hf_tokenizer().save_pretrained(model)
    text = root / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    run = root / "run"
    assert main(search_args(model, text, run)) == 0
    return model, text, run


def make_ctx(base: tuple[Path, Path, Path], tmp: Path) -> Ctx:
    """A probe's own copies of the base model and run, in ``tmp``."""
    model, text, run = base
    shutil.copytree(run, tmp / "run")
    shutil.copytree(model, tmp / "tiny")
    return Ctx(tmp / "tiny", text, tmp / "run", tmp, model)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path, Path]:
    return make_base(tmp_path_factory.mktemp("reliability"))


def test_table_has_forty_probes():
    assert len(PROBES) >= 40


@pytest.mark.parametrize(
    ("make", "code", "fragment", "fresh"),
    [p[1:] for p in PROBES],
    ids=[p[0] for p in PROBES],
)
def test_bad_input_is_one_line(base, tmp_path, capsys, request, make, code, fragment, fresh):
    ctx = make_ctx(base, tmp_path)
    argv = make(ctx)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("evosearch: warning:")]
    assert len(lines) == 1 and lines[0].startswith("evosearch: error:"), err
    if log := os.environ.get("EVOSEARCH_PROBE_LOG"):  # the table in experiments/reliability
        with open(log, "a") as fh:
            probe = request.node.callspec.id
            fh.write(json.dumps({"probe": probe, "code": code, "message": lines[0]}) + "\n")
    assert fragment in lines[0]
    if fresh:
        assert not ctx.out.exists(), "a failed search left a run directory behind"


def test_seed_metrics_keep_commas_inside_calls():
    from evosearch.cli import _top_level_csv
    from evosearch.errors import UserError
    from evosearch.metric_search import MetricSearchConfig

    metrics = _top_level_csv("wanda,add(W,X),mul(abs(W), X)")
    assert metrics == ["wanda", "add(W,X)", "mul(abs(W), X)"]
    assert MetricSearchConfig(seed_metrics=metrics).seed_metrics == tuple(metrics)
    with pytest.raises(UserError, match=r"\(population\): expected int"):
        MetricSearchConfig(population=2.5)


def test_overlapping_windows_warn_in_one_line(base, tmp_path, capsys):
    model, _, _ = base
    short = tmp_path / "short.txt"
    short.write_text("a few words of text " * 15)  # 300 tokens for 50 x 16 requested
    argv = search_args(model, short, tmp_path / "run", "--generations", "0")
    argv[argv.index("--n-sequences") + 1] = "50"
    assert main(argv) == 0
    warning = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warning == [
        f"evosearch: warning: {short} has 300 tokens, fewer than the 50 x 16 requested: the "
        "random windows overlap (calibration repeats tokens); give more text or fewer "
        "--n-sequences"
    ]


def test_overwrite_replaces_a_run_and_resume_accepts_a_relative_path(base, tmp_path, monkeypatch):
    model, text, run = base
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    monkeypatch.chdir(text.parent)
    # the same data file, named relatively: resume accepts it
    assert main(search_args(model, Path(text.name), copy, "--resume")) == 0
    assert main(search_args(model, text, copy, "--seed", "3", "--overwrite")) == 0
    assert json.loads((copy / "config.json").read_text())["seed"] == 3


def test_bad_fitness_values_are_named(llama):
    from conftest import token_data

    from evosearch.engine import Evaluator
    from evosearch.errors import UserError
    from evosearch.evaluation import Batch
    from evosearch.genome import Genome
    from search_spaces import LayerDropSpace

    data = token_data(2, 8)
    batch = Batch((0, 1), data.input_ids)
    space = LayerDropSpace(4, num_drop=1)
    genome = Genome((1, 0, 0, 0))

    class Bad:
        name = "mine"

        def __init__(self, result):
            self.result = result

        def __call__(self, candidate, batch):
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    for result, fragment in [
        (None, "got None"),
        ("0.5", "the string '0.5'"),
        (KeyError("logits"), "KeyError"),
    ]:
        ev = Evaluator(llama, space, Bad(result), None, prefix_reuse=False)
        with pytest.raises(UserError, match="fitness mine") as info:
            ev.outcome(genome, batch)
        assert fragment in str(info.value)


def test_environment_failures_are_retried_on_resume_candidate_faults_are_not(llama, tmp_path):
    """A stage whose every candidate ran out of memory stops the search; after the repair,
    --resume evaluates them again, but not the genome whose own value was NaN."""
    from conftest import token_data

    from evosearch.engine import Evaluator, search
    from evosearch.errors import UserError
    from evosearch.forward import compute_dense_cache
    from evosearch.genome import Genome
    from evosearch.rundir import RunDir
    from evosearch.strategies import EvoPress, EvoPressConfig, Stage
    from fitness import KLDivergence
    from search_spaces import LayerDropSpace

    data = token_data(8, 8)
    dense = compute_dense_cache(llama, data.input_ids)
    space = LayerDropSpace(4, num_drop=1)
    config = EvoPressConfig(
        generations=2, offspring=3, initial_population=2, stages=(Stage(tokens=16, survivors=1),)
    )
    nan = "0100"

    class Flaky(KLDivergence):
        broken = True

        def __call__(self, candidate, batch):
            if candidate.genome.key() == nan:
                return math.nan  # the candidate's own fault
            if self.broken:
                raise RuntimeError("CUDA out of memory")  # the environment's
            return super().__call__(candidate, batch)

    fitness = Flaky()
    fitness.prepare(llama, data.input_ids, dense)

    def run_once(resume: bool):
        run = RunDir(tmp_path / "run")
        run.start({"a": 1}, resume=resume)
        strategy = EvoPress(
            space, config=config, rng=np.random.default_rng(0), initial=(Genome.from_key(nan),)
        )
        evaluator = Evaluator(llama, space, fitness, dense)
        search(strategy, evaluator, data, run=run, resume=resume, progress=None)
        return run.evaluations()

    with pytest.raises(UserError, match="every candidate failed"):
        run_once(False)
    first = RunDir(tmp_path / "run").evaluations()
    assert {r["failure"] for r in first} == {"environment", "candidate"}
    fitness.broken = False
    log = run_once(True)
    retried = log[len(first) : len(first) + len(first) - 1]
    assert sorted(r["genome"] for r in retried) == sorted(
        r["genome"] for r in first if r["failure"] == "environment"
    )
    assert all(r.get("value") is not None for r in retried)
    batch = next(r["batch"] for r in first if r["genome"] == nan)
    keys = [(r["genome"], r["batch"]) for r in log]
    assert keys.count((nan, batch)) == 1  # final: not evaluated again on that batch
