"""Where each decoder keeps its blocks, attention and MLP: discovered, with one table for the
exceptions.

Every piece of evosearch that needs to find a block, an attention sublayer or a linear projection
asks this module; no other file spells ``model.model.layers`` or ``transformer.h``.

Most decoders follow one common layout: an ``nn.ModuleList`` of ``num_hidden_layers`` blocks under
the base model, each block with an attention child (``self_attn``) and an MLP child (``mlp``)
holding the linear projections. :func:`arch_for` discovers that layout from the model itself
(Llama, Mistral, Qwen2/2.5/3, Gemma 2/3, Phi-3 and any decoder built the same way). Only
architectures that depart from it are written out, in :data:`ARCHITECTURES` (OPT has no MLP
container; GPT-2 counts its blocks in ``n_layer`` and uses ``Conv1D``). :data:`FAMILIES` lists
the families evosearch is tested on; :func:`supported_families` renders it for the README and
for error messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "ArchSpec",
    "UnsupportedArchitectureError",
    "arch_for",
    "discover",
    "get_blocks",
    "get_submodule",
    "head_logits",
    "logit_cap",
    "soft_cap",
    "per_layer_config_keys",
    "set_submodule",
    "supported_families",
    "supported_families_markdown",
]


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose decoder blocks cannot be found; the message says what was looked
    for and names the supported families."""


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Where the parts of one decoder-only architecture live.

    Paths are dotted attribute paths; block-relative paths start at one decoder block.
    """

    blocks: str  # path from the *CausalLM object to the nn.ModuleList of decoder blocks
    # Modules whose outputs are the attention / MLP branch of the residual stream. Dropping the
    # sublayer replaces each with a module producing zeros of the same shape, so the residual
    # passes through unchanged (also through Gemma's post-sublayer norms: RMSNorm(0) = 0).
    # OPT has no MLP container, so both of its linears are listed.
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    # every linear of the sublayer, its output projection last
    attention_linears: tuple[str, ...]
    mlp_linears: tuple[str, ...]
    num_layers_key: str = "num_hidden_layers"  # config attribute holding the block count
    # role -> block-relative path of the projections width pruning slices: q, k, v (or fused
    # qkv), o; gate, up (or fused gate_up), down. Empty where width pruning is unsupported.
    roles: Mapping[str, str] = field(default_factory=dict)


# The exceptions to the common layout. Everything else is found by :func:`discover`.
ARCHITECTURES: dict[str, ArchSpec] = {
    "opt": ArchSpec(
        blocks="model.decoder.layers",
        attention=("self_attn",),
        mlp=("fc1", "fc2"),
        attention_linears=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
        ),
        mlp_linears=("fc1", "fc2"),
    ),
    "gpt2": ArchSpec(
        blocks="transformer.h",
        attention=("attn",),
        mlp=("mlp",),
        attention_linears=("attn.c_attn", "attn.c_proj"),
        mlp_linears=("mlp.c_fc", "mlp.c_proj"),
        num_layers_key="n_layer",
    ),
}

# model_type -> family name: what evosearch is tested on, in every space it supports (tiny random
# models of each run through the test suite). The README's list is generated from this.
FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3",
    "opt": "OPT",
    "gpt2": "GPT-2",
}

# What discovery looks for, in order of preference.
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "down_proj", "fc2", "wo", "w2")
_ROLE_NAMES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "qkv_proj": "qkv",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down",
}
_DISCOVERED: dict[type, ArchSpec] = {}
_FROM_CONFIG: dict[str, ArchSpec] = {}


def supported_families() -> str:
    """The tested families, comma-separated (``"Llama, Mistral, ..."``)."""
    return ", ".join(FAMILIES.values())


def supported_families_markdown() -> str:
    """The README's line on supported architectures, generated from :data:`FAMILIES`."""
    return (
        f"Supported architectures: {supported_families()}, and any decoder with the common layout "
        "(a `ModuleList` of blocks with `self_attn` and `mlp`); generated by "
        "`evosearch.arch.supported_families_markdown()`."
    )


def arch_for(model_or_config) -> ArchSpec:
    """Return the :class:`ArchSpec` of a model or config.

    A model's layout is discovered once per model class (see :func:`discover`); a config is
    instantiated on the ``meta`` device (no memory) to discover its model's layout.

    Raises:
        UnsupportedArchitectureError: naming what was looked for and the supported families.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if isinstance(model_or_config, nn.Module):
        cls = type(model_or_config)
        if cls not in _DISCOVERED:
            _DISCOVERED[cls] = discover(model_or_config)
        return _DISCOVERED[cls]
    if model_type not in _FROM_CONFIG:
        _FROM_CONFIG[model_type] = discover(_meta_model(config))
    return _FROM_CONFIG[model_type]


def _meta_model(config) -> nn.Module:
    """The causal LM of ``config``, built on the meta device (shapes only)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        raise _unsupported(getattr(config, "model_type", None), "it is not a transformers config")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise _unsupported(config.model_type, f"it has no causal-LM class ({exc})") from None


