"""Export mixed bit-width models as compressed-tensors ``pack-quantized`` checkpoints.

The checkpoint is what ``transformers`` with the ``compressed-tensors`` package loads (on CPU
too): every quantized linear stores ``weight_packed`` (int32, ``b`` codes per 32-bit word
chain), ``weight_scale``, ``weight_zero_point`` (packed along the rows) and ``weight_shape``;
``config.json`` holds one config group per bit-width whose ``targets`` are its layers' names.

compressed-tensors wants ``in_features`` to be a multiple of the group size. When it is not
(SmolLM2's 576 inputs with groups of 128), the layer is written with groups of
``gcd(group_size, in_features)`` columns, each repeating its search group's scale and zero
point: the file dequantizes to exactly the weights of the search, at a few more bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from evosearch.quant import QuantizedWeight

__all__ = [
    "load_pack_quantized",
    "pack_layer",
    "quantization_config",
    "read_pack_quantized",
    "save_pack_quantized",
]


def export_group_size(q: QuantizedWeight) -> int:
    """The group size the layer is written with (see the module docstring)."""
    return math.gcd(q.group_size, q.codes.shape[1])


def pack_layer(q: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one layer (names relative to the module)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rows, cols = q.codes.shape
    g = export_group_size(q)
    reps = q.group_size // g
    n = cols // g
    scale = q.scale.repeat_interleave(reps, dim=1)[:, :n]
    zero = q.zero.repeat_interleave(reps, dim=1)[:, :n]
    offset = 1 << (q.bits - 1)  # compressed-tensors stores signed codes and zero points
    codes = (q.codes.to(torch.int16) - offset).to(torch.int8)
    zp = (zero.to(torch.int16) - offset).to(torch.int8)
    return {
        "weight_packed": pack_to_int32(codes, q.bits),
        "weight_scale": scale.to(dtype),
        "weight_zero_point": _pack_zero_point(zp, q.bits),
        "weight_shape": torch.tensor([rows, cols]),
    }


def _pack_zero_point(zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points packed along the rows, as compressed-tensors stores them, then padded
    with zero words to ``(rows, n_groups)``: compressed-tensors 0.20 with transformers 5
    allocates the unpacked shape when loading (its meta-device compression does not pack
    zero points) but unpacks on decompression, which reads only the leading words."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    packed = pack_to_int32(zp, bits, packed_dim=0)  # (ceil(rows * bits / 32), n_groups)
    out = torch.zeros(zp.shape, dtype=torch.int32)
    out[: packed.shape[0]] = packed
    return out


def quantization_config(layers: dict[str, QuantizedWeight]) -> dict:
    """``config.json``'s ``quantization_config``: one group per (bit-width, group size)."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, q in layers.items():
        groups.setdefault((q.bits, export_group_size(q)), []).append(name)
    config_groups = {
        f"group_{i}": {
            "targets": sorted(names),
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": False,
                "strategy": "group",
                "group_size": g,
                "dynamic": False,
                "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
        }
        for i, ((bits, g), names) in enumerate(sorted(groups.items()))
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
    }


def save_pack_quantized(
    model: nn.Module, tokenizer, layers: dict[str, QuantizedWeight], out_dir: str | Path
) -> list[Path]:
    """Save ``model`` with the linears named in ``layers`` replaced by their packed codes;
    returns the files written (for their bytes). ``model`` is not changed."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    packed = set()
    for name, q in layers.items():
        dtype = torch.float16 if model.dtype == torch.float32 else model.dtype
        for key, t in pack_layer(q, dtype).items():
            state[f"{name}.{key}"] = t.contiguous()
        packed.add(f"{name}.weight")
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if key in packed or t.data_ptr() in seen and key.endswith("lm_head.weight"):
            continue  # tied head: transformers re-ties it
        seen.add(t.data_ptr())
        state[key] = t.detach().contiguous().clone()
    weights = out / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(layers)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = [weights, out / "config.json"]
    if tokenizer is not None:
        files += [Path(f) for f in tokenizer.save_pretrained(out)]
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return files


def read_pack_quantized(path: str | Path) -> dict[str, QuantizedWeight]:
    """Layer name -> codes, scales and zero points of a checkpoint written by
    :func:`save_pack_quantized` (at the group size it was written with)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    bits_of = {}
    for group in config["config_groups"].values():
        for name in group["targets"]:
            bits_of[name] = (group["weights"]["num_bits"], group["weights"]["group_size"])
    state = load_file(str(path / "model.safetensors"))
    out = {}
    for name, (bits, g) in bits_of.items():
        rows, cols = (int(x) for x in state[f"{name}.weight_shape"])
        offset = 1 << (bits - 1)
        packed = state[f"{name}.weight_packed"]
        codes = unpack_from_int32(packed, bits, torch.Size([rows, cols])).to(torch.int16)
        n = cols // g
        words = math.ceil(rows * bits / 32)  # the leading words hold the packed zero points
        zp = unpack_from_int32(
            state[f"{name}.weight_zero_point"][:words], bits, torch.Size([rows, n]), packed_dim=0
        ).to(torch.int16)
        out[name] = QuantizedWeight(
            (codes + offset).to(torch.uint8),
            state[f"{name}.weight_scale"].to(torch.float16),
            (zp + offset).to(torch.uint8),
            bits,
            g,
        )
    return out


def load_pack_quantized(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, layers)`` of a :func:`save_pack_quantized` checkpoint: a plain
    model whose quantized linears hold exactly their dequantized codes (computed in float32,
    as the search did) and carry their :class:`~evosearch.quant.Grid` as ``quant_grid``, so
    training keeps them on it; ``layers`` as :func:`read_pack_quantized` gives them."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    layers = read_pack_quantized(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    suffixes = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")
    state = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
             if not k.endswith(suffixes)}  # fmt: skip
    state.update({f"{name}.weight": q.dequantize().to(dtype) for name, q in layers.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = {k for k in missing if k.endswith("lm_head.weight") and head.weight is emb.weight}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: weights do not fit the model ({(missing + unexpected)[:3]})")
    modules = dict(model.named_modules())
    for name, q in layers.items():
        modules[name].quant_grid = q.grid
    model.eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path), layers
