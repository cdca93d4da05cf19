"""Choosing between lm-eval and the offline zero-shot path, without any network: the hub check
is monkeypatched, lm-eval's evaluation is replaced by a recorder."""

from __future__ import annotations

import json
import math
import socket

import pytest
from conftest import build_model, hf_tokenizer
from helpers import shared_data

from evosearch import lm_eval_backend as backend
from evosearch.cli import main


@pytest.mark.parametrize(
    ("requested", "data_dir", "installed", "reachable", "expected"),
    [
        ("auto", "/data", True, True, "local"),  # a data directory wins
        ("auto", "/data", False, False, "local"),
        ("auto", None, True, True, "lm-eval"),
        ("local", "/data", True, True, "local"),
        ("lm-eval", "/data", True, False, "lm-eval"),  # asked for: honoured
    ],
)
def test_choose_backend(requested, data_dir, installed, reachable, expected):
    chosen, reason = backend.choose_backend(
        requested, data_dir=data_dir, installed=installed, reachable=reachable
    )
    assert chosen == expected and reason


@pytest.mark.parametrize(
    ("requested", "data_dir", "installed", "reachable", "message"),
    [
        ("auto", None, True, False, "unreachable"),
        ("auto", None, False, True, "--data-dir"),
        ("lm-eval", "/data", False, True, "evosearch[eval]"),
        ("local", None, True, True, "--data-dir"),
        ("hf", None, True, True, "backend must be"),
    ],
)
def test_choose_backend_errors(requested, data_dir, installed, reachable, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        backend.choose_backend(
            requested, data_dir=data_dir, installed=installed, reachable=reachable
        )


def test_reachability_checked_only_when_it_matters(monkeypatch):
    calls = []
    monkeypatch.setattr(backend, "hub_reachable", lambda: calls.append(1) or True)
    assert backend.choose_backend("auto", data_dir="/d", installed=True)[0] == "local"
    assert calls == []
    assert backend.choose_backend("auto", data_dir=None, installed=True)[0] == "lm-eval"
    assert calls == [1]


def test_hub_reachable_offline_env_and_refused_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("no network in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert backend.hub_reachable() is False

    opened = []

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def connect(*args, **kwargs):
        opened.append(args)
        return FakeSocket()

    monkeypatch.setattr(socket, "create_connection", connect)
    assert backend.hub_reachable() is True and opened
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    opened.clear()
    assert backend.hub_reachable() is False and not opened  # no connection attempted


def test_lm_eval_metric_names():
    raw = {
        "alias": "piqa",
        "acc,none": 0.6,
        "acc_stderr,none": 0.01,
        "acc_norm,none": 0.7,
        "exact_match,strict-match": 0.1,
    }
    assert backend._metrics(raw) == {"acc": 0.6, "acc_stderr": 0.01, "acc_norm": 0.7}


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny"
    build_model("llama", max_position_embeddings=1024).save_pretrained(path)
    hf_tokenizer().save_pretrained(path)
    return path


def test_cli_auto_uses_lm_eval_on_the_loaded_model(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("EVOSEARCH_DATA_DIR", raising=False)
    monkeypatch.setattr(backend, "lm_eval_installed", lambda: True)
    monkeypatch.setattr(backend, "hub_reachable", lambda: True)
    seen = {}

    def fake(model, tokenizer, tasks, limit, *, batch_size, include_path):
        seen.update(model=model, tasks=list(tasks), limit=limit, batch_size=batch_size)
        return {t: {"acc": 0.5, "acc_norm": 0.25, "n": 2} for t in tasks} | {
            "wikitext": {"word_perplexity": 30.0, "n": 2}
        }

    monkeypatch.setattr(backend, "evaluate_lm_eval", fake)
    out = tmp_path / "eval.json"
    argv = [
        "eval",
        str(model_dir),
        "--tasks",
        "piqa,wikitext",
        "--limit",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert type(seen["model"]).__name__ == "LlamaForCausalLM"  # the model evosearch loaded
    assert seen["tasks"] == ["piqa", "wikitext"] and seen["limit"] == 2
    assert seen["batch_size"] == 4
    printed = capsys.readouterr().out
    assert "backend: lm-eval" in printed and "word_perplexity" in printed
    saved = json.loads(out.read_text())["zero_shot"]
    assert saved["backend"] == "lm-eval" and saved["tasks"]["piqa"]["acc"] == 0.5
    assert "| piqa | 2 |" in out.with_suffix(".md").read_text()


def test_cli_data_dir_selects_local_even_when_lm_eval_could_run(model_dir, monkeypatch, capsys):
    data = shared_data("piqa").parent
    monkeypatch.setattr(backend, "lm_eval_installed", lambda: True)
    monkeypatch.setattr(backend, "hub_reachable", lambda: True)
    monkeypatch.setattr(backend, "evaluate_lm_eval", lambda *a, **k: pytest.fail("lm-eval ran"))
    argv = ["eval", str(model_dir), "--tasks", "piqa", "--data-dir", str(data), "--limit", "2"]
    assert main(argv) == 0
    assert "backend: local (a data directory was given)" in capsys.readouterr().out


def test_cli_backend_lm_eval_not_installed_is_one_line_error(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(backend, "lm_eval_installed", lambda: False)
    argv = ["eval", str(model_dir), "--tasks", "piqa", "--backend", "lm-eval"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "evosearch[eval]" in err and len(err.strip().splitlines()) == 1


def test_hflm_wraps_a_loaded_model():
    """lm-eval (when installed) accepts a model object: scores one request offline."""
    pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval not installed")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=build_model("llama", max_position_embeddings=256),
        tokenizer=hf_tokenizer(),
        batch_size=2,
    )
    request = Instance("loglikelihood", {}, ("the fox", " jumps"), 0)
    ((logprob, greedy),) = lm.loglikelihood([request], disable_tqdm=True)
    assert logprob < 0 and isinstance(greedy, bool)


def test_unknown_offline_task_lists_the_valid_ones(model_dir, tmp_path, capsys):
    argv = ["eval", str(model_dir), "--tasks", "piqa,wikitext2", "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'wikitext2'" in err and "valid tasks" in err and "wikitext" in err


def test_wikitext_pages_are_the_articles_of_the_raw_file():
    src = shared_data("wikitext-2-raw")
    pages = backend.wikitext_pages(src / "wiki.test.raw")
    text = (src / "wiki.test.raw").read_text(encoding="utf-8")
    assert pages[0].startswith(" = Robert Boulter = \n")
    assert all(p.startswith(" = ") and not p.startswith(" = = ") for p in pages)
    assert "".join(pages) == text[text.index(" = Robert Boulter") :]  # nothing lost
    assert len(pages) == sum(1 for line in text.splitlines() if backend._TITLE.match(line))


def test_offline_wikitext_runs_lm_eval_task_on_local_articles(model_dir, tmp_path, monkeypatch):
    """``--tasks wikitext`` with a data directory: lm-eval's own wikitext task (its detokenizer
    and metrics) over the local file's articles, with the hub off."""
    pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(
        " \n = First = \n \n the fox @-@ jumps , over the dog . \n \n"
        " = = Part = = \n \n it 's late . \n = Second = \n \n hello world . \n"
    )
    out = tmp_path / "scores.json"
    argv = ["eval", str(model_dir), "--tasks", "wikitext", "--data-dir", str(data),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    scores = json.loads(out.read_text())["zero_shot"]["tasks"]["wikitext"]
    assert scores["n"] == 2  # two articles
    assert scores["word_perplexity"] > scores["byte_perplexity"] > 1
    assert scores["bits_per_byte"] == pytest.approx(math.log2(scores["byte_perplexity"]))
    (data / "wikitext-2-raw" / "wiki.test.raw").unlink()
    assert main(argv) == 2  # a missing file is a one-line error


def test_lm_eval_end_to_end_offline_matches_local_scoring(tmp_path, monkeypatch):
    """The real lm-eval path (a task YAML over a local JSONL, no hub) on a sublayer-dropped
    model loaded through evosearch's loader; its acc / acc_norm equal the offline scorer's."""
    pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval not installed")
    from evosearch.models import load_model
    from evosearch.zero_shot import MultipleChoiceItem, evaluate_items
    from search_spaces import LayerDropSpace

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [
        {"question": "the quick brown", "choices": ["fox", "dog", "cat"], "label": 0},
        {"question": "over the lazy", "choices": ["dog", "elephant"], "label": 0},
        {"question": "it jumps", "choices": ["over", "under the"], "label": 1},
        {"question": "a b c", "choices": ["d e", "x", "yz"], "label": 2},
        {"question": "hello", "choices": ["world", "there"], "label": 1},
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{label}}"\n'
        'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
    )
    space = LayerDropSpace(4, num_drop=1, sublayers=True)
    saved = tmp_path / "dropped"
    space.save(
        build_model("llama", max_position_embeddings=256),
        hf_tokenizer(),
        space.from_dropped(attention=[1], mlp=[2]),
        str(saved),
    )
    model, tokenizer = load_model(str(saved))
    assert (saved / "evosearch_drops.json").is_file()  # only evosearch's loader applies it
    assert len(model.model.layers) == 4

    scores = backend.evaluate_lm_eval(
        model, tokenizer, ["tiny_mc"], batch_size=2, include_path=str(tmp_path)
    )["tiny_mc"]
    items = [
        MultipleChoiceItem(
            contexts=(d["question"],) * len(d["choices"]),
            continuations=tuple(" " + c for c in d["choices"]),
            gold=d["label"],
        )
        for d in docs
    ]
    local = evaluate_items(model, tokenizer, items, batch_size=2)
    assert scores["n"] == local["n"] == 5
    assert scores["acc"] == pytest.approx(local["acc"])
    assert scores["acc_norm"] == pytest.approx(local["acc_norm"])
