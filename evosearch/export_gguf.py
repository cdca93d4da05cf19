"""Write Llama-family models as GGUF files with a per-tensor type (llama.cpp, transformers).

The block linears arrive already quantized (GGUF blocks, as the quantization space's level
database holds them), so the file holds exactly the weights the search evaluated; norms are
written as F32 and any tensor not given quantized as F32 too. Names and the row permutation of
``attn_q`` / ``attn_k`` follow llama.cpp's ``convert_hf_to_gguf.py`` (transformers undoes it
when it reads the file). GGUF blocks lie along the input dimension, one row per output, so
permuting the rows of quantized blocks equals quantizing the permuted weight.

Metadata is copied from a ``template`` GGUF (e.g. the file a model was converted from, with its
tokenizer) or, without one, written from the model's config. Dropped blocks are left out and
the remaining ones renumbered, with ``block_count`` set to match.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evosearch.arch import get_blocks

__all__ = ["gguf_name", "write_gguf"]

_LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_SKIP_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}


def gguf_name(module: str, renumber: dict[int, int]) -> str | None:
    """The GGUF tensor name (without ``.weight``) of an HF Llama module path, with block
    indices mapped through ``renumber``; ``None`` for a dropped block."""
    if module in _TOP:
        return _TOP[module]
    parts = module.split(".")
    if parts[:2] != ["model", "layers"]:
        raise ValueError(f"{module} is not a Llama module this writer knows")
    block = int(parts[2])
    if block not in renumber:
        return None
    return f"blk.{renumber[block]}.{_LINEARS['.'.join(parts[3:])]}"


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, interleaved halves become contiguous."""
    return (
        rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def _rope_theta(config) -> float:
    """RoPE base: ``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta``."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


def _metadata(writer, model: nn.Module, template: str | Path | None, n_blocks: int) -> None:
    """Copy ``template``'s key-values (or write the config's), with ``n_blocks`` blocks."""
    import gguf

    if template is not None:
        reader = gguf.GGUFReader(str(template))
        for key, field in reader.fields.items():
            if key in _SKIP_KEYS or key.startswith(("GGUF.", "llama.", "general.file_type")):
                continue  # the config's values are written below
            main, sub = field.types[0], field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), main, sub_type=sub)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_block_count(n_blocks)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if template is None:
        writer.add_name("evosearch export")
        writer.add_tokenizer_model("gpt2")
        tokens = [f"<t{i}>" for i in range(c.vocab_size)]
        writer.add_token_list(tokens)
        writer.add_token_types([1] * c.vocab_size)
        writer.add_token_merges([])
        writer.add_bos_token_id(c.bos_token_id or 0)
        writer.add_eos_token_id(c.eos_token_id or 0)


def write_gguf(
    model: nn.Module,
    quantized: dict[str, tuple[str, np.ndarray]],
    path: str | Path,
    *,
    template: str | Path | None = None,
    dropped_blocks: Collection[int] = (),
) -> Path:
    """Write ``model`` (a Llama) to ``path``: modules named in ``quantized`` take their
    ``(GGUF type, blocks)``, everything else is F32; ``dropped_blocks`` are left out and the
    rest renumbered. The file is written next to ``path`` and renamed, so it is whole or
    absent. Returns ``path``."""
    import gguf

    if model.config.model_type not in ("llama", "mistral"):
        raise ValueError(f"GGUF export knows Llama-family models, not {model.config.model_type}")
    n = len(get_blocks(model))
    keep = [i for i in range(n) if i not in set(dropped_blocks)]
    renumber = {old: new for new, old in enumerate(keep)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write(gguf.GGUFWriter(str(tmp), "llama"), model, quantized, template, renumber)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def _write(writer, model, quantized, template, renumber: dict[int, int]) -> None:
    import gguf

    _metadata(writer, model, template, len(renumber))
    c = model.config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for name, param in model.named_parameters(remove_duplicate=False):
        module = name.removesuffix(".weight")
        if name.endswith(".bias") or (tied and module == "lm_head"):
            continue
        target = gguf_name(module, renumber)
        if target is None:
            continue
        if module in quantized:
            type_name, data = quantized[module]
            qtype = gguf.GGMLQuantizationType[type_name]
            if type_name == "F16":
                data = np.asarray(data).view(np.float16)
        else:
            qtype, data = gguf.GGMLQuantizationType.F32, param.detach().float().cpu().numpy()
        if module.endswith("q_proj"):
            data = _permute(data, c.num_attention_heads)
        elif module.endswith("k_proj"):
            data = _permute(data, c.num_key_value_heads)
        writer.add_tensor(f"{target}.weight", np.ascontiguousarray(data), raw_dtype=qtype)
    writer.add_file_type(_file_type(quantized))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _file_type(quantized: dict[str, tuple[str, np.ndarray]]) -> int:
    """``general.file_type``: the most common type of the block linears (llama.cpp's
    ``LLAMA_FTYPE`` numbers)."""
    import gguf

    names = [t for t, _ in quantized.values()]
    common = max(set(names), key=names.count) if names else "F32"
    return int(getattr(gguf.LlamaFileType, f"MOSTLY_{common}", gguf.LlamaFileType.ALL_F32))


def dequantized(blocks: np.ndarray, type_name: str) -> torch.Tensor:
    """float32 weight of GGUF ``blocks`` (uint8 rows as stored, or float16 for F16)."""
    import gguf

    data = np.asarray(blocks)
    if type_name == "F16":
        data = data.view(np.float16)
    out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
