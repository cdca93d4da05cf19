"""The command line on a tiny local model: a full search, resume, eval and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import search_args
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from evosearch.cli import main


class CharTokenizer:
    """A tokenizer needing no files: one token per character (mod vocab)."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}

    def save_pretrained(self, path):
        pass


@pytest.fixture
def tiny_model_dir(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    path = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    # The tiny model ships without a tokenizer: hand the CLI one that needs no files.
    monkeypatch.setattr(
        "transformers.AutoTokenizer.from_pretrained", lambda *a, **k: CharTokenizer()
    )
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path, text


_search_args = search_args


def test_search_writes_run_and_loadable_model(tiny_model_dir, tmp_path):
    model, text = tiny_model_dir
    out = tmp_path / "run"
    assert main(_search_args(model, text, out, "--baselines", "shortgpt,angular,last")) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["best"]["dropped_blocks"]) == 2
    assert len(results["history"]) == 4  # generation 0 + 3
    assert {"evopress", "shortgpt", "angular", "last"} <= set(results["calibration_fitness"])
    assert all(r["tokens"] in (16, 64) for r in results["evaluations"])
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    assert saved.config.num_hidden_layers == 4
    assert len(saved.model.layers) == 4
    for name in ("config.json", "checkpoint.json", "evaluations.jsonl", "best_genome.json"):
        assert (out / name).is_file()


