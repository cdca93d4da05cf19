"""Structure-preserving healing: a little distillation from the dense model after compression.

A compressed model loses accuracy that a few hundred thousand tokens of training win back
(e.g. LLM-Streamline, Chen et al. 2024; ShortGPT, Men et al. 2024, Sec. 5). Healing here
distils from the dense model (per-token KL to its logits, or plain next-token loss without a
teacher) with full or LoRA updates of the block parameters, and keeps the structure the search
chose exactly, whatever the space:

* dropped blocks are physically absent and dropped sublayers are parameter-free stand-ins
  (:class:`~evosearch.surgery.ZeroAttention` / ``ZeroOutput``): nothing to train there;
* every weight that is exactly zero before healing (unstructured or N:M sparsity) stays zero:
  full updates re-apply the mask after every optimiser step, LoRA updates are masked
  elementwise, so merging them adds zeros there;
* a width-pruned model is physically smaller and stays so (its shapes are checked).
* a quantized model (integer grids, exported as compressed-tensors) stays on its grid:
  quantization-aware training with the scales, zero points and bit-widths fixed, the forward
  fake-quantizing the weights (straight-through), the codes re-projected at the end; LoRA
  updates are merged and projected the same way. GGUF exports are refused (their types have no
  fixed grid to train on): heal the model before writing GGUF.

The training is :func:`evosearch.training.structured` + :func:`~evosearch.training.train_`, the
code training-aware selection runs on candidates.

:func:`read_structure` records all of this before training and :func:`check_structure` proves
it afterwards; a difference raises, so a healed model is never saved with another structure.

Example:
    >>> heal_run("runs/d7", 262_144)          # runs/d7/model -> runs/d7/healed
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evosearch.arch import arch_for, get_blocks
from evosearch.data import HUB_ALIASES, DataError, DataSpec, load_text, load_token_data
from evosearch.errors import atomic_dir, read_json
from evosearch.quant import Grid
from evosearch.surgery import ZeroAttention, ZeroOutput, apply_replacements
from evosearch.training import (
    TrainConfig,
    block_linears,
    quant_grids,
    structured,
    token_loss,
    train_,
    zero_masks,
)
from evosearch.validate import resolve_device

__all__ = [
    "HEAL_DIR",
    "HEAL_FILE",
    "EvalWindows",
    "HealConfig",
    "Structure",
    "check_structure",
    "heal_",
    "heal_run",
    "heal_saved_model",
    "healing_data",
    "held_out_loss",
    "read_structure",
    "run_settings",
    "teacher_from",
]

HEAL_DIR = "healed"  # RUN/healed: the emitted model; RUN/model stays the unhealed one
HEAL_FILE = "healing.json"
_MODES = ("full", "lora")
_DEFAULT_LR = {"full": 5e-5, "lora": 5e-4}
# metadata of the input model that stays true of the healed one (structure is checked)
_CARRIED_FILES = ("evosearch_drops.json", "sparsity_profile.json", "quant_profile.json")


@dataclass(frozen=True, kw_only=True)
class HealConfig:
    """How a compressed model is healed.

    Args:
        tokens: training tokens (rounded up to whole ``seq_len`` sequences).
        mode: ``full`` (every block parameter; sparse weights re-masked after each step) or
            ``lora`` (rank-``rank`` adapters on every block linear, merged at the end).
        lr: peak AdamW learning rate (default 5e-5 full, 5e-4 LoRA); linear warm-up over the
            first ``warmup`` share of the steps, then linear decay to zero.
        rank, alpha: LoRA rank and scale numerator.
        seq_len: tokens per training sequence; micro_batch: sequences per step.
        held_out: sequences kept aside (never trained on) to measure the loss before and
            after healing.
        autocast: bfloat16 autocast for the forward passes (2-3x faster on CPUs with bf16
            instructions and on GPUs; parameters, optimiser and loss stay float32).
        seed: seeds the training windows and the LoRA initialisation.
    """

    tokens: int
    mode: str = "full"
    lr: float | None = None
    rank: int = 16
    alpha: float = 32.0
    seq_len: int = 1024
    micro_batch: int = 1
    warmup: float = 0.05
    held_out: int = 4
    autocast: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.seq_len < 2 or self.micro_batch < 1 or self.held_out < 1:
            raise ValueError("seq_len must be >= 2, micro_batch and held_out >= 1")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must lie in [0, 1), got {self.warmup}")

    @property
    def sequences(self) -> int:
        """Training sequences: ``tokens`` rounded up to whole sequences."""
        return -(-self.tokens // self.seq_len)

    def train_config(self) -> TrainConfig:
        """The :class:`~evosearch.training.TrainConfig` of one healing."""
        return TrainConfig(
            mode=self.mode,
            rank=self.rank,
            alpha=self.alpha,
            lr=self.lr or _DEFAULT_LR[self.mode],
            micro_batch=self.micro_batch,
            seed=self.seed,
        )


# -- structure -------------------------------------------------------------------------------


@dataclass
class Structure:
    """What healing must not change, read from the model itself.

    Attributes:
        n_blocks: decoder blocks present.
        stand_ins: paths of dropped sublayers (parameter-free zero stand-ins).
        shapes: every block parameter's shape (width pruning lives here).
        masks: block linear weight path -> bool mask of its non-zero entries, for every
            linear with at least one exact zero (sparsity lives here).
        linear_weights: weights of all block linears together.
        grids: quantized linear path -> its grid (bit-widths live here).
        off_grid: quantized linears whose weight is not exactly on its grid.
    """

    n_blocks: int
    stand_ins: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    masks: dict[str, torch.Tensor]
    linear_weights: int
    grids: dict[str, Grid] = dataclasses.field(default_factory=dict)
    off_grid: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """JSON-ready: blocks, dropped sublayers, parameters and the measured zero profile."""
        zeros = {k: int((~m).sum()) for k, m in self.masks.items()}
        return {
            "blocks": self.n_blocks,
            "dropped_sublayers": list(self.stand_ins),
            "block_parameters": sum(math.prod(s) for s in self.shapes.values()),
            "zeros": sum(zeros.values()),
            "sparsity": sum(zeros.values()) / max(1, self.linear_weights),
            "layer_zeros": zeros,
            "quantized_layers": len(self.grids),
            "layer_bits": {k: g.bits for k, g in self.grids.items()},
        }


def _stand_ins(model: nn.Module) -> tuple[str, ...]:
    """Paths of the dropped sublayers' zero stand-ins."""
    prefix = arch_for(model).blocks
    return tuple(
        f"{prefix}.{name}"
        for name, m in get_blocks(model).named_modules()
        if isinstance(m, (ZeroAttention, ZeroOutput))
    )


