"""Non-uniform per-layer quantization: one bit-width level per linear layer of the blocks.

Each block linear is a unit; its level indexes a *ladder* of formats sorted by cost:

* ``format="int"``: bit-widths (default 2, 3, 4, 5, 6, 8) of asymmetric min-max grids over
  groups of ``group_size`` input columns (see :mod:`evosearch.quant`), the codes found by
  round-to-nearest or GPTQ (its Hessians come from the one calibration pass of
  :func:`~evosearch.pruning.collect_stats`, as SparseGPT's do);
* ``format="gguf"``: the tensor types the ``gguf`` package can write (F16, Q8_0, Q5_1, Q5_0,
  Q4_1, Q4_0), quantized by ``gguf`` itself, so a candidate's weights are exactly the
  dequantized tensors of the file :func:`evosearch.export_gguf.write_gguf` deploys. Optionally
  (``gguf_embedding``) the tied token embedding / output head is a unit too.

Budget: the exact storage cost (codes, scales and zero points; or GGUF bytes) of the uniform
allocation. By default units are grouped by shape and a level switch trades one rung between two
layers of one shape, so on a ladder with equal rung gaps the bits stay exactly equal; where gaps
differ (6 -> 8 bits, or GGUF types) a switch that would exceed the budget is infeasible
(:meth:`QuantSpace.is_feasible`, which strategies skip). With ``mix_sizes`` all units form one
group and only the feasibility check, weighted by layer size, holds the budget. The reported
average bits per weight (:meth:`QuantSpace.metrics`) is counted exactly, never estimated.

All levels of all layers come from one memory-mapped :class:`~evosearch.leveldb.LevelDatabase`
of integer codes plus scales (or GGUF blocks), keyed like the sparsity databases and built into
a temporary directory, so a killed build leaves nothing behind.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evosearch import quant
from evosearch.arch import get_submodule
from evosearch.genome import Genome, LevelSpec
from evosearch.leveldb import LevelDatabase, model_fingerprint, tensor_fingerprint
from evosearch.models import cache_dir
from evosearch.operators import fill_budget, level_switch_mutation
from evosearch.pruning import LayerStats, LinearRef, block_linears, collect_stats, set_weight_
from evosearch.registry import register_space
from evosearch.space import first_changed_block

__all__ = ["GGUF_TYPES", "PROFILE_FILE", "QuantConfig", "QuantSpace", "gguf_bits"]

PROFILE_FILE = "quant_profile.json"
# what gguf (0.x) can quantize and transformers can read back, cheapest first
GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")
EMBEDDING = "model.embed_tokens"


def gguf_bits(shape: tuple[int, int], type_name: str) -> int:
    """Exact bits of an ``(out, in)`` tensor stored as GGUF ``type_name``."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    if shape[1] % block:
        raise ValueError(f"{type_name} needs rows of a multiple of {block}, got {shape}")
    return shape[0] * shape[1] // block * nbytes * 8


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What a quantization search allocates.

    Args:
        bits: ``int`` format: target average bit-width, a rung of ``ladder`` (its uniform
            allocation is the budget and the search's start).
        ladder: ``int`` format: the bit-widths a layer may take.
        group_size: input columns sharing one scale and zero point.
        quantizer: ``gptq`` or ``rtn`` (round-to-nearest).
        damp: GPTQ's damping, a fraction of the mean Hessian diagonal.
        act_order: GPTQ visits columns by decreasing Hessian diagonal (static groups).
        format: ``int`` (bit-widths, exported as compressed-tensors) or ``gguf`` (GGUF types).
        gguf_type: ``gguf`` format: the uniform type of the block linears (the budget).
        gguf_types: ``gguf`` format: the ladder, cheapest first.
        gguf_embedding: ``gguf`` format: type of the tied token embedding in the uniform file
            (llama.cpp keeps it at Q8_0); given, the embedding is a unit too and its bytes
            count. ``None``: it stays dense in search and is written as F32.
        mix_sizes: one group for all units (switches between layers of any size, the budget
            held by the feasibility check); default for ``gguf_embedding``.
    """

    bits: int | None = None
    ladder: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_size: int = 128
    quantizer: str = "gptq"
    damp: float = 0.01
    act_order: bool = False
    format: str = "int"
    gguf_type: str = "Q4_0"
    gguf_types: tuple[str, ...] = GGUF_TYPES
    gguf_embedding: str | None = None
    mix_sizes: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ladder", tuple(int(b) for b in self.ladder))
        object.__setattr__(self, "gguf_types", tuple(self.gguf_types))
        if self.format not in ("int", "gguf"):
            raise ValueError(f"format must be 'int' or 'gguf', got {self.format!r}")
        if list(self.ladder) != sorted(set(self.ladder)) or not self.ladder:
            raise ValueError(f"ladder must be increasing bit-widths, got {self.ladder}")
        if not all(1 <= b <= 8 for b in self.ladder):
            raise ValueError(f"ladder bit-widths must lie in 1..8, got {self.ladder}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.quantizer not in ("gptq", "rtn"):
            raise ValueError(f"quantizer must be 'gptq' or 'rtn', got {self.quantizer!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must lie in (0, 1), got {self.damp}")
        if self.format == "int":
            if self.bits not in self.ladder:
                raise ValueError(
                    f"bits must be a rung of the ladder {self.ladder}, got {self.bits}"
                )
            if self.gguf_embedding is not None:
                raise ValueError("gguf_embedding is for format='gguf'")
            return
        if unknown := [t for t in self.gguf_types if t not in GGUF_TYPES]:
            raise ValueError(f"gguf_types {unknown} cannot be written; choose from {GGUF_TYPES}")
        if self.gguf_type not in self.gguf_types:
            raise ValueError(f"gguf_type {self.gguf_type} is not in gguf_types {self.gguf_types}")
        if self.gguf_embedding is not None and self.gguf_embedding not in self.gguf_types:
            raise ValueError(f"gguf_embedding {self.gguf_embedding} is not in gguf_types")
        if self.gguf_embedding is not None:
            object.__setattr__(self, "mix_sizes", True)

    @property
    def levels(self) -> tuple:
        """The ladder of the format: bit-widths or GGUF type names."""
        return self.ladder if self.format == "int" else self.gguf_types

    @property
    def uniform_level(self) -> int:
        return self.levels.index(self.bits if self.format == "int" else self.gguf_type)

    def unit_bits(self, shape: tuple[int, int], level: int) -> int:
        """Exact storage bits of an ``(out, in)`` unit at ``level``."""
        if self.format == "int":
            return quant.layer_bits(shape, self.ladder[level], self.group_size)
        return gguf_bits(shape, self.gguf_types[level])


def _embedding_refs(model: nn.Module) -> tuple[LinearRef, str | None]:
    """The token embedding as a unit ``(vocab, hidden)`` and the path of the output head that
    shares its weight (``None`` when untied: only tied embeddings are supported as a unit)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if head is None or head.weight is not emb.weight:
        raise ValueError("gguf_embedding needs tied input and output embeddings")
    ref = LinearRef(names[id(emb)], -1, "embed_tokens", tuple(emb.weight.shape))
    return ref, names[id(head)]


class QuantSpace:
    """Per-layer bit-widths (or GGUF types) over a level database (see the module docstring).

    Build it with :meth:`build`; ``genome.levels[i]`` is the ladder index of ``units[i]``
    (the block linears, then the token embedding when it is a unit). Candidates are
    materialised by swapping each layer for a persistent copy whose weight is reloaded only
    when its level changed since the previous candidate.
    """

    name = "quantization"

    def __init__(
        self, units: list[LinearRef], config: QuantConfig, db: LevelDatabase, head: str | None
    ) -> None:
        self.units = units
        self.refs = [u for u in units if u.block >= 0]
        self.config_ = config
        self.db = db
        self.head = head
        c = config
        self.uniform = tuple(
            c.uniform_level if u.block >= 0 else c.gguf_types.index(c.gguf_embedding)
            for u in units
        )
        self.total_weights = sum(u.numel for u in units)
        self.budget_bits = self.total_bits(Genome(self.uniform))
        top = len(c.levels) - 1
        names = tuple(u.name.split(".", 2)[-1] if u.block >= 0 else u.kind for u in units)
        if c.mix_sizes:
            # one group whose level sum is fixed by a cost-free *slack* unit (the genome's
            # last level): a switch between a layer and the slack moves that layer alone, so
            # only the bits (is_feasible) bind, weighted by each layer's size
            cap = min(top * len(units), 36 * 36 - 1)
            self.uniform = (*self.uniform, cap - sum(self.uniform))
            self.spec = LevelSpec(
                max_levels=(top,) * len(units) + (cap,),
                groups=(0,) * (len(units) + 1),
                budgets={0: cap},
                names=(*names, "budget slack"),
            )
        else:  # switches between layers of one shape: one rung costs the same in both
            shapes = sorted({u.shape for u in units})
            groups = tuple(shapes.index(u.shape) for u in units)
            budgets: dict[int, int] = {}
            for g, lvl in zip(groups, self.uniform):
                budgets[g] = budgets.get(g, 0) + lvl
            self.spec = LevelSpec(
                max_levels=(top,) * len(units), groups=groups, budgets=budgets, names=names
            )
        self._copies: dict[str, nn.Module] = {}
        self._loaded: dict[str, int] = {}
        self._errors: list[list[float]] | None = None
        self.template: str | None = None  # GGUF whose metadata (tokenizer) exports copy

    @classmethod
    def build(
        cls,
        model: nn.Module,
        input_ids: torch.Tensor,
        config: QuantConfig,
        *,
        db_root: str | Path | None = None,
        model_id: str = "",
        log: Callable[[str], None] = print,
    ) -> QuantSpace:
        """Open (or build, then open) the level database of ``model`` quantized at every rung
        of ``config``'s ladder (GPTQ calibrated on ``input_ids``) and return the space."""
        units = block_linears(model)
        head = None
        if config.format == "gguf" and config.gguf_embedding is not None:
            emb, head = _embedding_refs(model)
            units.append(emb)
        c = config
        parts = {
            "space": "quantization",
            "model": model_fingerprint(model),
            "model_id": model_id,
            "format": c.format,
            "levels": list(c.levels),
            "units": [u.name for u in units],
        }
        parts["data"] = tensor_fingerprint(input_ids)  # the errors (and GPTQ) depend on it
        if c.format == "int":
            parts.update(group_size=c.group_size, quantizer=c.quantizer)
            if c.quantizer == "gptq":
                parts.update(damp=c.damp, act_order=c.act_order)
        root = Path(db_root) if db_root else cache_dir() / "leveldb"
        db = LevelDatabase.open_or_build(
            root,
            parts,
            [u.name for u in units],
            lambda: _levels(model, units, input_ids, c, log),
            log=log,
            extra_meta={"quant_format": c.format, "levels": list(c.levels)},
        )
        space = cls(units, config, db, head)
        space.template = gguf_template(model_id)
        return space

    def config(self) -> dict[str, Any]:
        return {
            "space": self.name,
            **asdict(self.config_),
            "n_units": len(self.units),
            "database": str(self.db.path),
            "database_bytes": self.db.size_bytes,
            "database_build_seconds": self.db.meta.get("build_seconds"),
        }

    def summary(self) -> str:
        c = self.config_
        what = (
            f"{c.bits}-bit average ({c.quantizer}, group {c.group_size}, ladder {c.ladder})"
            if c.format == "int"
            else f"GGUF at the bytes of uniform {c.gguf_type} (types {', '.join(c.gguf_types)})"
        )
        return f"{what} over {len(self.units)} units"

    # -- genomes --------------------------------------------------------------------------

    def uniform_genome(self) -> Genome:
        """Every layer at the target rung (the uniform allocation, the budget)."""
        return Genome(self.uniform)

    def random_genome(self, rng: np.random.Generator) -> Genome:
        """The uniform allocation after ``U(1, n_units)`` random level switches that keep the
        budget: EvoPress starts its search from the uniform allocation."""
        genome = self.uniform_genome()
        for _ in range(int(rng.integers(1, len(self.units) + 1))):
            nxt = level_switch_mutation(genome, self.spec, rng, 1)
            if self.is_feasible(nxt):
                genome = nxt
        return self.repair(genome)

    def repair(self, genome: Genome, rng: np.random.Generator | None = None) -> Genome:
        """``genome`` with the bits it leaves unspent spent (``mix_sizes`` only; elsewhere a
        switch keeps each group's bits, so ``genome`` itself): one rung at a time, the unit
        whose database error drops most per bit gains a rung and the slack unit loses one,
        while the budget allows (:func:`~evosearch.operators.fill_budget`). Strategies call it
        on every new genome: without it, a mutation that lowers a layer alone always fits and
        one that raises a layer alone rarely does, so a search drifts below its budget.
        Deterministic; an infeasible ``genome`` is returned unchanged."""
        if not self.config_.mix_sizes or not self.is_feasible(genome):
            return genome
        *levels, slack = genome.levels
        if self._errors is None:
            self._errors = self.level_errors()
        spare = self.budget_bits - self.total_bits(genome)
        tops = self.spec.max_levels[: len(levels)]
        # the slack's level bounds the rungs that can be added in all
        filled, _ = fill_budget(
            levels, self.unit_costs, self._errors, spare, tops, max_raises=slack
        )
        return Genome((*filled, slack - (sum(filled) - sum(levels))))

    @functools.cached_property
    def unit_costs(self) -> list[list[int]]:
        """``unit_costs[u][k]``: the exact bits of unit ``u`` at level ``k``."""
        c = self.config_
        return [[c.unit_bits(u.shape, k) for k in range(len(c.levels))] for u in self.units]

    def total_bits(self, genome: Genome) -> int:
        """Exact storage bits of the units under ``genome``."""
        return sum(c[v] for c, v in zip(self.unit_costs, genome.levels))

    def is_feasible(self, genome: Genome) -> bool:
        """Whether ``genome`` stores in no more bits than the uniform allocation."""
        return self.total_bits(genome) <= self.budget_bits

    def level_errors(self) -> list[list[float]]:
        """Per unit and level: the output error on the calibration tokens stored in the
        database (``tr(dW H dW^T) / tokens``; the greedy baseline allocates by it)."""
        n = len(self.config_.levels)
        return [[float(self.db.get(u.name, k, "err")) for k in range(n)] for u in self.units]

    def level_names(self, genome: Genome) -> list:
        """Each unit's bit-width or GGUF type."""
        return [self.config_.levels[v] for _, v in zip(self.units, genome.levels)]

    def dense_metrics(self) -> dict[str, float]:
        """The float16 model's measures (the reference point of a Pareto front)."""
        return {"bits_per_weight": 16.0, "quant_bytes": self.total_weights * 2}

    def metrics(self, genome: Genome) -> dict[str, float]:
        bits = self.total_bits(genome)
        return {"bits_per_weight": bits / self.total_weights, "quant_bytes": bits // 8}

    def describe(self, genome: Genome) -> dict[str, Any]:
        per_block: dict[int, list[int]] = {}
        for u, v in zip(self.units, genome.levels):
            acc = per_block.setdefault(u.block, [0, 0])
            acc[0] += self.config_.unit_bits(u.shape, v)
            acc[1] += u.numel
        return {
            "bits_per_weight": round(self.metrics(genome)["bits_per_weight"], 6),
            "quant_bytes": self.total_bits(genome) // 8,
            "block_bits_per_weight": [
                round(b / n, 4) for k, (b, n) in sorted(per_block.items()) if k >= 0
            ],
            "layer_levels": {u.name: lv for u, lv in zip(self.units, self.level_names(genome))},
        }

    # -- materialisation ------------------------------------------------------------------

    def level_weight(self, unit: LinearRef, level: int) -> torch.Tensor:
        """``unit``'s float32 weight ``(out, in)`` at ``level``, dequantized from the database."""
        c = self.config_
        if c.format == "int":
            get = self.db.get
            return quant.dequantize(
                get(unit.name, level, "codes"),
                get(unit.name, level, "scale"),
                get(unit.name, level, "zero"),
                c.group_size,
            )
        return _gguf_dequantize(self.db.get(unit.name, level), c.gguf_types[level], unit.shape)

    def grid(self, unit: LinearRef, level: int) -> quant.Grid | str:
        """``unit``'s grid at ``level`` (``int`` format), or ``"gguf:<type>"``, which has no
        fixed grid to train on (training-aware selection refuses it)."""
        c = self.config_
        if c.format != "int":
            return f"gguf:{c.gguf_types[level]}"
        get = self.db.get
        scale, zero = get(unit.name, level, "scale"), get(unit.name, level, "zero")
        return quant.Grid(scale, zero, c.ladder[level], c.group_size)

    def replacements(self, model: nn.Module, genome: Genome) -> dict[str, nn.Module]:
        out = {}
        for unit, level in zip(self.units, genome.levels):
            copy_ = self._copies.get(unit.name)
            if copy_ is None:
                copy_ = self._copies[unit.name] = copy.deepcopy(get_submodule(model, unit.name))
            if self._loaded.get(unit.name) != level:
                weight = self.level_weight(unit, level).to(copy_.weight.device)
                if unit.block >= 0:
                    set_weight_(copy_, weight)
                    copy_.quant_grid = self.grid(unit, level)  # training keeps it on the grid
                else:
                    with torch.no_grad():
                        copy_.weight.copy_(weight.to(copy_.weight.dtype))
                self._loaded[unit.name] = level
            out[unit.name] = copy_
            if unit.block < 0:  # the tied head shares the quantized embedding
                head = self._copies.get(self.head)
                if head is None:
                    head = self._copies[self.head] = copy.copy(get_submodule(model, self.head))
                    head._parameters = dict(head._parameters, weight=copy_.weight)
                out[self.head] = head
        return out

    def start_block(self, genome: Genome) -> int:
        return 0  # every unit is quantized at every level, block 0's layers included

    def first_difference(self, a: Genome, b: Genome) -> int:
        """The first block with a layer whose format differs between ``a`` and ``b`` (the
        embedding counts as block 0; the budget slack unit changes nothing)."""
        blocks = [max(u.block, 0) for u in self.units]
        slack = [None] * (self.spec.n_units - len(blocks))
        return first_changed_block(a, b, blocks + slack, max(u.block for u in self.units) + 1)

    def save(self, model: nn.Module, tokenizer, genome: Genome, out_dir: str) -> dict[str, Any]:
        """Write the export of ``genome`` to ``out_dir``: a compressed-tensors
        ``pack-quantized`` checkpoint (``int``) or one ``model.gguf`` file (``gguf``), plus
        ``quant_profile.json``; returns the profile (bytes on disk included)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if self.config_.format == "int":
            from evosearch.export_ct import save_pack_quantized

            files = save_pack_quantized(model, tokenizer, self._codes(genome), out)
        else:
            from evosearch.export_gguf import write_gguf

            tensors = self._gguf_tensors(genome)
            files = [write_gguf(model, tensors, out / "model.gguf", template=self.template)]
        profile = {
            **self.describe(genome),
            **self.metrics(genome),
            "file_bytes": sum(Path(f).stat().st_size for f in files),
            "export_seconds": round(time.perf_counter() - t0, 2),
            "genome": genome.key(),
            "config": asdict(self.config_),
        }
        (out / PROFILE_FILE).write_text(json.dumps(profile, indent=1) + "\n")
        return profile

    def _codes(self, genome: Genome) -> dict[str, quant.QuantizedWeight]:
        """Layer name -> its codes, scales and zero points under ``genome`` (``int``)."""
        get, g = self.db.get, self.config_.group_size
        return {
            u.name: quant.QuantizedWeight(
                get(u.name, v, "codes"),
                get(u.name, v, "scale"),
                get(u.name, v, "zero"),
                self.config_.ladder[v],
                g,
            )
            for u, v in zip(self.units, genome.levels)
        }

    def _gguf_tensors(self, genome: Genome) -> dict[str, tuple[str, np.ndarray]]:
        """Unit name -> (GGUF type, its stored blocks) under ``genome`` (``gguf``)."""
        types = self.config_.gguf_types
        return {
            u.name: (types[v], self.db.get(u.name, v).numpy())
            for u, v in zip(self.units, genome.levels)
        }


def gguf_template(model_id: str | None) -> str | None:
    """The GGUF file ``model_id`` was loaded from (a ``.gguf`` path or a built-in model)."""
    import importlib.util

    from evosearch import models

    if model_id and model_id.endswith(".gguf"):
        return model_id
    if model_id in models._BUILTIN:
        package, filename = models._BUILTIN[model_id]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            return str(Path(list(spec.submodule_search_locations)[0]) / filename)
    return None


def _gguf_quantize(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    """The GGUF blocks of ``weight`` ``(out, in)`` as bytes ``(out, row bytes)`` (uint8)."""
    import gguf

    blocks = gguf.quants.quantize(
        weight.detach().float().cpu().numpy(), gguf.GGMLQuantizationType[type_name]
    )
    return torch.from_numpy(np.ascontiguousarray(blocks).view(np.uint8).copy())


def _gguf_dequantize(blocks: torch.Tensor, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """float32 ``(out, in)`` of GGUF ``blocks`` (as stored by :func:`_gguf_quantize`)."""
    import gguf

    data = blocks.numpy()
    if type_name == "F16":
        data = data.view(np.float16)
    w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(shape)


def _levels(
    model: nn.Module,
    units: list[LinearRef],
    input_ids: torch.Tensor,
    c: QuantConfig,
    log: Callable[[str], None],
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield every unit's tensors at every rung: ``"<level>.codes/scale/zero"`` (``int``) or
    ``"<level>"`` GGUF blocks (``gguf``), and ``"<level>.err"``: the layer's output error on
    the calibration tokens, ``tr(dW H dW^T) / tokens`` with ``H = X^T X`` (what the greedy
    baseline allocates by)."""
    log(f"level database: collecting Hessians on {input_ids.numel()} tokens")
    stats = _unit_stats(model, units, input_ids)
    log(f"level database: quantizing {len(units)} units at {len(c.levels)} levels")
    for i, unit in enumerate(units):
        weight = (unit.weight(model) if unit.block >= 0 else _embedding(model, unit)).detach()
        layer = stats.pop(unit.name)
        tensors: dict[str, torch.Tensor] = {}
        factor = None
        if c.format == "int" and c.quantizer == "gptq":
            factor = quant.inverse_factor(layer, c.damp, c.act_order)
        for k, level in enumerate(c.levels):
            if c.format == "gguf":
                tensors[str(k)] = blocks = _gguf_quantize(weight, level)
                approx = _gguf_dequantize(blocks, level, unit.shape)
            else:
                q = (
                    quant.gptq(weight, level, c.group_size, factor)
                    if factor is not None
                    else quant.rtn(weight, level, c.group_size)
                )
                tensors.update({f"{k}.codes": q.codes, f"{k}.scale": q.scale, f"{k}.zero": q.zero})
                approx = q.dequantize()
            tensors[f"{k}.err"] = _output_error(weight, approx, layer)
        yield unit.name, tensors
        if (i + 1) % max(1, len(units) // 10) == 0:
            log(f"level database: {i + 1}/{len(units)} units")


def _embedding(model: nn.Module, unit: LinearRef) -> torch.Tensor:
    return get_submodule(model, unit.name).weight


def _output_error(weight: torch.Tensor, approx: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """``tr(dW H dW^T) / tokens``, the mean squared output change per token, as ``(1,)``."""
    d = (weight.float().cpu() - approx.float()).double()
    h = stats.hessian.double()
    return (torch.einsum("oi,ij,oj->", d, h, d) / max(stats.n_tokens, 1)).reshape(1)


def _unit_stats(
    model: nn.Module, units: list[LinearRef], input_ids: torch.Tensor
) -> dict[str, LayerStats]:
    """Input Hessians of the block linears and, for a tied-embedding unit, of the output
    head (the embedding's error is measured where it acts as the head's weight)."""
    emb = [u for u in units if u.block < 0]
    if not emb:
        return collect_stats(model, input_ids, hessian=True)
    head = model.get_output_embeddings()
    d = head.weight.shape[1]
    acc = LayerStats(0, torch.zeros(d), torch.zeros(d, d))

    def hook(module, args):
        x = args[0].detach().reshape(-1, d).float()
        acc.n_tokens += x.shape[0]
        acc.x_sq += (x * x).sum(0).cpu()
        acc.hessian += (x.t() @ x).cpu()

    handle = head.register_forward_pre_hook(hook)
    try:
        stats = collect_stats(model, input_ids, hessian=True)
    finally:
        handle.remove()
    stats[emb[0].name] = acc
    return stats


def build(ctx) -> QuantSpace:
    """The quantization space of a run (``ctx``: :class:`evosearch.registry.SpaceContext`);
    its level database is built once from the calibration tokens, then reused from disk."""
    return QuantSpace.build(
        ctx.model,
        ctx.input_ids,
        ctx.config,
        db_root=ctx.db_dir,
        model_id=ctx.model_id or "",
        log=ctx.log,
    )


register_space(
    "quantization",
    build,
    config=QuantConfig,
    objectives=("bits_per_weight", "quant_bytes"),
    starts_uniform=True,
)
