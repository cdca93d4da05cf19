"""Offline zero-shot multiple-choice evaluation, as lm-evaluation-harness 0.4 defines it.

Five tasks are read from local files laid out like ``/work/shared/data`` (see each folder's
``PROVENANCE.md``)::

    arc/ARC-Easy-Test.jsonl, arc/ARC-Challenge-Test.jsonl      (official ARC JSONL)
    piqa/valid.jsonl + piqa/valid-labels.lst                   (official PIQA validation)
    hellaswag/hellaswag_val_full.txt.bz2                       (llama.cpp 6-line format)
    winogrande/dev.jsonl                                       (sentence/option1/option2/answer)

Every item becomes one ``(context, continuation)`` request per choice. A choice is scored by
the summed log-likelihood of its continuation tokens given the context, tokenised the way
lm-eval's ``HFLM._encode_pair`` does for causal models: trailing spaces of the context move
into the continuation, ``context + continuation`` is encoded as a whole, and the continuation
tokens are what follows the first ``len(encode(context))`` tokens. No BOS token is added
(lm-eval's default for causal models). ``acc`` takes the argmax of the log-likelihoods,
``acc_norm`` the argmax of log-likelihood divided by the choice's length in characters (lm-eval
``len(choice)``, the continuation without its leading ``" "`` target delimiter).

Known differences from lm-eval:

* HellaSwag: the local file holds ``activity_label + ": " + ctx`` already cleaned by its
  extractor, not ``ctx_a`` / ``ctx_b``. lm-eval builds ``ctx_a + " " + ctx_b.capitalize()``;
  here ``ctx_b`` is not capitalised (it cannot be separated from ``ctx_a``), and the extractor
  removed ``[title] `` / ``[title].`` markers slightly differently. lm-eval's ``preprocess`` is
  still applied to the query and the endings. Scores are close to, not identical with, lm-eval.
* WinoGrande: lm-eval reports only ``acc``. The continuation is shared by both choices, so the
  ``acc_norm`` reported here always equals ``acc``.

Example:
    >>> results = evaluate_tasks(model, tokenizer, ["arc_easy", "piqa"], "/data", limit=100)
    >>> results["piqa"]["acc_norm"]
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from evosearch.arch import head_logits
from evosearch.forward import model_device

__all__ = [
    "TASKS",
    "MultipleChoiceItem",
    "check_tasks",
    "encode_pair",
    "evaluate_items",
    "evaluate_tasks",
    "format_table",
    "load_task",
    "loglikelihoods",
]


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: choice ``i`` is the request ``(contexts[i], continuations[i])``.

    Most tasks share one context across choices; WinoGrande's partial scoring has one context
    per choice and a shared continuation. Continuations carry lm-eval's ``" "`` delimiter.

    Attributes:
        contexts: the conditioning text of each choice.
        continuations: the scored text of each choice.
        gold: index of the correct choice.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations) or not self.contexts:
            raise ValueError("an item needs one context and one continuation per choice")
        if not 0 <= self.gold < len(self.contexts):
            raise ValueError(f"gold index {self.gold} out of range for {len(self.contexts)}")

    @classmethod
    def shared_context(
        cls, context: str, continuations: Sequence[str], gold: int
    ) -> MultipleChoiceItem:
        """An item whose choices all follow the same ``context``."""
        return cls((context,) * len(continuations), tuple(continuations), gold)

    @property
    def n_choices(self) -> int:
        return len(self.continuations)


# ---------------------------------------------------------------------------------------------
# Task loaders: each yields items in file order from a data directory.


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"data file not found: {path} (the data directory needs the layout described "
            "in evosearch.zero_shot)"
        )
    return path


def _jsonl(path: Path) -> Iterator[dict]:
    with _require(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _arc(file: str) -> Callable[[Path], Iterator[MultipleChoiceItem]]:
    """lm-eval ``arc_easy`` / ``arc_challenge``: test split, ``"Question: {stem}\\nAnswer:"``."""

    def load(data_dir: Path) -> Iterator[MultipleChoiceItem]:
        for doc in _jsonl(data_dir / "arc" / file):
            choices = doc["question"]["choices"]
            labels = [c["label"] for c in choices]
            yield MultipleChoiceItem.shared_context(
                f"Question: {doc['question']['stem']}\nAnswer:",
                [" " + c["text"] for c in choices],
                labels.index(doc["answerKey"]),
            )

    return load


def _piqa(data_dir: Path) -> Iterator[MultipleChoiceItem]:
    """lm-eval ``piqa``: validation split, ``"Question: {goal}\\nAnswer:"``, ``[sol1, sol2]``."""
    labels = _require(data_dir / "piqa" / "valid-labels.lst")
    with labels.open(encoding="utf-8") as label_lines:
        for doc, label in zip(_jsonl(data_dir / "piqa" / "valid.jsonl"), label_lines):
            yield MultipleChoiceItem.shared_context(
                f"Question: {doc['goal']}\nAnswer:",
                [" " + doc["sol1"], " " + doc["sol2"]],
                int(label),
            )


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval ``hellaswag/utils.py:preprocess`` (brackets are WikiHow artefacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(data_dir: Path) -> Iterator[MultipleChoiceItem]:
    """lm-eval ``hellaswag`` from the llama.cpp format: 6 lines per item (query, label,
    4 endings); see the module docstring for how it differs."""
    path = _require(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = (line.rstrip("\n") for line in f)
        while block := list(islice(lines, 6)):
            if len(block) != 6:
                raise ValueError(f"{path}: truncated item (expected 6 lines, got {len(block)})")
            yield MultipleChoiceItem.shared_context(
                _hellaswag_preprocess(block[0]),
                [" " + _hellaswag_preprocess(e) for e in block[2:]],
                int(block[1]),
            )


def _winogrande(data_dir: Path) -> Iterator[MultipleChoiceItem]:
    """lm-eval ``winogrande`` (partial evaluation): the sentence up to ``_`` with each option
    is a context; the rest of the sentence after ``_`` is the shared continuation."""
    for doc in _jsonl(data_dir / "winogrande" / "dev.jsonl"):
        sentence = doc["sentence"]
        blank = sentence.index("_")
        continuation = " " + sentence[blank + 1 :].strip()
        contexts = tuple(sentence[:blank] + doc[k] for k in ("option1", "option2"))
        yield MultipleChoiceItem(contexts, (continuation,) * 2, {"1": 0, "2": 1}[doc["answer"]])


TASKS: dict[str, Callable[[Path], Iterator[MultipleChoiceItem]]] = {
    "arc_easy": _arc("ARC-Easy-Test.jsonl"),
    "arc_challenge": _arc("ARC-Challenge-Test.jsonl"),
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
}
"""Task name -> loader of its items from a data directory."""


def check_tasks(tasks: Iterable[str], *, extra: Iterable[str] = ()) -> list[str]:
    """The task names as a list, or a ``ValueError`` naming the valid ones.

    Args:
        tasks: names to check against :data:`TASKS`.
        extra: other valid names the caller handles itself (accepted and listed).

    Raises:
        ValueError: a name is in neither :data:`TASKS` nor ``extra``, or there is none.
    """
    tasks, extra = list(tasks), list(extra)
    unknown = [t for t in tasks if t not in TASKS and t not in extra]
    if unknown or not tasks:
        what = f"unknown task(s) {', '.join(map(repr, unknown))}" if unknown else "no tasks"
        raise ValueError(f"{what}; valid tasks: {', '.join([*TASKS, *extra])}")
    return tasks


def load_task(
    task: str, data_dir: str | Path, limit: int | None = None
) -> list[MultipleChoiceItem]:
    """The first ``limit`` items (all when ``None``) of ``task`` from ``data_dir``.

    Raises:
        ValueError: unknown task or negative ``limit``.
        FileNotFoundError: the task's data file is missing.
    """
    (task,) = check_tasks([task])
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return list(islice(TASKS[task](Path(data_dir)), limit))


# ---------------------------------------------------------------------------------------------
# Scoring.


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval's ``HFLM._encode_pair`` (causal) makes them.

    Trailing whitespace of ``context`` moves to the start of ``continuation``; the continuation
    ids are the tail of ``encode(context + continuation)`` after ``len(encode(context))`` ids, so
    a tokenizer that merges across the boundary is handled as lm-eval handles it. An empty
    context becomes the BOS (else EOS) token, lm-eval's ``prefix_token_id``.
    """
    if context == "":
        bos = getattr(tokenizer, "bos_token_id", None)
        return [bos if bos is not None else tokenizer.eos_token_id], _encode(
            tokenizer, continuation
        )
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def _max_length(model: nn.Module) -> int:
    """lm-eval's ``HFLM.max_length`` without a tokenizer hint: the model's context size."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return 2048


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[float]:
    """Summed log-probability of each continuation given its context.

    Requests are sorted longest first and run ``batch_size`` at a time, right-padded, on the
    model's device; the LM head is applied only at the positions that predict continuation
    tokens. Inputs longer than ``max_length`` (default: the model's context size) lose tokens
    on the left, as in lm-eval.

    Args:
        model: a causal LM (``base_model`` gives final hidden states, plus an output embedding).
        tokenizer: callable as ``tokenizer(text, add_special_tokens=False)["input_ids"]``.
        requests: ``(context, continuation)`` pairs.
        batch_size: sequences per forward.
        max_length: the longest input fed to the model.

    Returns:
        One log-likelihood per request, in request order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or _max_length(model)
    device = model_device(model)
    encoded = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        cont = cont[-max_length:]
        # lm-eval: the model reads all but the last token, truncated on the left.
        inp = (ctx + cont)[-(max_length + 1) :][:-1]
        encoded.append((inp, cont))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(encoded[rows[0]][0])
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        b_idx, t_idx, targets, owner = [], [], [], []
        for r, i in enumerate(rows):
            inp, cont = encoded[i]
            input_ids[r, : len(inp)] = torch.tensor(inp)
            mask[r, : len(inp)] = 1
            # Position t predicts token t + 1: the continuation is predicted by the last
            # len(cont) positions of the input.
            first = len(inp) - len(cont)
            b_idx += [r] * len(cont)
            t_idx += range(first, len(inp))
            targets += cont
            owner += [r] * len(cont)
        hidden = model.base_model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).last_hidden_state  # (B, T, d)
        picked = hidden[torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)]
        logprobs = torch.log_softmax(head_logits(model, picked).float(), dim=-1)  # (N, V)
        token_lp = logprobs.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
        sums.index_add_(0, torch.tensor(owner, device=device), token_lp.double())
        for r, i in enumerate(rows):
            out[i] = sums[r].item()
    return out


