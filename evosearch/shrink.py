"""Structured width pruning: masked output projections during search, physically smaller
blocks at export, and a loader that rebuilds per-layer shapes.

A block's width is pruned by removing whole key/value groups of attention heads (each KV head
with the query heads that share it, so grouped-query attention stays valid) and MLP
intermediate channels. During a search the removal is *simulated* on the resident model: only
the output projection (``o_proj`` / ``down_proj``) is replaced, by a :class:`MaskedLinear` whose
columns of removed heads/channels are zero. The other projections keep computing the removed
outputs, but nothing reads them, so the result equals the sliced model's (ZipLM, Kurtic et al.
2023, Sec. 3). At export the block's projections are sliced for real
(:func:`shrink_block_`), and :func:`save_shrunk` / :func:`load_shrunk` store and rebuild the
per-layer shapes (``evosearch_width.json``).

Supported: every architecture whose table entry names the projections' roles
(:attr:`evosearch.arch.ArchSpec.roles`): separate ``q/k/v/o_proj`` or Phi-3's fused ``qkv_proj``
(query rows, then key rows, then value rows), and separate ``gate/up/down_proj`` or Phi-3's
fused ``gate_up_proj`` (gate rows, then up rows): Llama, Mistral, Qwen2/2.5/3, Gemma 2/3, Phi-3.
Per-head query/key norms (Gemma 3, Qwen3) act on one head at a time and need no slicing. OPT and
GPT-2 raise :class:`WidthUnsupportedError`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from evosearch.arch import (
    ARCHITECTURES,
    FAMILIES,
    arch_for,
    get_blocks,
    get_submodule,
    set_submodule,
)
from evosearch.errors import read_json
from evosearch.surgery import ZeroAttention, ZeroOutput

__all__ = [
    "WIDTH_FILE",
    "AttentionGeometry",
    "MaskedLinear",
    "WidthUnsupportedError",
    "geometry",
    "n_params",
    "load_shrunk",
    "save_shrunk",
    "shrink_block_",
    "throughput",
]

WIDTH_FILE = "evosearch_width.json"
# the projection roles width pruning needs: one of each tuple's layouts, separate or fused
_ATTENTION_LAYOUTS = (("q", "k", "v", "o"), ("qkv", "o"))
_MLP_LAYOUTS = (("gate", "up", "down"), ("gate_up", "down"))


class WidthUnsupportedError(ValueError):
    """The architecture has no Llama-like attention/MLP projections to prune in width."""


@dataclass(frozen=True)
class AttentionGeometry:
    """Head layout of a Llama-like model.

    Attributes:
        n_heads: query heads; n_kv: key/value heads; head_dim: channels per head.
        hidden: model width; intermediate: MLP channels.
    """

    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int
    intermediate: int

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head."""
        return self.n_heads // self.n_kv

    def query_columns(self, groups) -> torch.Tensor:
        """``o_proj`` input columns (= ``q_proj`` rows) of the query heads of KV ``groups``."""
        width = self.group_size * self.head_dim
        cols = [torch.arange(g * width, (g + 1) * width) for g in sorted(groups)]
        return torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)

    def kv_rows(self, groups) -> torch.Tensor:
        """``k_proj`` / ``v_proj`` rows of the KV heads ``groups``."""
        d = self.head_dim
        rows = [torch.arange(g * d, (g + 1) * d) for g in sorted(groups)]
        return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def geometry(model: nn.Module) -> AttentionGeometry:
    """The head layout of ``model``'s config.

    Raises:
        WidthUnsupportedError: for architectures without q/k/v/o and gate/up/down projections
            (OPT, GPT-2).
    """
    roles = arch_for(model).roles
    has = [any(all(r in roles for r in layout) for layout in layouts)
           for layouts in (_ATTENTION_LAYOUTS, _MLP_LAYOUTS)]  # fmt: skip
    if not all(has):
        supported = ", ".join(t for t in FAMILIES if t not in ARCHITECTURES)
        raise WidthUnsupportedError(
            f"{model.config.model_type} is not supported for width search (needs q/k/v/o_proj "
            f"or qkv_proj/o_proj and gate/up/down_proj or gate_up_proj/down_proj: {supported})"
        )
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return AttentionGeometry(c.num_attention_heads, n_kv, head_dim, c.hidden_size,
                             c.intermediate_size)  # fmt: skip


