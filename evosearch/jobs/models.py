"""Jobs on saved models: export one genome of a run, measure a shrunk model, post-compression
fine-tuning, and held-out perplexity."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from evosearch.arch import get_blocks
from evosearch.config import SearchConfig
from evosearch.data import DataSpec, TokenData, load_token_data
from evosearch.errors import UserError
from evosearch.evaluation import Batch, Candidate
from evosearch.genome import Genome
from evosearch.models import load_model, save_complete
from evosearch.problem import build_space, space_entry
from evosearch.rundir import check_finished, known_genomes
from evosearch.validate import resolve_device

__all__ = [
    "evaluate_perplexity",
    "export_genome",
    "export_latency",
    "export_stats",
    "load_and_generate",
    "finetune",
    "finetune_run",
    "load_eval_data",
]


def export_genome(run_dir: str | Path, genome_key: str, out_dir: str | Path) -> Path:
    """Materialise one genome of a finished run (e.g. a Pareto point) as a saved model."""
    run_dir = Path(run_dir)
    config = SearchConfig.from_dict(check_finished(run_dir, model=False))
    if genome_key not in known_genomes(run_dir):  # e.g. a genome of another budget or run
        raise UserError(
            "unknown genome",
            "--genome",
            f"{genome_key!r} is not a genome of {run_dir}; take one from its "
            "pareto_front.json or results.json",
        )
    model, tokenizer = load_model(config.model, device=resolve_device(config.device))
    input_ids = None
    if space_entry(config).needs_data:  # a level database is keyed by the calibration data
        input_ids = load_token_data(config.data_spec(), tokenizer, model).input_ids
    space = build_space(config, model, input_ids)
    genome = Genome.from_key(genome_key)
    if len(genome.levels) != space.spec.n_units:
        raise ValueError(f"genome {genome_key!r} does not fit this run's space")
    save_complete(lambda d: space.save(model, tokenizer, genome, d), out_dir)
    return Path(out_dir)


def export_stats(
    dense_model, shrunk_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Parameters and measured forward throughput (tokens/s, this process's threads) of the
    dense model and of the physically shrunk model saved in ``shrunk_dir``."""
    from evosearch.shrink import n_params, throughput

    small, _ = load_model(str(shrunk_dir), device=next(dense_model.parameters()).device)
    stats = {
        "dense_params": n_params(dense_model),
        "params": n_params(small),
        "dense_tokens_per_s": round(throughput(dense_model), 1),
        "tokens_per_s": round(throughput(small), 1),
        "threads": torch.get_num_threads(),
    }
    stats["speedup"] = round(stats["tokens_per_s"] / stats["dense_tokens_per_s"], 3)
    log(
        f"shrunk model: {stats['params'] / 1e6:.1f}M parameters (dense "
        f"{stats['dense_params'] / 1e6:.1f}M), {stats['tokens_per_s']:.0f} tokens/s vs "
        f"{stats['dense_tokens_per_s']:.0f} dense ({stats['speedup']:.2f}x, "
        f"{stats['threads']} threads)"
    )
    return stats


PROMPT = "The history of the city begins in"


def load_and_generate(load: Callable[[], Any], tokenizer, new_tokens: int = 32) -> dict[str, Any]:
    """Seconds to load a model with ``load()`` and to greedily generate ``new_tokens`` tokens
    after a fixed prompt (on the CPU, with this process's threads), and the text generated."""
    t0 = time.perf_counter()
    model = load()
    t1 = time.perf_counter()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return {
        "load_seconds": round(t1 - t0, 2),
        "generate_seconds": round(time.perf_counter() - t1, 2),
        "new_tokens": int(out.shape[1] - ids.shape[1]),
        "text": tokenizer.decode(out[0, ids.shape[1] :]),
    }


