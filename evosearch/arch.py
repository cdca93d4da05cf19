"""One lookup table for where each architecture keeps its blocks, attention and MLP.

Every piece of evosearch that needs to find a block, an attention sublayer or a linear projection
asks this module; no other file spells ``model.model.layers`` or ``transformer.h``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "UnsupportedArchitectureError",
    "arch_for",
    "get_blocks",
    "get_submodule",
    "set_submodule",
]


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose ``config.model_type`` has no entry in :data:`ARCHITECTURES`."""


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Where the parts of one decoder-only architecture live.

    Paths are dotted attribute paths; block-relative paths start at one decoder block.
    """

    blocks: str  # path from the *CausalLM object to the nn.ModuleList of decoder blocks
    # Modules whose outputs are the attention / MLP branch of the residual stream. Dropping the
    # sublayer replaces each with a module producing zeros of the same shape, so the residual
    # passes through unchanged. OPT has no MLP container, so both of its linears are listed.
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    attention_linears: tuple[str, ...]
    mlp_linears: tuple[str, ...]
    num_layers_key: str = "num_hidden_layers"  # config attribute holding the block count
    # config attributes holding one entry per block, sliced when blocks are removed
    per_layer_keys: tuple[str, ...] = ("layer_types",)


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    attention=("self_attn",),
    mlp=("mlp",),
    attention_linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    ),
    mlp_linears=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
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


def arch_for(model_or_config) -> ArchSpec:
    """Return the :class:`ArchSpec` of a model or config.

    Raises:
        UnsupportedArchitectureError: naming the supported ``model_type`` values.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; evosearch supports: {supported}"
        ) from None


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