@torch.no_grad()
def read_structure(model: nn.Module) -> Structure:
    """The :class:`Structure` of ``model`` as it is now."""
    blocks = get_blocks(model)
    prefix = arch_for(model).blocks
    stand_ins = _stand_ins(model)
    linears = block_linears(model)
    grids = quant_grids(model)
    return Structure(
        n_blocks=len(blocks),
        stand_ins=stand_ins,
        shapes={f"{prefix}.{k}": tuple(p.shape) for k, p in blocks.named_parameters()},
        masks=zero_masks(model),
        linear_weights=sum(m.weight.numel() for m in linears.values()),
        grids=grids,
        off_grid=tuple(k for k, g in grids.items() if not g.contains(linears[k].weight)),
    )


def check_structure(before: Structure, after: Structure) -> list[str]:
    """The differences between two structures (empty: the same); zero masks must be equal."""
    diffs = []
    if before.n_blocks != after.n_blocks:
        diffs.append(f"blocks {before.n_blocks} -> {after.n_blocks}")
    if before.stand_ins != after.stand_ins:
        diffs.append(f"dropped sublayers {before.stand_ins} -> {after.stand_ins}")
    if before.shapes != after.shapes:
        changed = sorted(set(before.shapes.items()) ^ set(after.shapes.items()))
        diffs.append(f"parameter shapes changed: {changed[:4]}")
    if before.masks.keys() != after.masks.keys():
        diffs.append(f"layers with zeros: {len(before.masks)} -> {len(after.masks)}")
    for name, mask in before.masks.items():
        other = after.masks.get(name)
        if other is not None and not torch.equal(mask, other):
            diffs.append(f"{name}: zero pattern changed ({int((~mask).sum())} zeros before, "
                         f"{int((~other).sum())} after)")  # fmt: skip
    if before.grids.keys() != after.grids.keys():
        diffs.append(f"quantized layers: {len(before.grids)} -> {len(after.grids)}")
    diffs += [f"{k}: grid changed" for k, g in before.grids.items()
              if k in after.grids and not g.same(after.grids[k])]  # fmt: skip
    if after.off_grid:
        diffs.append(f"weights off their grid: {list(after.off_grid[:4])}")
    return diffs