def _choice_length(continuation: str) -> int:
    """lm-eval's ``len(choice)``: the continuation without its ``" "`` target delimiter."""
    return max(len(continuation[1:] if continuation.startswith(" ") else continuation), 1)


def evaluate_items(
    model: nn.Module,
    tokenizer,
    items: Sequence[MultipleChoiceItem],
    *,
    batch_size: int = 16,
) -> dict[str, float | int]:
    """``acc``, ``acc_norm`` and ``n`` of ``model`` on ``items`` (see the module docstring).

    Ties go to the first choice, as with ``numpy.argmax`` in lm-eval.
    """
    requests = [pair for item in items for pair in zip(item.contexts, item.continuations)]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
    correct = correct_norm = pos = 0
    for item in items:
        ll = lls[pos : pos + item.n_choices]
        pos += item.n_choices
        norm = [x / _choice_length(c) for x, c in zip(ll, item.continuations)]
        correct += max(range(len(ll)), key=ll.__getitem__) == item.gold
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == item.gold
    n = len(items)
    return {"acc": correct / n if n else 0.0, "acc_norm": correct_norm / n if n else 0.0, "n": n}


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Iterable[str],
    data_dir: str | Path,
    limit: int | None = None,
    *,
    batch_size: int = 16,
) -> dict[str, dict[str, float | int]]:
    """Zero-shot ``acc`` / ``acc_norm`` of ``model`` on each task.

    All tasks' data are read before the first forward, so a missing file fails fast.

    Args:
        model: a causal LM in eval mode; inputs go to the device of its parameters.
        tokenizer: the model's tokenizer.
        tasks: names from :data:`TASKS`.
        data_dir: a directory laid out like ``/work/shared/data``.
        limit: score only the first ``limit`` items of each task.
        batch_size: sequences per forward.

    Returns:
        ``{task: {"acc": float, "acc_norm": float, "n": int}}`` in the order of ``tasks``.

    Raises:
        ValueError: an unknown task (the message lists the valid ones).
        FileNotFoundError: a task's data file is missing from ``data_dir``.
    """
    items = {task: load_task(task, data_dir, limit) for task in check_tasks(tasks)}
    return {
        task: evaluate_items(model, tokenizer, task_items, batch_size=batch_size)
        for task, task_items in items.items()
    }


def format_table(results: dict[str, dict[str, float | int]]) -> str:
    """A markdown table of :func:`evaluate_tasks` results (or lm-eval's: any metric columns,
    standard errors left out)."""
    metrics: list[str] = []
    for r in results.values():
        metrics += [k for k in r if k != "n" and not k.endswith("_stderr") and k not in metrics]
    lines = [
        "| task | n | " + " | ".join(metrics) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in metrics) + " |",
    ]
    for task, r in results.items():
        cells = [f"{r[m]:.4f}" if m in r else "" for m in metrics]
        lines.append(f"| {task} | {r.get('n', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
