"""Zero-shot evaluation offline: task loaders against the local files, the log-likelihood
against a direct computation from logits, padding-independent batching, and ``evosearch eval
--tasks``."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, hf_tokenizer
from helpers import SHARED_DATA, shared_data

from evosearch import zero_shot
from evosearch.cli import main
from evosearch.zero_shot import (
    TASKS,
    MultipleChoiceItem,
    encode_pair,
    evaluate_items,
    evaluate_tasks,
    load_task,
    loglikelihoods,
)

torch.set_num_threads(1)

LIMIT = 4


@pytest.fixture(scope="module", autouse=True)
def _needs_shared_data():
    """Every test here reads the real task files: skipped on a clone without ../shared."""
    for task in ("arc", "piqa", "hellaswag", "winogrande"):
        shared_data(task)


DATA = SHARED_DATA


@pytest.fixture(scope="module")
def model():
    # A context long enough for the ARC / HellaSwag prompts in characters.
    return build_model("llama", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tokenizer():
    return hf_tokenizer()


def _lines(path: Path, n: int) -> list[str]:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def _expected_gold(task: str, n: int) -> tuple[list[int], list[int]]:
    """Gold indices and choice counts of the first ``n`` items, read from the files here."""
    if task in ("arc_easy", "arc_challenge"):
        name = "Easy" if task == "arc_easy" else "Challenge"
        docs = [json.loads(x) for x in _lines(DATA / "arc" / f"ARC-{name}-Test.jsonl", n)]
        labels = [[c["label"] for c in d["question"]["choices"]] for d in docs]
        return [lab.index(d["answerKey"]) for lab, d in zip(labels, docs)], list(map(len, labels))
    if task == "piqa":
        return [int(x) for x in _lines(DATA / "piqa" / "valid-labels.lst", n)], [2] * n
    if task == "hellaswag":
        lines = _lines(DATA / "hellaswag" / "hellaswag_val_full.txt.bz2", 6 * n)
        return [int(lines[6 * i + 1]) for i in range(n)], [4] * n
    if task == "winogrande":
        return [int(x) - 1 for x in _lines(DATA / "winogrande" / "dev-labels.lst", n)], [2] * n
    raise AssertionError(task)


@pytest.mark.parametrize("task", list(TASKS))
def test_loader_choices_and_gold_match_the_files(task):
    items = load_task(task, DATA, limit=LIMIT)
    gold, n_choices = _expected_gold(task, LIMIT)
    assert len(items) == LIMIT
    assert [it.gold for it in items] == gold
    assert [it.n_choices for it in items] == n_choices
    for it in items:
        assert all(c.startswith(" ") for c in it.continuations)


def test_prompts_follow_lm_eval():
    arc = json.loads(_lines(DATA / "arc" / "ARC-Easy-Test.jsonl", 1)[0])
    item = load_task("arc_easy", DATA, 1)[0]
    assert item.contexts[0] == f"Question: {arc['question']['stem']}\nAnswer:"
    assert item.continuations == tuple(" " + c["text"] for c in arc["question"]["choices"])

    piqa = json.loads(_lines(DATA / "piqa" / "valid.jsonl", 1)[0])
    item = load_task("piqa", DATA, 1)[0]
    assert set(item.contexts) == {f"Question: {piqa['goal']}\nAnswer:"}
    assert item.continuations == (" " + piqa["sol1"], " " + piqa["sol2"])

    wino = json.loads(_lines(DATA / "winogrande" / "dev.jsonl", 1)[0])
    item = load_task("winogrande", DATA, 1)[0]
    before, after = wino["sentence"].split("_")
    assert item.contexts == (before + wino["option1"], before + wino["option2"])
    assert item.continuations == (" " + after.strip(),) * 2

    lines = _lines(DATA / "hellaswag" / "hellaswag_val_full.txt.bz2", 6)
    item = load_task("hellaswag", DATA, 1)[0]
    assert set(item.contexts) == {lines[0].strip()}
    assert item.continuations == tuple(" " + e.strip() for e in lines[2:6])


def test_hellaswag_preprocessing_is_lm_evals():
    raw = "Making a cake: [header] How to bake [title] Mix the  flour. [step] Stir it."
    assert (
        zero_shot._hellaswag_preprocess(raw)
        == "Making a cake: How to bake. Mix the flour. Stir it."
    )


def test_evaluate_tasks_on_every_task(model, tokenizer):
    results = evaluate_tasks(model, tokenizer, list(TASKS), DATA, limit=3)
    assert list(results) == list(TASKS)
    for r in results.values():
        assert r["n"] == 3
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
    # The WinoGrande continuation is shared by both choices: normalising changes nothing.
    assert results["winogrande"]["acc_norm"] == results["winogrande"]["acc"]


def test_loglikelihood_equals_direct_computation_from_logits(model, tokenizer):
    item = load_task("piqa", DATA, 1)[0]
    context, continuation = item.contexts[1], item.continuations[1]
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    # Token k of the continuation is predicted at position len(ctx) + k - 1.
    expected = sum(logprobs[len(ctx_ids) + k - 1, tok].item() for k, tok in enumerate(cont_ids))
    (got,) = loglikelihoods(model, tokenizer, [(context, continuation)])
    assert got == pytest.approx(expected, abs=1e-4)


def test_batching_and_padding_do_not_change_loglikelihoods(model, tokenizer):
    items = load_task("arc_easy", DATA, 2) + load_task("winogrande", DATA, 2)
    requests = [pair for it in items for pair in zip(it.contexts, it.continuations)]
    one = loglikelihoods(model, tokenizer, requests, batch_size=1)
    many = loglikelihoods(model, tokenizer, requests, batch_size=len(requests))
    assert many == pytest.approx(one, abs=1e-4)


def test_acc_norm_divides_by_choice_length(monkeypatch):
    item = MultipleChoiceItem.shared_context("Q:", [" ab", " abcdefgh"], gold=1)
    # Choice 0 is likelier in total, choice 1 per character (-4/2 < -6/8).
    monkeypatch.setattr(zero_shot, "loglikelihoods", lambda *a, **k: [-4.0, -6.0])
    assert evaluate_items(None, None, [item]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer: ", "yes")
    assert ctx == tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    assert cont == tokenizer(" yes", add_special_tokens=False)["input_ids"]


def test_unknown_task_and_missing_file(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="valid tasks: arc_easy, arc_challenge, piqa"):
        evaluate_tasks(model, tokenizer, ["piqa", "mmlu"], DATA)
    with pytest.raises(FileNotFoundError, match="piqa/valid"):
        evaluate_tasks(model, tokenizer, ["piqa"], tmp_path)


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny"
    build_model("llama", max_position_embeddings=1024).save_pretrained(path)
    hf_tokenizer().save_pretrained(path)
    return path


def test_cli_eval_tasks(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", str(model_dir), "--tasks", "piqa,winogrande", "--data-dir", str(DATA)]
    assert main([*argv, "--limit", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| task | n | acc | acc_norm |" in printed and "| piqa | 3 |" in printed
    tasks = json.loads(out.read_text())["zero_shot"]["tasks"]
    assert list(tasks) == ["piqa", "winogrande"]
    assert all(t["n"] == 3 and 0.0 <= t["acc"] <= 1.0 for t in tasks.values())


def test_cli_eval_errors(model_dir, tmp_path, capsys, monkeypatch):
    assert main(["eval", str(model_dir), "--tasks", "piqa,nope", "--data-dir", str(DATA)]) == 2
    assert "valid tasks" in capsys.readouterr().err
    monkeypatch.delenv("EVOSEARCH_DATA_DIR", raising=False)
    monkeypatch.setattr("evosearch.lm_eval_backend.hub_reachable", lambda *a, **k: False)
    assert main(["eval", str(model_dir), "--tasks", "piqa"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["eval", str(model_dir)]) == 2
    assert "--ppl and/or --tasks" in capsys.readouterr().err