class MaskedLinear(nn.Module):
    """A linear layer whose masked input columns are zero by construction.

    ``forward`` multiplies the weight by the mask, so however the weight is trained (gradients,
    weight decay, optimiser state), removed heads/channels contribute nothing and cannot regrow.

    Args:
        weight: ``(out, in)`` weight (copied into a new parameter).
        mask: ``(in,)`` 0/1 mask of kept input columns.
        bias: ``(out,)`` bias or ``None``.
    """

    def __init__(
        self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("mask", mask.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)

    def kept(self) -> torch.Tensor:
        """Indices of the kept input columns."""
        return self.mask.nonzero().flatten()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.to(weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out.requires_grad_(False)


def _rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    bias = None if linear.bias is None else linear.bias[rows]
    return _linear(linear.weight[rows], bias)


_LLAMA_ROLES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _parent(path: str) -> str:
    """``"self_attn"`` for ``"self_attn.o_proj"``: the sublayer holding a projection."""
    return path.rpartition(".")[0]


def _slice_rows_(block: nn.Module, path: str, rows: torch.Tensor) -> None:
    set_submodule(block, path, _rows(get_submodule(block, path), rows))


def shrink_block_(
    block: nn.Module,
    geo: AttentionGeometry,
    *,
    kv_groups: tuple[int, ...] | None,
    o_weight: torch.Tensor | None = None,
    channels: tuple[int, ...] | None,
    down_weight: torch.Tensor | None = None,
    roles: Mapping[str, str] = _LLAMA_ROLES,
) -> nn.Module:
    """Physically slice one decoder block in place.

    Args:
        block: the block (its projections are dense).
        geo: head layout.
        kv_groups: KV groups to keep (``None``: keep the attention as it is; empty: drop it).
        o_weight: ``(hidden, kept query columns)`` compensated ``o_proj`` weight; ``None``
            slices the dense one.
        channels: MLP channels to keep (``None``: keep all; empty: drop the MLP).
        down_weight: ``(hidden, kept channels)`` compensated ``down_proj`` weight.
        roles: block-relative paths of the projections, :attr:`~evosearch.arch.ArchSpec.roles`.
    """
    if kv_groups is not None:
        _shrink_attention_(block, geo, roles, kv_groups, o_weight)
    if channels is not None:
        _shrink_mlp_(block, geo, roles, channels, down_weight)
    return block


def _shrink_attention_(block, geo: AttentionGeometry, roles, groups, o_weight) -> None:
    if not groups:
        set_submodule(block, _parent(roles["o"]), ZeroAttention())
        return
    q_rows, kv_rows = geo.query_columns(groups), geo.kv_rows(groups)
    o = get_submodule(block, roles["o"])  # nn.Linear, or a search-time MaskedLinear
    weight = o.weight[:, q_rows] if o_weight is None else o_weight
    if "qkv" in roles:  # fused rows: all query heads, then the key heads, then the value heads
        q_size, kv_size = geo.n_heads * geo.head_dim, geo.n_kv * geo.head_dim
        rows = torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])
        _slice_rows_(block, roles["qkv"], rows)
        _set_head_counts(get_submodule(block, _parent(roles["o"])), geo, len(groups))
    else:
        for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            _slice_rows_(block, roles[role], rows)
    set_submodule(block, roles["o"], _linear(weight.to(o.weight.dtype), o.bias))


def _set_head_counts(attention: nn.Module, geo: AttentionGeometry, n_groups: int) -> None:
    """Tell an attention module that splits a fused ``qkv_proj`` by head counts (Phi-3 reads
    the query width from ``self.config`` and the key width from ``self.num_key_value_heads``)
    how many heads its sliced projection holds, without touching the model's config."""
    config = copy.copy(attention.config)
    config.num_attention_heads = n_groups * geo.group_size
    config.num_key_value_heads = n_groups
    attention.config = config
    for attr, value in (
        ("num_key_value_heads", n_groups),
        ("num_heads", n_groups * geo.group_size),
    ):
        if hasattr(attention, attr):
            setattr(attention, attr, value)


