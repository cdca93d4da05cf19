"""Depth x sparsity x bit-width under one byte budget (issue 26), built as a composite space.

The genome (:class:`~evosearch.composite.CompositeSpace`) has three parts:

* ``drop``: per block, kept (0) or dropped (1), as in the layer-drop space;
* ``sparsity``: per block linear, an index into ``sparsity_levels`` (fractions pruned, 0 first),
  masks from the sparsity space's ranked level database (magnitude or Wanda scores);
* ``bits``: per block linear, an index into the quantization ladder (``int``: bit-widths with
  group scales; ``gguf``: GGUF types), as in the quantization space.

**Materialisation, exactly**: a dropped block is skipped (its linears are not built); a kept
linear's weight is ``dequantize(RTN(W * mask))``: ``W`` the dense weight as the sparsity
database stores it (float32), ``mask`` keeping the ``round((1 - s) * size)`` highest-scoring
weights spread evenly over the rows (:func:`~evosearch.pruning.prune_counts`, as the sparsity
space), then quantized on the fly by round-to-nearest on the ``int`` grid of
:mod:`evosearch.quant` (a zero lands exactly on the grid's zero point, so pruned weights stay
zero) or by the ``gguf`` package for GGUF types. GPTQ is not used: its error feedback would
refill the pruned weights. A database keyed by (sparsity, bits) would hold ``levels^2`` copies
of every layer; quantizing the pruned layer on the fly costs one RTN per changed layer.

**Bytes**: the block linears as the export format stores them: ``int`` -> the codes, float16
scales and zero points of :func:`evosearch.quant.layer_bits` per layer (compressed-tensors
``pack-quantized``); ``gguf`` -> the GGUF block bytes. A dropped block costs nothing. Both
formats store a pruned weight as a code like any other (zeros are stored *densely*), so
sparsity saves no bytes here and is counted dense: the search may still prune, but only where
pruning lowers the KL. Embeddings, norms and the head are the same in every candidate and are
not counted.

**Budget**: ``bits`` (the bytes of uniform ``bits``-bit, nothing dropped or pruned) or, for a
Pareto front, ``bits_range`` ``(low, high, step)`` in bits per block-linear weight (one niche
per value). A genome's bytes lie within one level step (the costliest bit-width step of one
layer) under its budget: the composite repair fills freed bytes with more bits and takes
missing ones from bits, so a mutation that drops a block hands its bytes to other layers.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evosearch import quant
from evosearch.arch import arch_for, get_blocks
from evosearch.composite import CompositeSpace, Part
from evosearch.genome import Genome
from evosearch.pruning import LinearRef, prune_counts, set_weight_
from evosearch.registry import register_space
from search_spaces.layer_drop import LayerDropSpace
from search_spaces.quantization import GGUF_TYPES, QuantConfig, gguf_template
from search_spaces.sparsity import SparsityConfig, SparsitySpace

__all__ = ["DIMENSIONS", "PROFILE_FILE", "JointConfig", "JointSpace"]

DIMENSIONS = ("drop", "sparsity", "bits")
PROFILE_FILE = "joint_profile.json"
DENSE_ZEROS = (
    "the export formats (compressed-tensors pack-quantized, GGUF) store pruned weights as "
    "codes like any other, so sparsity is counted dense: it saves no bytes"
)


@dataclass(frozen=True, kw_only=True)
class JointConfig:
    """What a joint search allocates.

    Args:
        bits: ``int`` format, one budget: the bytes of uniform ``bits``-bit (a ladder rung).
        bits_range: ``(low, high, step)``: one budget per bits-per-weight value from ``low``
            to ``high`` (a multi-budget search tracing the front of KL against bytes).
        dimensions: which of ``drop``, ``sparsity``, ``bits`` the search may move (``bits``
            is required: it fills the budget); the others stay at kept / dense.
        ladder, group_size, format, gguf_type, gguf_types: the bit-width dimension, as in
            the quantization space (``gguf_type``: the uniform type of a one-budget GGUF run).
        sparsity_levels: the fractions a linear may be pruned to, increasing from 0.
        pruner: ``magnitude`` or ``wanda`` (score pruners whose masks are nested).
        max_drop: most blocks dropped at once (default: half of them).
    """

    bits: int | None = None
    bits_range: tuple[float, ...] | None = None
    dimensions: tuple[str, ...] = DIMENSIONS
    ladder: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_size: int = 128
    format: str = "int"
    gguf_type: str = "Q4_0"
    gguf_types: tuple[str, ...] = GGUF_TYPES
    sparsity_levels: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    pruner: str = "wanda"
    max_drop: int | None = None

    def __post_init__(self) -> None:
        for name in ("bits_range", "dimensions", "ladder", "gguf_types", "sparsity_levels"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if unknown := sorted(set(self.dimensions) - set(DIMENSIONS)):
            raise ValueError(f"unknown dimensions {unknown}; choose from {list(DIMENSIONS)}")
        if "bits" not in self.dimensions:
            raise ValueError("dimensions must include bits: the bit-widths fill the byte budget")
        levels = self.sparsity_levels
        if not levels or levels[0] != 0 or list(levels) != sorted(set(levels)) or levels[-1] >= 1:
            raise ValueError(f"sparsity_levels must rise from 0 and stay below 1, got {levels}")
        if self.pruner not in ("magnitude", "wanda"):
            raise ValueError(f"pruner must be magnitude or wanda, got {self.pruner!r}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {self.max_drop}")
        if self.bits_range is not None:
            if self.bits is not None:
                raise ValueError("give bits (one budget) or bits_range, not both")
            if len(self.bits_range) != 3 or not 0 < self.bits_range[0] < self.bits_range[1]:
                raise ValueError(f"bits_range must be (low, high, step), got {self.bits_range}")
            if self.bits_range[2] <= 0 or len(self.range_bits()) > 36 * 36:
                raise ValueError("bits_range step must be > 0 (and give <= 1296 budgets)")
        elif self.format == "int" and self.bits is None:
            raise ValueError("give bits (e.g. 4) or bits_range (e.g. [2.5, 8, 0.5])")
        self.quant()  # validates the ladder, group size and GGUF types

    def quant(self) -> QuantConfig:
        """The bit-width dimension as the quantization space's config (RTN codes)."""
        bits = self.bits if self.bits is not None else self.ladder[0]
        return QuantConfig(
            bits=bits if self.format == "int" else None,
            ladder=self.ladder,
            group_size=self.group_size,
            quantizer="rtn",
            format=self.format,
            gguf_type=self.gguf_type,
            gguf_types=self.gguf_types,
        )

    def range_bits(self) -> list[float]:
        """The bits-per-weight of each budget of ``bits_range`` (high included)."""
        lo, hi, step = self.bits_range
        n = int(math.floor((hi - lo) / step + 1e-9)) + 1
        return [round(lo + i * step, 10) for i in range(n)]

    @property
    def budget_range(self) -> tuple[float, ...] | None:
        """The range of a multi-budget search, or ``None``."""
        return self.bits_range


