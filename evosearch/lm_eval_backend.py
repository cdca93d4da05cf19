"""Zero-shot evaluation through lm-evaluation-harness 0.4, and the choice between it and the
offline :mod:`evosearch.zero_shot` path.

lm-eval is an optional dependency (``pip install "evosearch[eval]"``) and is imported only
inside :func:`evaluate_lm_eval`. The model handed to it is the one evosearch already loaded
(``HFLM(pretrained=model)``), so compressed models that need evosearch's loader (sublayer drops,
width shrinking) are scored as loaded. lm-eval reads its datasets from the hub; with no hub, the
offline path scores the same tasks from local files with the same ``acc`` / ``acc_norm``
definitions.

Backend rule (``choose_backend``): ``lm-eval`` and ``local`` are honoured as asked (``lm-eval``
fails with the reason when it cannot run); ``auto`` picks ``local`` when a data directory is
given or lm-eval is not installed or the hub is unreachable, else ``lm-eval``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "BACKENDS",
    "HUB_HOST",
    "OFFLINE_LM_EVAL_TASKS",
    "choose_backend",
    "evaluate_lm_eval",
    "evaluate_wikitext_offline",
    "hub_reachable",
    "lm_eval_installed",
    "wikitext_pages",
]

BACKENDS = ("auto", "local", "lm-eval")
# Tasks the offline path runs through lm-eval's own task definition, over local files.
OFFLINE_LM_EVAL_TASKS = ("wikitext",)
WIKITEXT_FILE = "wikitext-2-raw/wiki.test.raw"
_TITLE = re.compile(r"^ = [^=].* = \s*$")
HUB_HOST = "huggingface.co"


def lm_eval_installed() -> bool:
    """Whether ``lm_eval`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("lm_eval") is not None


def hub_reachable(host: str = HUB_HOST, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds.

    ``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1`` count as unreachable without trying.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def choose_backend(
    requested: str,
    *,
    data_dir: str | None,
    installed: bool,
    reachable: bool | None = None,
) -> tuple[str, str]:
    """Pick the evaluation backend.

    Args:
        requested: ``auto``, ``local`` or ``lm-eval``.
        data_dir: the local data directory, if the user gave one.
        installed: whether lm-eval is installed.
        reachable: whether the hub answers; ``None`` means "not checked yet" and is then
            checked with :func:`hub_reachable` only when the answer matters.

    Returns:
        ``(backend, reason)`` with backend ``local`` or ``lm-eval`` and a one-line reason.

    Raises:
        ValueError: an unknown backend, or ``lm-eval`` asked for but not installed, or
            ``local`` asked for without a data directory.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "lm-eval":
        if not installed:
            raise ValueError(
                "--backend lm-eval needs lm-eval: pip install 'evosearch[eval]' "
                "(or use --backend local with --data-dir)"
            )
        return "lm-eval", "asked for"
    if requested == "local":
        if not data_dir:
            raise ValueError("--backend local needs --data-dir or EVOSEARCH_DATA_DIR")
        return "local", "asked for"
    if data_dir:
        return "local", "a data directory was given"
    if not installed:
        raise ValueError(
            "no evaluation backend: give --data-dir (or EVOSEARCH_DATA_DIR) for the offline "
            "tasks, or pip install 'evosearch[eval]' for lm-eval"
        )
    if reachable is None:
        reachable = hub_reachable()
    if not reachable:
        raise ValueError(
            f"{HUB_HOST} is unreachable, so lm-eval cannot fetch its datasets: give --data-dir "
            "(or EVOSEARCH_DATA_DIR) to run the tasks from local files"
        )
    return "lm-eval", "lm-eval installed and the hub reachable"


def _metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": ...}`` -> ``{"acc": 0.5, ...}``."""
    out = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if filt in ("none", "") and isinstance(value, (int, float)) and metric != "alias":
            out[metric] = float(value)
    return out


def evaluate_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    *,
    batch_size: int = 16,
    include_path: str | None = None,
) -> dict[str, dict[str, float | int]]:
    """Zero-shot scores of an already-loaded ``model`` on lm-eval ``tasks``.

    Args:
        model: a causal LM (any module with the ``PreTrainedModel`` interface lm-eval uses).
        tokenizer: the model's HF tokenizer.
        tasks: lm-eval task names (``arc_easy``, ``piqa``, ``hellaswag``, ``winogrande``,
            ``wikitext``...).
        limit: first ``limit`` documents of each task.
        batch_size: sequences per forward.
        include_path: a folder of extra lm-eval task YAMLs (e.g. tasks over local files).

    Returns:
        ``{task: {metric: value, ..., "n": documents scored}}``; metric names as lm-eval's
        without the filter suffix (``acc``, ``acc_norm``, ``word_perplexity``...).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else None
    out = simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, log_samples=False, task_manager=manager
    )
    scores: dict[str, dict[str, float | int]] = {}
    for task in tasks:
        metrics: dict[str, float | int] = dict(_metrics(out["results"].get(task, {})))
        n = out.get("n-samples", {}).get(task, {})
        metrics["n"] = int(n.get("effective", n.get("original", 0))) if n else 0
        scores[task] = metrics
    return scores


def wikitext_pages(path: str | Path) -> list[str]:
    """The articles of a raw WikiText file (``wiki.test.raw``), each as one string.

    A new article starts at every level-1 title line (`` = Title = ``); lines are kept as in
    the file, so an article is its title line and its paragraphs, as the pages of
    ``EleutherAI/wikitext_document_level`` (lm-eval's ``wikitext`` dataset) are made from the
    same file. Text before the first title (the file's leading blank line) is dropped.
    """
    pages: list[list[str]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if _TITLE.match(line):
                pages.append([])
            if pages:
                pages[-1].append(line)
    return ["".join(p) for p in pages]


def evaluate_wikitext_offline(
    model: nn.Module,
    tokenizer,
    data_dir: str | Path,
    limit: int | None = None,
    *,
    batch_size: int = 16,
) -> dict[str, float | int]:
    """lm-eval's ``wikitext`` task (rolling log-likelihood of each whole article;
    ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``) over the local
    ``<data_dir>/wikitext-2-raw/wiki.test.raw``, with no hub.

    lm-eval's own task definition runs (its detokenizer and metrics), with only its dataset
    replaced by the articles of the local file (:func:`wikitext_pages`) written to a temporary
    JSONL file.

    Raises:
        FileNotFoundError: the local file is missing.
        ValueError: lm-eval is not installed.
    """
    src = Path(data_dir) / WIKITEXT_FILE
    if not src.is_file():
        raise FileNotFoundError(f"wikitext needs {src} (the raw WikiText-2 test split)")
    if not lm_eval_installed():
        raise ValueError(
            "the wikitext task runs lm-eval's task definition: pip install 'evosearch[eval]' "
            "(or use --ppl <data-dir>/wikitext-2-raw/wiki.test.raw for token perplexity)"
        )
    import lm_eval

    include = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml"
    with tempfile.TemporaryDirectory(prefix="evosearch-wikitext-") as tmp:
        docs = Path(tmp) / "wikitext_test.jsonl"
        docs.write_text("".join(json.dumps({"page": p}) + "\n" for p in wikitext_pages(src)))
        (Path(tmp) / "wikitext_local.yaml").write_text(
            f"task: wikitext_local\ninclude: {include}\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
            "training_split: null\nvalidation_split: null\ntest_split: test\n"
        )
        scores = evaluate_lm_eval(
            model, tokenizer, ["wikitext_local"], limit, batch_size=batch_size, include_path=tmp
        )
    return scores["wikitext_local"]