# -- training ------------------------------------------------------------------------------


Teacher = Callable[[torch.Tensor, list[int]], torch.Tensor]


def teacher_from(dense: nn.Module) -> Teacher:
    """``fn(input_ids, rows) -> logits`` of the dense model, the form :func:`heal_` takes."""
    device = next(dense.parameters()).device

    def teacher(input_ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return dense(input_ids=input_ids[rows].to(device), use_cache=False).logits

    return teacher


@torch.no_grad()
def held_out_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    teacher: Teacher | None,
    *,
    micro_batch: int = 1,
    autocast: bool = False,
) -> float:
    """Mean per-token loss (KL to the teacher, or cross-entropy) over ``input_ids`` ``(N, T)``,
    the loss healing minimises, on sequences it did not train on."""
    device = next(model.parameters()).device
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
    total = 0.0
    for s in range(0, input_ids.shape[0], micro_batch):
        rows = list(range(s, min(s + micro_batch, input_ids.shape[0])))
        ids = input_ids[rows].to(device)
        with amp:
            logits = model(input_ids=ids, use_cache=False).logits
            target = None if teacher is None else teacher(input_ids, rows)
        total += token_loss(logits, ids, target).item() * len(rows)
    return total / input_ids.shape[0]


def _schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` of the steps, then linear decay to zero at the end."""
    n_warm = int(warmup * steps)

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / (n_warm + 1)
        return max(0.0, (steps - step) / max(1, steps - n_warm))

    return factor


def heal_(
    model: nn.Module,
    train_ids: torch.Tensor,
    config: HealConfig,
    *,
    teacher: Teacher | None = None,
    held_out: torch.Tensor | None = None,
    keep: Structure | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Heal ``model`` in place on ``train_ids`` ``(N, T)`` (one pass, ``config.micro_batch``
    sequences per step), keeping its structure.

    Args:
        teacher: ``fn(input_ids, rows) -> logits`` of the dense model (see
            :func:`teacher_from`); ``None`` trains on next-token cross-entropy.
        held_out: ``(M, T)`` sequences to score before and after (never trained on).
        keep: the structure to keep (default: the model's own, read now).

    Returns:
        ``losses`` (every step), ``tokens``, ``steps``, ``lr``, ``mode``, the held-out loss
        ``before``/``after`` (when ``held_out``), and ``structure`` (its summary).

    Raises:
        RuntimeError: if the structure changed (cannot happen unless a module misbehaves).
    """
    keep = keep or read_structure(model)
    tc = config.train_config()
    score = dict(micro_batch=config.micro_batch, autocast=config.autocast)
    out: dict[str, Any] = {"mode": config.mode, "lr": tc.lr, "tokens": int(train_ids.numel())}
    if held_out is not None:
        out["held_out_before"] = held_out_loss(model, held_out, teacher, **score)
    steps = -(-train_ids.shape[0] // tc.micro_batch)
    blocks = range(len(get_blocks(model)))
    plan = structured(model, blocks, tc, full_params="blocks", masks=keep.masks, grids=keep.grids)
    with apply_replacements(model, plan.replacements):
        out["losses"] = train_(
            model, plan.params, train_ids, tc, teacher=teacher, after_step=plan.after_step,
            lr_factor=_schedule(steps, config.warmup), autocast=config.autocast,
            progress=progress,
        )  # fmt: skip
    plan.finish_()  # LoRA merged, quantized weights projected onto their grids
    if diffs := check_structure(keep, read_structure(model)):
        raise RuntimeError(f"healing changed the model's structure: {'; '.join(diffs)}")
    if held_out is not None:
        out["held_out_after"] = held_out_loss(model, held_out, teacher, **score)
    out["steps"] = len(out["losses"])
    out["structure"] = keep.summary()
    return out


# -- data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalWindows:
    """Evaluation windows healing must not train on: the first ``windows`` (``None``: all)
    non-overlapping ``seq_len`` windows of ``source``, as ``evosearch eval`` reads them."""

    source: str
    windows: int | None
    seq_len: int

    @property
    def tokens(self) -> int | None:
        """Tokens at the start of the source that evaluation reads (``None``: all)."""
        return None if self.windows is None else self.windows * self.seq_len


def _same_source(a: str, b: str) -> bool:
    pa, pb = Path(os.path.expanduser(a)), Path(os.path.expanduser(b))
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _corpus(source: str) -> str:
    """A coarse corpus name: the dataset of a hub alias, ``wikitext`` / ``c4`` for files whose
    path names them, else the source itself."""
    if source in HUB_ALIASES:
        return HUB_ALIASES[source][0].rpartition("/")[2]
    lowered = source.lower()
    for corpus in ("wikitext", "wiki", "c4"):
        if corpus in lowered:
            return "wikitext" if corpus == "wiki" else corpus
    return source


def healing_data(
    spec: DataSpec,
    tokenizer,
    n_train: int,
    n_held: int,
    *,
    avoid: Sequence[EvalWindows] = (),
    model: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Training and held-out sequences of ``spec.seq_len`` tokens from ``spec.source`` that
    never overlap the evaluation windows ``avoid``.

    From a source that is also evaluated, training uses only the tokens after the evaluated
    prefix; the last ``n_held`` windows of what remains are held out and training windows are
    drawn at random (``spec.seed``) before them. ``generated`` text is sampled from ``model``
    (the dense one).

    Returns:
        ``(train_ids (n_train, T), held_ids (n_held, T), info)``; ``info["notes"]`` says when
        the healing text is (from the same corpus as) evaluation data.

    Raises:
        DataError: if every token of the source is evaluation data, or too few remain.
    """
    T = spec.seq_len
    if spec.source == "generated":
        ids = load_token_data(
            dataclasses.replace(spec, n_sequences=n_train + n_held), tokenizer, model
        ).input_ids
        return ids[:n_train], ids[n_train:], {"source": "generated", "notes": []}
    skip, notes = 0, []
    for ev in avoid:
        if _same_source(ev.source, spec.source):
            if ev.tokens is None:
                raise DataError(f"all of {spec.source} is evaluation data; heal on other text")
            skip = max(skip, ev.tokens)
            notes.append(
                f"healing text {spec.source} is also evaluation data: training and held-out "
                f"windows start after its first {ev.windows} evaluation windows of {ev.seq_len} "
                f"tokens (token {skip})"
            )
        elif _corpus(ev.source) == _corpus(spec.source):
            notes.append(
                f"healing text {spec.source} comes from the same corpus ({_corpus(ev.source)}) "
                f"as evaluation data {ev.source} (another file or split: no shared windows)"
            )
    stream = torch.tensor(tokenizer(load_text(spec), add_special_tokens=False)["input_ids"])
    region = stream[skip:]
    train_end = region.numel() - n_held * T
    if train_end < T:
        raise DataError(
            f"{spec.source}: {region.numel()} tokens after the evaluated prefix ({skip}), too "
            f"few for {n_held} held-out windows of {T} and training"
        )
    held = region[train_end : train_end + n_held * T].view(n_held, T)
    starts = np.random.default_rng(spec.seed).integers(0, train_end - T + 1, size=n_train)
    train = torch.stack([region[s : s + T] for s in starts.tolist()])
    info = {
        "source": spec.source,
        "source_tokens": int(stream.numel()),
        "skipped_prefix_tokens": skip,
        "train_region": [skip, skip + train_end],
        "held_out_region": [skip + train_end, skip + train_end + n_held * T],
        "notes": notes,
    }
    return train, held, info


# -- jobs ----------------------------------------------------------------------------------


def _quant_format(model_dir: Path) -> str | None:
    """``pack-quantized`` (a compressed-tensors export), ``gguf`` (a GGUF export) or
    ``None`` (not quantized)."""
    if (model_dir / "model.gguf").is_file() and not (model_dir / "config.json").is_file():
        return "gguf"
    config = model_dir / "config.json"
    if config.is_file():
        quant = json.loads(config.read_text()).get("quantization_config") or {}
        if quant.get("quant_method") == "compressed-tensors":
            if quant.get("format") != "pack-quantized":
                raise ValueError(f"{model_dir}: only pack-quantized checkpoints can be healed")
            return "pack-quantized"
    return None


def _load(model_dir: Path, device) -> tuple[nn.Module, Any]:
    """The model to heal, its quantized linears (if any) carrying their grids."""
    from evosearch.models import load_model

    kind = _quant_format(model_dir)
    if kind == "gguf":
        raise ValueError(
            f"{model_dir} is a GGUF export: its types have no fixed grid to train on. Heal the "
            "model before writing GGUF, or search the integer format (compressed-tensors), "
            "whose healing keeps every layer on its grid"
        )
    if kind == "pack-quantized":
        from evosearch.export_ct import load_pack_quantized

        model, tokenizer, _ = load_pack_quantized(model_dir)
        return model.to(device), tokenizer
    return load_model(str(model_dir), device=device)


def _save_like(model: nn.Module, tokenizer, source_dir: Path, out: Path) -> None:
    """Save ``model`` to ``out`` in the format of the saved model it was loaded from."""
    from evosearch.models import DROP_FILE
    from evosearch.shrink import WIDTH_FILE, save_shrunk

    if _quant_format(source_dir) == "pack-quantized":  # the new codes on the same grids
        from evosearch.export_ct import save_pack_quantized
        from evosearch.quant import QuantizedWeight

        layers = {
            k: QuantizedWeight(g.codes(m.weight), g.scale, g.zero, g.bits, g.group_size)
            for k, m in block_linears(model).items()
            if isinstance(g := getattr(m, "quant_grid", None), Grid)
        }
        save_pack_quantized(model.cpu(), tokenizer, layers, out)
        tokenizer = None  # saved with it
    elif (source_dir / WIDTH_FILE).is_file():
        save_shrunk(model, tokenizer, out)
    elif (source_dir / DROP_FILE).is_file():
        # the checkpoint keeps the dropped sublayers' (unused) weights, as save_compressed
        # does, so it loads as a plain HF model too; load_compressed re-applies the drops
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(source_dir, dtype=model.dtype)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        dropped = tuple(f"{p}." for p in _stand_ins(model))
        if unexpected or not all(k.startswith(dropped) for k in missing):
            raise RuntimeError(f"healed weights do not fit {source_dir}: {missing[:3]}")
        plain.save_pretrained(out)
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for name in _CARRIED_FILES:
        if (source_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(source_dir / name, out / name)


def _progress(log: Callable[[str], None], steps: int) -> Callable[[str], None]:
    """Log about ten of ``train_``'s per-step messages."""
    every, count = max(1, steps // 10), [0]

    def progress(message: str) -> None:
        count[0] += 1
        if count[0] % every == 0 or count[0] == steps:
            log(f"heal {message} ({count[0]}/{steps})")

    return progress


def heal_saved_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: HealConfig,
    *,
    data: DataSpec,
    teacher: str | None,
    avoid: Sequence[EvalWindows] = (),
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Heal a saved compressed model (any space) and save it to ``out_dir`` in its format,
    atomically, with ``healing.json``: the loss curve, tokens, held-out loss before and after,
    the data used and the structure, measured before and after (identical by construction).

    Args:
        data: the healing text (``seq_len`` and ``n_sequences`` come from ``config``).
        teacher: the dense model to distil from (as for ``load_model``); ``None``: plain
            next-token training.
        avoid: evaluation windows the healing text must not overlap.

    Raises:
        FileExistsError: ``out_dir`` exists.
    """
    from evosearch.models import load_model

    model_dir, out = Path(model_dir), Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it to heal again")
    t0 = time.perf_counter()
    model, tokenizer = _load(model_dir, device)
    dense = None if teacher is None else load_model(teacher, device=device)[0]
    spec = dataclasses.replace(data, seq_len=config.seq_len)
    train_ids, held, info = healing_data(
        spec, tokenizer, config.sequences, config.held_out, avoid=avoid, model=dense or model
    )
    for note in info["notes"]:
        log(f"heal: note: {note}")
    before = read_structure(model)
    result = heal_(
        model,
        train_ids,
        config,
        teacher=None if dense is None else teacher_from(dense),
        held_out=held,
        keep=before,
        progress=_progress(log, -(-config.sequences // config.micro_batch)),
    )
    record = {
        "model": str(model_dir),
        "out": str(out),
        "teacher": teacher,
        "config": dataclasses.asdict(config),
        "data": {**dataclasses.asdict(spec), **info},
        **result,
        "structure_after": read_structure(model).summary(),
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }

    with atomic_dir(out) as tmp:  # a killed job leaves no half-written model
        _save_like(model, tokenizer, model_dir, tmp)
        (tmp / HEAL_FILE).write_text(json.dumps(record, indent=1) + "\n")
    log(
        f"healed: {record['tokens']} tokens in {record['steps']} steps, held-out loss "
        f"{record['held_out_before']:.4f} -> {record['held_out_after']:.4f}, structure kept "
        f"({record['seconds']}s); saved {out}"
    )
    return record


def run_settings(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What healing needs from a run's ``config.json`` (nested, or the flat keys of earlier
    versions, read through :class:`~evosearch.config.SearchConfig`): the dense model (the
    teacher), its calibration text (new windows: seed + 1), the evaluation windows to avoid,
    its sequence length, and the device."""
    from evosearch.config import SearchConfig

    config = SearchConfig.from_dict(read_json(Path(run_dir) / "config.json", "cannot read"))
    data = dataclasses.replace(config.data, seed=config.seed + 1, n_sequences=32)
    ev = config.evaluation
    return {
        "teacher": config.model,
        "data": data,
        "seq_len": config.data.seq_len,
        "avoid": [EvalWindows(s, ev.windows, ev.seq_len) for s in ev.ppl],
        "device": config.device,
    }


def heal_run(
    run_dir: str | os.PathLike,
    tokens: int,
    *,
    config: HealConfig | None = None,
    data: Mapping[str, Any] | None = None,
    avoid: Sequence[EvalWindows] = (),
    distill: bool = True,
    model_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Heal a finished run's model: ``RUN/model`` (kept, unhealed) -> ``RUN/healed`` (the
    emitted model) with ``RUN/healed/healing.json``.

    A search ending with healing calls ``heal_run(run_dir, tokens, log=log)`` once it has
    saved ``RUN/model`` (then rebuilds the report, which shows both models).

    Args:
        tokens: training tokens (overrides ``config.tokens``).
        config: how to heal (default :class:`HealConfig` with ``tokens`` and the run's
            calibration ``seq_len``).
        data: fields of the healing :class:`~evosearch.data.DataSpec` to change, e.g.
            ``{"source": "c4.jsonl"}`` (default: new windows of the calibration text).
        avoid: evaluation windows beyond the run's own ``eval_ppl`` ones to keep clear of.
        distill: distil from the run's dense model (else next-token loss).
        model_dir: the model to heal (default ``RUN/model``; e.g. a genome exported from
            the run's Pareto front).
        out_dir: where the healed model goes (default ``RUN/healed``).

    Returns:
        The ``healing.json`` record.
    """
    run_dir = Path(run_dir)
    model_dir = Path(model_dir or run_dir / "model")
    if not (run_dir / "config.json").is_file() or not model_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a finished run with a saved model")
    settings = run_settings(run_dir)
    fields = sorted(f.name for f in dataclasses.fields(DataSpec))
    if unknown := sorted(set(data or {}) - set(fields)):
        raise ValueError(f"unknown data fields {unknown}; choose from {fields}")
    spec = dataclasses.replace(settings["data"], **(data or {}))
    config = config or HealConfig(tokens=tokens, seq_len=settings["seq_len"])
    config = dataclasses.replace(config, tokens=tokens)
    return heal_saved_model(
        model_dir,
        out_dir or run_dir / HEAL_DIR,
        config,
        data=spec,
        teacher=settings["teacher"] if distill else None,
        avoid=[*settings["avoid"], *avoid],
        device=resolve_device(settings["device"]),
        log=log,
    )
