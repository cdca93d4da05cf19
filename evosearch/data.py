"""Token data for calibration and evaluation: HF datasets, local files, or the model's own text.

A :class:`TokenData` is a fixed ``(n_sequences, seq_len)`` tensor of token ids; everything the
search evaluates on is a subset of its rows, chosen by index, so that candidates compared in one
selection stage see exactly the same tokens.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evosearch.validate import check_fields

__all__ = ["DataSpec", "TokenData", "load_text", "load_token_data", "DataError", "DataWarning"]

TEXT_SUFFIXES = (".txt", ".raw", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")

# Short names for the usual evaluation corpora on the Hugging Face hub.
HUB_ALIASES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext2-valid": ("wikitext", "wikitext-2-raw-v1", "validation", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}


class DataError(ValueError):
    """Bad data source: a missing file, an unknown format, or too few tokens."""


class DataWarning(UserWarning):
    """Usable but doubtful data, e.g. calibration windows that must overlap."""


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where tokens come from and how they are cut.

    Args:
        source: ``"generated"`` (text sampled from the dense model itself, needs no files), a
            local ``.txt``/``.raw``/``.jsonl`` path, a hub alias (``wikitext2``, ``c4``) or an HF
            dataset name.
        n_sequences: number of sequences; ``None`` with ``contiguous=True`` means all windows.
        seq_len: tokens per sequence.
        seed: seed for random window positions and for generated text.
        contiguous: take consecutive non-overlapping windows from the start (evaluation)
            instead of random windows (calibration).
        config: HF dataset config name; split: HF split; text_field: text column / jsonl key.
    """

    source: str = "generated"
    n_sequences: int | None = 32
    seq_len: int = 256
    seed: int = 0
    contiguous: bool = False
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    def __post_init__(self) -> None:
        check_fields(self)  # types, naming the key
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.n_sequences is not None and self.n_sequences < 1:
            raise ValueError(f"n_sequences must be >= 1, got {self.n_sequences}")
        if self.n_sequences is None and not self.contiguous:
            raise ValueError("n_sequences=None (all windows) needs contiguous=True")


@dataclass(frozen=True)
class TokenData:
    """Fixed token sequences, ``input_ids`` of shape ``(n_sequences, seq_len)``."""

    input_ids: torch.Tensor
    description: str = ""

    @property
    def n_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()


def load_text(spec: DataSpec) -> str:
    """Raw text of a file, alias or HF dataset (documents joined by blank lines)."""
    source = spec.source
    path = Path(os.path.expanduser(source))
    if path.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES or os.sep in source:
        if not path.is_file():
            raise DataError(f"data file not found: {source}")
        try:
            if path.suffix.lower() in JSONL_SUFFIXES:
                return _read_jsonl(path, spec.text_field)
            if path.suffix.lower() in TEXT_SUFFIXES:
                return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"cannot read data file {source}: not UTF-8 text (byte {exc.start})"
            ) from None
        raise DataError(
            f"unknown data format {path.suffix!r} for {source}; use .txt, .raw or .jsonl"
        )
    name, config, split, field = HUB_ALIASES.get(
        source, (source, spec.config, spec.split, spec.text_field)
    )
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub raises many types; the user needs one message
        raise DataError(
            f"could not load dataset {source!r} ({type(exc).__name__}: {exc}); pass a local "
            ".txt/.raw/.jsonl file instead if the Hugging Face hub is unreachable"
        ) from None
    if field not in dataset.column_names:
        raise DataError(f"dataset {source!r} has no column {field!r}: {dataset.column_names}")
    return "\n\n".join(t for t in dataset[field] if t)


def _read_jsonl(path: Path, field: str) -> str:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            if field not in record:
                raise DataError(f"{path}:{lineno}: no field {field!r} (use --text-field)")
            texts.append(str(record[field]))
    return "\n\n".join(texts)


def load_token_data(spec: DataSpec, tokenizer, model=None) -> TokenData:
    """Tokenise ``spec.source`` and cut it into sequences of exactly ``spec.seq_len`` tokens.

    ``model`` is needed only for ``source="generated"``.
    """
    if spec.source == "generated":
        if model is None:
            raise ValueError("source='generated' needs the dense model")
        if spec.n_sequences is None:
            raise ValueError("source='generated' needs n_sequences")
        ids = generate_sequences(model, tokenizer, spec.n_sequences, spec.seq_len, spec.seed)
        return TokenData(ids, f"generated by the dense model (seed {spec.seed})")
    text = load_text(spec)
    stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n_windows = stream.numel() // spec.seq_len
    wanted = spec.n_sequences if spec.n_sequences is not None else n_windows
    if spec.contiguous:
        if n_windows == 0:
            raise DataError(
                f"{spec.source} has {stream.numel()} tokens, fewer than one window of "
                f"{spec.seq_len}; give a longer file or a smaller --seq-len"
            )
        if wanted > n_windows:
            raise DataError(
                f"{spec.source} has {stream.numel()} tokens: {n_windows} windows of "
                f"{spec.seq_len}, {wanted} requested"
            )
        ids = stream[: wanted * spec.seq_len].view(wanted, spec.seq_len)
    else:
        if stream.numel() < spec.seq_len:
            raise DataError(
                f"{spec.source} has only {stream.numel()} tokens, fewer than seq_len "
                f"{spec.seq_len}"
            )
        if wanted * spec.seq_len > stream.numel():
            warnings.warn(
                f"{spec.source} has {stream.numel()} tokens, fewer than the {wanted} x "
                f"{spec.seq_len} requested: the random windows overlap (calibration repeats "
                "tokens); give more text or fewer --n-sequences",
                DataWarning,
                stacklevel=2,
            )
        rng = np.random.default_rng(spec.seed)
        starts = rng.integers(0, stream.numel() - spec.seq_len + 1, size=wanted)
        ids = torch.stack([stream[s : s + spec.seq_len] for s in starts.tolist()])
    kind = "contiguous" if spec.contiguous else f"random (seed {spec.seed})"
    return TokenData(ids, f"{spec.source}: {wanted} x {spec.seq_len} tokens, {kind} windows")


@torch.no_grad()
def generate_sequences(model, tokenizer, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Sample ``n`` sequences of ``seq_len`` tokens from the model (temperature 1, no top-k/p),
    starting from its BOS token.

    Seeded by ``seed`` alone (the global RNG state is restored afterwards): the same model and
    seed give the same tokens on the same device.
    """
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id
    if start is None:
        start = tokenizer.eos_token_id
    ids = torch.full((n, 1), start, dtype=torch.long, device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=tokenizer.eos_token_id,
        )
    return out[:, :seq_len].cpu()