def export_latency(
    model_id: str, export_dir: str | Path, tokenizer, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Load-and-generate seconds (:func:`load_and_generate`) of an exported model folder (a
    ``.gguf`` file in it, or a transformers checkpoint such as compressed-tensors) against
    the dense model ``model_id``, both loaded in float32 on the CPU. transformers dequantizes
    GGUF on load and compressed-tensors on the first forward, so these are its loading
    paths, not low-bit kernels."""
    from transformers import AutoModelForCausalLM

    folder = Path(export_dir)
    ggufs = sorted(folder.glob("*.gguf"))
    extra = {"gguf_file": ggufs[0].name} if ggufs else {}
    export = load_and_generate(
        lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra),
        tokenizer,
    )
    dense = load_and_generate(lambda: load_model(model_id)[0], tokenizer)
    stats = {**export, **{f"dense_{k}": v for k, v in dense.items() if k != "new_tokens"}}
    log(
        f"export: load {stats['load_seconds']} s + generate {stats['generate_seconds']} s "
        f"({stats['new_tokens']} tokens), dense {stats['dense_load_seconds']} s + "
        f"{stats['dense_generate_seconds']} s"
    )
    return stats


def _check_finetunable(model_dir: str | Path, tokens: int) -> None:
    if (Path(model_dir) / "sparsity_profile.json").is_file():  # written by sparse saves
        raise UserError(
            "finetune would move the zeros of a sparse model",
            model_dir,
            "use `evosearch heal RUN`, which keeps every pruned weight at zero",
        )
    if (Path(model_dir) / "quant_profile.json").is_file():  # written by quantized exports
        raise UserError(
            "finetune would move a quantized model's weights off their grid",
            model_dir,
            "use `evosearch heal RUN`, which keeps every layer on its grid",
        )
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")


def finetune(
    model_dir: str | Path,
    tokens: int,
    out_dir: str | Path,
    *,
    data: DataSpec,
    teacher: str | None = None,
    lr: float = 1e-4,
    micro_batch: int = 4,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Post-compression training: full fine-tuning of every block parameter of a saved
    (e.g. width-shrunk) model for ``tokens`` tokens of ``data``, optionally distilled from the
    ``teacher`` model (KL to its logits); embeddings and LM head stay frozen. A shrunk model
    has no weights for removed heads or channels, so its structure is kept by construction.
    The result is saved to ``out_dir`` in the same format as the input.
    """
    from evosearch.arch import arch_for
    from evosearch.models import DROP_FILE
    from evosearch.shrink import WIDTH_FILE, save_shrunk
    from evosearch.training import TrainConfig, train_

    _check_finetunable(model_dir, tokens)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model, tokenizer = load_model(str(model_dir), device=dev)
    n = -(-tokens // data.seq_len)
    spec = dataclasses.replace(data, n_sequences=n)
    ids = load_token_data(spec, tokenizer, model).input_ids
    teacher_fn = None
    if teacher is not None:
        dense, _ = load_model(teacher, device=dev)

        def teacher_fn(input_ids, rows):
            return dense(input_ids=input_ids[rows].to(dev), use_cache=False).logits

    blocks = get_blocks(model)
    params = [p for p in blocks.parameters() if p.dtype.is_floating_point]
    if not params:
        raise ValueError(f"{model_dir} has no block parameters to train")
    losses = train_(
        model,
        params,
        ids,
        TrainConfig(mode="full", lr=lr, micro_batch=micro_batch, distill=teacher is not None),
        teacher=teacher_fn,
        progress=None,
    )
    out = Path(out_dir)
    if (Path(model_dir) / WIDTH_FILE).is_file():
        save_shrunk(model, tokenizer, out)
    elif (Path(model_dir) / DROP_FILE).is_file():
        raise ValueError("finetune supports width-shrunk and plain models, not sublayer drops")
    else:
        arch_for(model)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    k = max(1, len(losses) // 10)
    result = {
        "model": str(model_dir),
        "out": str(out),
        "tokens": int(ids.numel()),
        "steps": len(losses),
        "distill_from": teacher,
        "lr": lr,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "seconds": round(time.perf_counter() - t0, 1),
        "data": data.source,
    }
    (out / "finetune.json").write_text(json.dumps(result, indent=1) + "\n")
    log(
        f"finetune: {result['tokens']} tokens in {result['steps']} steps, loss "
        f"{result['loss_first']:.4f} -> {result['loss_last']:.4f} ({result['seconds']}s); "
        f"saved {out}"
    )
    return result


def finetune_run(
    run_dir: str | Path,
    tokens: int,
    *,
    out_dir: str | Path | None = None,
    distill: bool = False,
    lr: float = 1e-4,
    micro_batch: int = 4,
    data: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`finetune` the best model of a search run on new random windows of its
    calibration source, distilled from the run's dense model with ``distill``; saved to
    ``out_dir`` (default ``RUN/finetuned``). ``data`` changes fields of that
    :class:`DataSpec`, e.g. ``{"source": "c4.jsonl"}`` to train on other text."""
    run_dir = Path(run_dir)
    config = SearchConfig.from_dict(check_finished(run_dir))
    spec = dataclasses.replace(config.data_spec(), seed=config.seed + 1)
    fields = sorted(f.name for f in dataclasses.fields(DataSpec))
    unknown = sorted(set(data or {}) - set(fields))
    if unknown:
        raise ValueError(f"unknown data fields {unknown}; choose from {fields}")
    data = dataclasses.replace(spec, **(data or {}))
    return finetune(
        run_dir / "model",
        tokens,
        out_dir or run_dir / "finetuned",
        data=data,
        teacher=config.model if distill else None,
        lr=lr,
        micro_batch=micro_batch,
        device=config.device,
        log=log,
    )


def load_eval_data(
    source: str,
    tokenizer,
    seq_len: int,
    windows: int | None,
    *,
    model=None,
    seed: int = 1,
) -> TokenData:
    """Non-overlapping ``seq_len`` windows from the start of ``source`` (all, or ``windows``).

    ``source="generated"`` is ``windows`` (default 8) sequences the dense ``model`` samples
    with ``seed``: held-out text that needs no files, when ``seed`` differs from the
    calibration text's."""
    if source == "generated":
        spec = DataSpec(source=source, n_sequences=windows or 8, seq_len=seq_len, seed=seed)
        return load_token_data(spec, tokenizer, model)
    spec = DataSpec(
        source=source, n_sequences=windows, seq_len=seq_len, contiguous=True, split="test"
    )
    return load_token_data(spec, tokenizer)


def evaluate_perplexity(model, data: TokenData, *, micro_batch: int = 1) -> float:
    """Perplexity of ``model`` over all windows of ``data`` (each window scored on its own)."""
    from evosearch import registry

    candidate = Candidate(model, Genome((0,)))
    batch = Batch(tuple(range(data.n_sequences)), data.input_ids)
    return registry.fitness("ppl", micro_batch=micro_batch)(candidate, batch)