def _unsupported(model_type, reason: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}: {reason}; evosearch supports "
        f"{supported_families()} ({', '.join(FAMILIES)}) and any decoder with that layout"
    )


def discover(model: nn.Module) -> ArchSpec:
    """Find the common decoder layout in ``model``.

    Looks for an ``nn.ModuleList`` with as many entries as the config's layer count whose
    blocks have an attention child (``self_attn``, ``attn``, ...) and an MLP child (``mlp``,
    ...); the linear projections are those of the first block holding them, each sublayer's
    output projection (``o_proj``, ``down_proj``, ...) last.

    Raises:
        UnsupportedArchitectureError: a one-line message naming what was looked for.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    key = next((k for k in _LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None)
    wanted = (
        f"an nn.ModuleList of the config's {'/'.join(_LAYER_COUNT_KEYS)} blocks, each with an "
        f"attention ({'|'.join(_ATTENTION_NAMES)}) and an MLP ({'|'.join(_MLP_NAMES)})"
    )
    if key is None:
        raise _unsupported(model_type, f"looked for {wanted}, but the config has no layer count")
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != getattr(config, key):
            continue
        parts = [_sublayers(block) for block in module]
        if any(p is not None for p in parts):
            return _spec_of(path, module, key)
    raise _unsupported(model_type, f"looked for {wanted} and found none")


def _sublayers(block: nn.Module) -> tuple[str, str] | None:
    """``(attention name, MLP name)`` of a block's children, or ``None``."""
    names = dict(block.named_children())
    attention = next((n for n in _ATTENTION_NAMES if n in names), None)
    mlp = next((n for n in _MLP_NAMES if n in names), None)
    return None if attention is None or mlp is None else (attention, mlp)


def _linears(module: nn.Module, prefix: str) -> tuple[str, ...]:
    """Paths (``prefix.name``) of the linear layers in ``module``, output projections last."""
    found = [
        name
        for name, m in module.named_modules()
        if name and (isinstance(m, nn.Linear) or hasattr(m, "nf"))  # nn.Linear, GPT-2 Conv1D
    ]
    found.sort(key=lambda name: name.rpartition(".")[2] in _OUTPUT_NAMES)  # stable
    return tuple(f"{prefix}.{name}" for name in found)


def _spec_of(path: str, blocks: nn.ModuleList, num_layers_key: str) -> ArchSpec:
    attention, mlp = next(p for p in map(_sublayers, blocks) if p is not None)
    attention_linears: tuple[str, ...] = ()
    mlp_linears: tuple[str, ...] = ()
    for block in blocks:  # the first block whose sublayers are not stand-ins
        attention_linears = attention_linears or _linears(getattr(block, attention), attention)
        mlp_linears = mlp_linears or _linears(getattr(block, mlp), mlp)
    if not attention_linears or not mlp_linears:
        raise UnsupportedArchitectureError(
            f"found the blocks at {path}, but no linear layers in their {attention} and {mlp}"
        )
    roles = {}
    for linear in attention_linears + mlp_linears:
        role = _ROLE_NAMES.get(linear.rpartition(".")[2])
        if role is not None:
            roles[role] = linear
    return ArchSpec(
        blocks=path,
        attention=(attention,),
        mlp=(mlp,),
        attention_linears=attention_linears,
        mlp_linears=mlp_linears,
        num_layers_key=num_layers_key,
        roles=roles,
    )


def per_layer_config_keys(config, n_layers: int) -> tuple[str, ...]:
    """Config attributes with one entry per block (``layer_types`` and the like): every list or
    tuple of length ``n_layers``, except token ids and ``architectures``."""
    keys = []
    for key, value in vars(config).items():
        if key == "architectures" or key.endswith(("_token_id", "_token_ids")):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n_layers:
            keys.append(key)
    return tuple(keys)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path='a.b.c'``."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Replace the module at ``path`` by ``new`` and return the old one."""
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of a causal LM."""
    return get_submodule(model, arch_for(model).blocks)


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``(..., V)`` from final hidden states ``(..., d)``, as the model's own forward
    computes them: the output embedding, then the final logit soft-capping of Gemma 2/3
    (``cap * tanh(logits / cap)``) where the config sets one."""
    head = model.get_output_embeddings()
    weight = head.weight
    return soft_cap(head(hidden.to(device=weight.device, dtype=weight.dtype)), logit_cap(model))


def logit_cap(model: nn.Module) -> float | None:
    """The final logit soft-cap of the model's config (Gemma 2/3), ``None`` where it has none."""
    return getattr(model.config, "final_logit_softcapping", None) or None


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` in float32; ``logits`` unchanged where ``cap`` is ``None``."""
    return logits if cap is None else torch.tanh(logits.float() / cap) * cap