def _shrink_mlp_(block, geo: AttentionGeometry, roles, channels, down_weight) -> None:
    if not channels:
        set_submodule(block, _parent(roles["down"]), ZeroOutput(geo.hidden))
        return
    idx = torch.tensor(sorted(channels), dtype=torch.long)
    down = get_submodule(block, roles["down"])
    weight = down.weight[:, idx] if down_weight is None else down_weight
    if "gate_up" in roles:  # fused rows: all gate channels, then all up channels
        _slice_rows_(block, roles["gate_up"], torch.cat([idx, geo.intermediate + idx]))
    else:
        _slice_rows_(block, roles["gate"], idx)
        _slice_rows_(block, roles["up"], idx)
    set_submodule(block, roles["down"], _linear(weight.to(down.weight.dtype), down.bias))


def _layer_shapes(model: nn.Module, geo: AttentionGeometry) -> list[dict[str, int]]:
    roles = arch_for(model).roles
    shapes = []
    for block in get_blocks(model):
        if isinstance(get_submodule(block, _parent(roles["o"])), ZeroAttention):
            kv = 0
        elif "qkv" in roles:  # (group_size + 2) heads of rows per KV group
            rows = get_submodule(block, roles["qkv"]).out_features
            kv = rows // ((geo.group_size + 2) * geo.head_dim)
        else:
            kv = get_submodule(block, roles["k"]).out_features // geo.head_dim
        if isinstance(get_submodule(block, _parent(roles["down"])), ZeroOutput):
            inter = 0
        elif "gate_up" in roles:
            inter = get_submodule(block, roles["gate_up"]).out_features // 2
        else:
            inter = get_submodule(block, roles["gate"]).out_features
        shapes.append({"kv_heads": kv, "intermediate": inter})
    return shapes


def save_shrunk(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save a width-shrunk model: ``config.json`` (of the dense layout), ``model.safetensors``
    with the smaller matrices, the tokenizer, and ``evosearch_width.json`` with each block's
    number of KV heads and MLP channels (0 = the sublayer is dropped)."""
    from safetensors.torch import save_model

    geo = geometry(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    spec = {"head_dim": geo.head_dim, "layers": _layer_shapes(model, geo)}
    (out / WIDTH_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    return out


def load_shrunk(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """Load a model saved by :func:`save_shrunk`: build the dense layout from ``config.json``,
    give each block its saved number of KV heads and MLP channels, then load the weights.

    Returns:
        ``(model, tokenizer)`` in eval mode.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    spec = read_json(path / WIDTH_FILE, "cannot read the width spec")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    geo = geometry(model)
    roles = arch_for(model).roles
    blocks = get_blocks(model)
    if len(spec["layers"]) != len(blocks):
        raise ValueError(
            f"{path / WIDTH_FILE} lists {len(spec['layers'])} layers, the config {len(blocks)}"
        )
    for block, layer in zip(blocks, spec["layers"]):
        kv = layer["kv_heads"]
        shrink_block_(
            block,
            geo,
            kv_groups=None if kv == geo.n_kv else tuple(range(kv)),
            channels=None
            if layer["intermediate"] == geo.intermediate
            else tuple(range(layer["intermediate"])),
            roles=roles,
        )
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{path}: weights do not match the saved shapes (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    if tied:
        model.tie_weights()
    tokenizer = (
        AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
    )
    return model.eval().requires_grad_(False), tokenizer


def n_params(model: nn.Module) -> int:
    """Parameters of ``model``, tied ones counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def throughput(
    model: nn.Module, *, batch: int = 4, seq_len: int = 256, repeats: int = 3, vocab: int = 1000
) -> float:
    """Measured forward tokens per second on random ``(batch, seq_len)`` inputs (median of
    ``repeats`` timed runs after one warm-up), on the model's device, with its thread count."""
    device = next(model.parameters()).device
    vocab = min(vocab, model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - t0)
    return batch * seq_len / sorted(times)[len(times) // 2]