def test_polish_and_held_out_generated_text_end_the_log_with_the_verdict(
    tiny_model_dir, tmp_path, capsys
):
    model, text = tiny_model_dir
    out = tmp_path / "run"
    extra = ["--baselines", "angular,last", "--locality", "0.5", "--polish", "2"]
    extra += ["--polish-moves", "local", "--eval-ppl", "generated", "--eval-seq-len", "16"]
    extra += ["--max-seconds", "3600"]  # far more than it needs: changes nothing
    extra += ["--polish-stages", "16:3,64:1"]
    assert main(_search_args(model, text, out, *extra, "--eval-windows", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["strategy"]["loop"]["polish_moves"] == "local"
    assert results["config"]["strategy"]["loop"]["max_seconds"] == 3600
    polish_stages = results["config"]["strategy"]["loop"]["polish_stages"]
    assert polish_stages == [dict(tokens=16, survivors=3), dict(tokens=64, survivors=1)]
    assert len([h for h in results["history"] if not h.get("polish")]) == 4
    assert any(h.get("polish") for h in results["history"])
    assert set(results["perplexity"]) == {"dense", "evopress", "angular", "last"}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("held-out perplexity on text generated with seed 1: evopress ")
    assert "dense" in last


def test_resume_of_finished_run_evaluates_nothing_new(tiny_model_dir, tmp_path, capsys):
    model, text = tiny_model_dir
    out = tmp_path / "run"
    assert main(_search_args(model, text, out)) == 0
    first = json.loads((out / "results.json").read_text())
    lines = (out / "evaluations.jsonl").read_text().splitlines()
    assert main(_search_args(model, text, out, "--resume")) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["best"] == first["best"]
    assert (out / "evaluations.jsonl").read_text().splitlines() == lines


def test_eval_reports_perplexity(tiny_model_dir, tmp_path, capsys):
    model, text = tiny_model_dir
    out = tmp_path / "ppl.json"
    argv = ["eval", str(model), "--ppl", str(text), "--seq-len", "32", "--windows", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())["perplexity"][str(text)]
    assert result["windows"] == 3
    assert 1.0 < result["ppl"] < 10_000


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a, m, t: a.__setitem__(a.index("--model") + 1, "/no/such/model"), "not found"),
        (lambda a, m, t: a.__setitem__(a.index("--drop") + 1, "6"), "cannot drop 6"),
        (lambda a, m, t: a.__setitem__(a.index("--data") + 1, "/no/such.txt"), "/no/such.txt"),
        (lambda a, m, t: a.extend(["--max-seconds", "0"]), "max_seconds must be > 0"),
        (lambda a, m, t: a.extend(["--polish-stages", "64:2"]), "polish_stages must end"),
    ],
)
def test_one_line_errors(tiny_model_dir, tmp_path, capsys, mutate, message):
    model, text = tiny_model_dir
    argv = _search_args(model, text, tmp_path / "run")
    mutate(argv, model, text)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evosearch: error:") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_bad_yaml_and_config_mismatch(tiny_model_dir, tmp_path, capsys):
    model, text = tiny_model_dir
    bad = tmp_path / "bad.yaml"
    bad.write_text("generations: [1, 2\n")
    assert main(["search", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad YAML" in capsys.readouterr().err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("generashuns: 3\n")
    assert main(["search", "--config", str(unknown), "--out", str(tmp_path / "y")]) == 2
    assert "generashuns" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(_search_args(model, text, out)) == 0
    capsys.readouterr()
    argv = _search_args(model, text, out, "--resume")
    argv[argv.index("--seed") if "--seed" in argv else len(argv) :] = []
    assert main([*argv, "--seed", "5"]) == 2
    assert "seed" in capsys.readouterr().err


def test_warm_start_puts_heuristics_into_generation_zero(tiny_model_dir, tmp_path, capsys):
    model, text = tiny_model_dir
    out = tmp_path / "run"
    argv = _search_args(model, text, out, "--warm-start", "angular,last", "--baselines", "last")
    assert main(argv) == 0
    # a heuristic that is both warm start and baseline is computed once
    assert capsys.readouterr().out.count("baseline last:") == 1
    results = json.loads((out / "results.json").read_text())
    gen0 = {r["genome"] for r in results["evaluations"] if r["generation"] == 0}
    last = "".join(
        "1" if i in results["baselines"]["last"]["dropped_blocks"] else "0" for i in range(6)
    )
    assert last in gen0
    assert results["config"]["warm_start"] == ["angular", "last"]


def test_zero_initial_population_needs_a_start_genome():
    from evosearch.pipeline import SearchConfig

    with pytest.raises(ValueError, match="warm_start or initial_population >= 1"):
        SearchConfig.from_dict(dict(num_drop=2, initial_population=0))
    warm = SearchConfig.from_dict(dict(num_drop=2, initial_population=0, warm_start=("angular",)))
    assert warm.evopress_config().initial_population == 0
    assert SearchConfig.from_dict(dict(space="width", width_target=0.5, initial_population=0))


def test_a_baseline_beating_the_search_on_all_tokens_is_a_warning():
    from evosearch.config import SearchConfig
    from evosearch.jobs.report import selection_warning as _selection_warning

    config = SearchConfig.from_dict(
        dict(num_drop=2, n_sequences=4, seq_len=16, stages=((16, 2), (32, 1)))
    )
    assert _selection_warning({"evopress": 1.0, "uniform": 1.2, "random": 1.5}, config) is None
    warning = _selection_warning({"evopress": 1.0, "uniform": 0.9, "random": 1.5}, config)
    assert warning.startswith("uniform (0.9000) beats the search's best (1.0000) on all 64")
    assert "32-token batches" in warning and "random" not in warning
    two = _selection_warning({"evopress": 1.0, "uniform": 0.9, "random": 0.8}, config)
    assert two.startswith("random (0.8000), uniform (0.9000) beat the search's best")


def test_the_held_out_verdict_says_beats_equals_or_worse_honestly():
    from evosearch.config import SearchConfig
    from evosearch.jobs.report import held_out_verdict

    config = SearchConfig.from_dict(dict(num_drop=2, n_sequences=4, seq_len=16))

    def verdict(ppl: dict, genomes: dict) -> str:
        table = {n: {"wiki.test.raw": v} for n, v in {**ppl, "dense": 20.0}.items()}
        results = {
            "perplexity": table,
            "baselines": {n: {"genome": g} for n, g in genomes.items()},
        }
        (line,) = held_out_verdict(results, config)
        return line

    genomes = {"evopress": "0011", "angular": "0110", "shortgpt": "1100"}
    line = verdict({"evopress": 70.0, "angular": 71.0, "shortgpt": 80.0}, genomes)
    assert line.startswith("held-out perplexity on wiki.test.raw: evopress 70.00 beats every")
    assert line.endswith("(angular 71.00, shortgpt 80.00; dense 20.00)")
    same = verdict(
        {"evopress": 71.0, "angular": 71.0, "shortgpt": 80.0}, genomes | {"angular": "0011"}
    )
    assert "evopress 71.00 only equals angular (the same genome), beats shortgpt" in same
    worse = verdict({"evopress": 75.0, "angular": 71.0, "shortgpt": 80.0}, genomes)
    assert "evopress 75.00 worse than angular (" in worse
    assert held_out_verdict({"perplexity": {}}, config) == []
