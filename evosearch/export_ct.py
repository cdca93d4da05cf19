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

__all__ = ["pack_layer", "quantization_config", "save_pack_quantized"]


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