class JointSpace(CompositeSpace):
    """The joint space over one model (see the module docstring); build it with :meth:`build`.

    ``refs``: the block linears (``sparsity`` and ``bits`` units, in this order); the
    ``drop`` units are the blocks. Candidates are materialised like the quantization space's:
    a persistent copy per linear, recomputed only when its (sparsity, bits) changed.
    """

    name = "joint"

    def __init__(
        self,
        refs: list[LinearRef],
        drop_space: LayerDropSpace,
        config: JointConfig,
        db,
        *,
        template: str | None = None,
    ) -> None:
        self.refs, self.drop_space, self.config_, self.db = refs, drop_space, config, db
        self.template = template
        self.quant_config = q = config.quant()
        n_levels = len(q.levels)
        self.unit_bytes = [
            [math.ceil(q.unit_bits(r.shape, b) / 8) for b in range(n_levels)] for r in refs
        ]
        self.total_weights = sum(r.numel for r in refs)
        n_blocks = drop_space.n_blocks
        on = set(config.dimensions)
        max_drop = n_blocks // 2 if config.max_drop is None else min(config.max_drop, n_blocks - 1)
        n_sparsity = len(config.sparsity_levels) - 1 if "sparsity" in on else 0
        names = tuple(r.name.split(".", 2)[-1] for r in refs)
        parts = [
            Part("drop", ((1 if "drop" in on else 0),) * n_blocks,
                 tuple(f"block.{i}" for i in range(n_blocks)), (0,) * n_blocks, limit=max_drop),
            Part("sparsity", (n_sparsity,) * len(refs), names, (0,) * len(refs)),
            Part("bits", (n_levels - 1,) * len(refs), names, (n_levels - 1,) * len(refs),
                 fills=True),
        ]  # fmt: skip
        self._bits_at = n_blocks + len(refs)  # first bits unit in the parts' levels
        self._block_units = [
            [i for i, r in enumerate(refs) if r.block == k] for k in range(n_blocks)
        ]
        budgets, labels, niche = self._budgets()
        tolerance = max(
            (c[b + 1] - c[b] for c in self.unit_bytes for b in range(n_levels - 1)), default=0
        )
        super().__init__(
            parts,
            cost=self._cost,
            delta=self._delta,
            budgets=budgets,
            tolerance=tolerance,
            niche=niche,
            labels=labels,
        )
        self._copies: dict[str, nn.Module] = {}
        self._loaded: dict[str, tuple[int, int]] = {}

    def _budgets(self) -> tuple[list[int], list[str], int]:
        c, q = self.config_, self.quant_config
        if c.bits_range is None:
            level = q.uniform_level
            total = sum(cost[level] for cost in self.unit_bytes)
            return [total], [str(q.levels[level])], 0
        values = c.range_bits()
        budgets = [math.floor(v * self.total_weights / 8) for v in values]
        lowest = sum(cost[0] for cost in self.unit_bytes)
        if budgets[0] < lowest:  # bits alone could not meet it, so no start genome would
            raise ValueError(
                f"bits_range starts at {values[0]:g} bits per weight, below uniform "
                f"{q.levels[0]} ({8 * lowest / self.total_weights:.4g}); start the range there"
            )
        return budgets, [f"{v:g}" for v in values], len(values) // 2

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        input_ids: torch.Tensor,
        config: JointConfig,
        *,
        db_root: str | Path | None = None,
        model_id: str = "",
        log: Callable[[str], None] = print,
    ) -> JointSpace:
        """The joint space of ``model``: the sparsity space's ranked level database (its
        weights in float32, the masks' scores from ``input_ids``) plus the layer-drop space."""
        sparsity = SparsitySpace.build(
            model,
            input_ids,
            SparsityConfig(sparsity=0.5, pruner=config.pruner, store_dtype="float32"),
            db_root=db_root,
            model_id=model_id,
            log=log,
        )
        drop_space = LayerDropSpace(len(get_blocks(model)), num_drop=0)
        template = gguf_template(model_id) if config.format == "gguf" else None
        return cls(sparsity.refs, drop_space, config, sparsity.db, template=template)

    def config(self) -> dict[str, Any]:
        return {
            "space": self.name,
            **asdict(self.config_),
            "budgets_bytes": list(self.budgets),
            "tolerance_bytes": self.tolerance,
            "database": str(self.db.path),
            "sparse_storage": DENSE_ZEROS,
        }

    def summary(self) -> str:
        c = self.config_
        budget = (
            f"{len(self.budgets)} byte budgets of {c.bits_range[0]:g}..{c.bits_range[1]:g} "
            "bits per weight"
            if c.bits_range
            else f"the bytes of uniform {self.labels[0]} ({self.budgets[0]} B)"
        )
        return (
            f"joint {'+'.join(c.dimensions)} over {self.drop_space.n_blocks} blocks and "
            f"{len(self.refs)} linears at {budget}, within {self.tolerance} B"
        )

    # -- bytes ----------------------------------------------------------------------------

    def _cost(self, parts) -> int:
        drop, bits = parts["drop"], parts["bits"]
        return sum(c[b] for r, c, b in zip(self.refs, self.unit_bytes, bits) if not drop[r.block])

    def _delta(self, levels: Sequence[int], u: int, step: int) -> int:
        """Bytes of moving unit ``u`` of the parts' levels by ``step``: a block's drop frees
        its linears' bytes (a restore takes them), a bit-width moves its linear's bytes when
        its block is kept, and a sparsity level moves none (zeros are stored densely)."""
        n_blocks = self.drop_space.n_blocks
        if u < n_blocks:
            bits = levels[self._bits_at :]
            block = sum(self.unit_bytes[i][bits[i]] for i in self._block_units[u])
            return -step * block
        i = u - self._bits_at
        if i < 0 or levels[self.refs[i].block]:
            return 0  # a sparsity unit, or a linear of a dropped block
        cost, b = self.unit_bytes[i], levels[u]
        return cost[b + step] - cost[b]

    def uniform_genome(self) -> Genome:
        """Nothing dropped or pruned, the bits dealt evenly to the budget (for a one-budget
        ``int`` run: exactly uniform ``bits``)."""
        return self.start_genome()

    def range_starts(self, drop_order: Sequence[int] = ()) -> list[Genome]:
        """The bits-only start of every budget of a range and, given ``drop_order`` (blocks,
        least important first, e.g. by ShortGPT's block influence) while blocks may drop,
        per budget the starts that drop its first 10, 20 and 30 % of the blocks (at most
        ``max_drop``), their bytes dealt to the bits. These are the points where depth pays
        for bits, which single mutations reach slowly from a bits-only start: at 2.66 bits
        per weight on SmolLM2, the bits-only start scores KL 6.5, and dropping 6 middle
        blocks for more bits 2.4."""
        starts = [self.start_genome(k) for k in range(len(self.budgets))]
        drop = next(p for p in self.parts if p.name == "drop")
        if not drop_order or not any(drop.max_levels):
            return starts
        n = len(drop.max_levels)
        counts = sorted({min(round(f * n), drop.limit or n) for f in (0.1, 0.2, 0.3)} - {0})
        for k in range(len(self.budgets)):
            for d in counts:
                levels = {p.name: p.start for p in self.parts}
                levels["drop"] = tuple(int(i in drop_order[:d]) for i in range(n))
                genome = self.repair(self.join(levels, k))
                if self.is_feasible(genome) and genome not in starts:
                    starts.append(genome)
        return starts

    # -- records --------------------------------------------------------------------------

    def dropped(self, genome: Genome) -> list[int]:
        return [i for i, d in enumerate(self.split(genome)["drop"]) if d]

    def dense_metrics(self) -> dict[str, float]:
        """The float16 model's measures (the reference point of a Pareto front)."""
        return {
            "bytes": 2 * self.total_weights,
            "bits_per_weight": 16.0,
            "blocks_kept": self.drop_space.n_blocks,
            "sparsity": 0.0,
        }

    def metrics(self, genome: Genome) -> dict[str, float]:
        parts = self.split(genome)
        nbytes = self._cost(parts)
        kept = [not parts["drop"][r.block] for r in self.refs]
        pruned = sum(self._pruned(i, s) for i, s in enumerate(parts["sparsity"]) if kept[i])
        kept_weights = sum(r.numel for r, k in zip(self.refs, kept) if k)
        return {
            "bytes": nbytes,
            "bits_per_weight": 8 * nbytes / self.total_weights,
            "blocks_kept": self.drop_space.n_blocks - sum(parts["drop"]),
            "sparsity": pruned / max(kept_weights, 1),
        }

    def _pruned(self, i: int, level: int) -> int:
        return round(self.config_.sparsity_levels[level] * self.refs[i].numel)

    def describe(self, genome: Genome) -> dict[str, Any]:
        """Where the bytes went: per block kept or dropped, its bytes, sparsity and bits per
        weight, and per linear its sparsity and bit-width."""
        parts = self.split(genome)
        drop, sparsity, bits = parts["drop"], parts["sparsity"], parts["bits"]
        levels = self.quant_config.levels
        blocks = []
        for k in range(self.drop_space.n_blocks):
            idx = [i for i, r in enumerate(self.refs) if r.block == k]
            size = sum(self.refs[i].numel for i in idx)
            nbytes = sum(self.unit_bytes[i][bits[i]] for i in idx)
            blocks.append(
                {
                    "block": k,
                    "kept": not drop[k],
                    "bytes": 0 if drop[k] else nbytes,
                    "sparsity": round(sum(self._pruned(i, sparsity[i]) for i in idx) / size, 4),
                    "bits_per_weight": round(8 * nbytes / size, 3),
                }
            )
        return {
            **{k: round(v, 6) for k, v in self.metrics(genome).items()},
            "dropped_blocks": [b["block"] for b in blocks if not b["kept"]],
            "blocks": blocks,
            "layer_levels": {
                r.name: [self.config_.sparsity_levels[s], levels[b]]
                for r, s, b in zip(self.refs, sparsity, bits)
            },
        }

    # -- materialisation ------------------------------------------------------------------

    def layer(self, i: int, sparsity: int, bits: int) -> tuple[torch.Tensor, Any]:
        """Linear ``i`` pruned to ``sparsity_levels[sparsity]`` and quantized at ladder rung
        ``bits``: its float32 weight ``(out, in)`` and its stored form (``int``: a
        :class:`~evosearch.quant.QuantizedWeight`; ``gguf``: the GGUF blocks as uint8)."""
        ref = self.refs[i]
        weight = self.db.get(ref.name, "weight").float()
        if sparsity:
            counts = prune_counts(*ref.shape, self.config_.sparsity_levels[sparsity])
            weight = weight * (self.db.get(ref.name, "rank") >= counts[:, None])
        q = self.quant_config
        if q.format == "int":
            codes = quant.rtn(weight, q.ladder[bits], q.group_size)
            return codes.dequantize(), codes
        from evosearch.export_gguf import dequantized

        blocks = _gguf_blocks(weight, q.gguf_types[bits])
        return dequantized(blocks, q.gguf_types[bits]).reshape(ref.shape), blocks

    def replacements(self, model: nn.Module, genome: Genome) -> dict[str, nn.Module]:
        parts = self.split(genome)
        drop = parts["drop"]
        out = self.drop_space.replacements(model, Genome(drop))
        for i, ref in enumerate(self.refs):
            if drop[ref.block]:
                continue
            copy_ = self._copies.get(ref.name)
            if copy_ is None:
                copy_ = self._copies[ref.name] = copy.deepcopy(ref.module(model))
            key = (parts["sparsity"][i], parts["bits"][i])
            if self._loaded.get(ref.name) != key:
                set_weight_(copy_, self.layer(i, *key)[0].to(copy_.weight.device))
                self._loaded[ref.name] = key
            out[ref.name] = copy_
        return out

    def start_block(self, genome: Genome) -> int:
        return 0  # every linear is quantized, block 0's included

    def save(self, model: nn.Module, tokenizer, genome: Genome, out_dir: str) -> dict[str, Any]:
        """Export ``genome`` with its dropped blocks removed: compressed-tensors
        ``pack-quantized`` (``int``) or one ``model.gguf`` (``gguf``), plus
        ``joint_profile.json`` (where the bytes went, and the bytes on disk)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        parts = self.split(genome)
        dropped = set(self.dropped(genome))
        stored = {
            i: self.layer(i, parts["sparsity"][i], parts["bits"][i])[1]
            for i, r in enumerate(self.refs)
            if r.block not in dropped
        }
        if self.quant_config.format == "int":
            files = self._save_ct(model, tokenizer, stored, dropped, out)
        else:
            from evosearch.export_gguf import write_gguf

            types = self.quant_config.gguf_types
            tensors = {
                self.refs[i].name: (types[parts["bits"][i]], blocks)
                for i, blocks in stored.items()
            }
            path = write_gguf(
                model, tensors, out / "model.gguf", template=self.template, dropped_blocks=dropped
            )
            files = [path]
        profile = {
            **self.describe(genome),
            "file_bytes": sum(Path(f).stat().st_size for f in files),
            "sparse_storage": DENSE_ZEROS,
            "export_seconds": round(time.perf_counter() - t0, 2),
            "genome": genome.key(),
            "config": asdict(self.config_),
        }
        (out / PROFILE_FILE).write_text(json.dumps(profile, indent=1) + "\n")
        return profile

    def _save_ct(self, model, tokenizer, stored: dict, dropped: set[int], out: Path) -> list:
        from evosearch.export_ct import save_pack_quantized
        from evosearch.models import remove_blocks

        path = arch_for(model).blocks
        keep = [k for k in range(self.drop_space.n_blocks) if k not in dropped]
        renumber = {old: new for new, old in enumerate(keep)}
        layers = {
            f"{path}.{renumber[self.refs[i].block]}.{self.refs[i].kind}": q
            for i, q in stored.items()
        }
        shrunk = remove_blocks(copy.deepcopy(model), dropped) if dropped else model
        return save_pack_quantized(shrunk, tokenizer, layers, out)


def _gguf_blocks(weight: torch.Tensor, type_name: str) -> np.ndarray:
    """The GGUF blocks of ``weight`` ``(out, in)`` as uint8 rows (F16 as its bytes)."""
    import gguf

    blocks = gguf.quants.quantize(
        weight.detach().float().cpu().numpy(), gguf.GGMLQuantizationType[type_name]
    )
    return np.ascontiguousarray(blocks).view(np.uint8)


def build(ctx) -> JointSpace:
    """The joint space of a run (``ctx``: :class:`evosearch.registry.SpaceContext`)."""
    return JointSpace.build(
        ctx.model,
        ctx.input_ids,
        ctx.config,
        db_root=ctx.db_dir,
        model_id=ctx.model_id or "",
        log=ctx.log,
    )


def _niches(config: JointConfig, space: JointSpace) -> tuple[list, list[str]] | None:
    return space.range_budgets() if config.bits_range is not None else None


def _range_starts(problem, warm_start, log) -> tuple[tuple, tuple, dict]:
    """Every budget starts from its bits-only allocation (nothing dropped or pruned) and,
    when blocks may drop, from drops of the blocks of least ShortGPT influence on the
    calibration data (see :meth:`JointSpace.range_starts`)."""
    space = problem.space
    order: list[int] = []
    if "drop" in space.config_.dimensions:
        from search_spaces.layer_drop_baselines import calibration_boundaries, influence_order

        order = influence_order(calibration_boundaries(problem))
    return tuple(space.range_starts(order)), (), {}


register_space(
    "joint",
    build,
    config=JointConfig,
    objectives=("bytes", "bits_per_weight", "blocks_kept", "latency"),
    starts_uniform=True,
    niches=_niches,
    range_starts=_range_starts,
)
