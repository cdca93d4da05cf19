"""Non-uniform per-layer sparsity: one level per linear layer of the blocks (EvoPress, Sec. 4.3).

Unstructured: every level step prunes the same absolute number of weights ``step`` in every
layer (``step = level_step x`` the mean layer size), so a level switch -- one layer up, another
down -- keeps the total number of pruned weights, and hence the global sparsity, exact. A layer's
*centre* level is the uniform allocation (``round(target x size)`` pruned); it may move
``max_level_shift`` levels either way, within ``[0, max_layer_sparsity]``.

N:M (``pattern="2:4"``): a layer's level picks its N in N:M (same M everywhere; the centre is
the requested N). One step changes a layer's pruned count by ``size / M``, which is the same
only for layers of the same size, so layers are grouped by size and switches stay inside a group
(as DarwinLM swaps levels only between layers of one type).

A range of targets (``sparsity_range``) uses finer, *aligned* ladders: one level is
``level_step x gcd(layer sizes)`` weights, so that each step of the range is a whole number of
levels in every layer and every target's uniform allocation is a genome (with one global step
of ``level_step x`` mean size, a small layer cannot sit at more than one target exactly).

All levels of all layers come from a :class:`~evosearch.leveldb.LevelDatabase` built once from
the dense model's calibration statistics, so any combination is a valid model. For score
pruners (magnitude, Wanda, symbolic metrics) the database holds each layer's weight and the
per-row rank of each weight's score, from which any level's mask is one comparison: its size
does not grow with the number of levels, and one database serves every target and range.
SparseGPT (which updates the kept weights) and N:M patterns store every level's weight.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evosearch.genome import Genome, LevelSpec
from evosearch.leveldb import LevelDatabase, model_fingerprint, tensor_fingerprint
from evosearch.models import cache_dir
from evosearch.operators import level_switch_mutation
from evosearch.pruning import (
    LinearRef,
    ScorePruner,
    SparseGPT,
    block_linears,
    collect_stats,
    parse_pattern,
    prune_counts,
    row_ranks,
    set_weight_,
)
from evosearch.registry import register_space
from evosearch.space import first_changed_block
from evosearch.symbolic import get_pruner

__all__ = ["PROFILE_FILE", "SparsityConfig", "SparsitySpace", "measure_sparsity"]

PROFILE_FILE = "sparsity_profile.json"
_STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class SparsityConfig:
    """What a sparsity search allocates.

    Args:
        sparsity: target average sparsity of all block linears (unstructured), in (0, 1).
        pattern: N:M pattern instead (``"2:4"``, ``"4:8"``); the target is ``1 - N/M``.
        pruner: base pruner (``magnitude``, ``wanda``, ``sparsegpt``) or a saved symbolic
            metric (a ``.json`` file).
        level_step: sparsity change per level of a layer of mean size (unstructured).
        max_level_shift: most levels a layer may move away from the uniform allocation.
        max_total_shift: most levels all layers together may move away from it (the sum of
            ``|level - uniform level|``); ``None``: no bound.
        max_layer_sparsity: no layer is pruned beyond this (unstructured).
        store_dtype: dtype of the pruned weights in the database (``float16`` halves its size;
            the model's dtype is restored when a level is swapped in).
        sparsity_range: ``(low, high)``: a multi-budget search of every average sparsity from
            ``low`` to ``high`` in steps of ``level_step`` (instead of ``sparsity``, which is
            then their midpoint's uniform allocation). The ladders are *aligned*: one level
            prunes ``level_step x gcd(layer sizes)`` weights, so every target's uniform
            allocation is a genome, and each ladder reaches the uniform allocations at both
            ends plus the weights of ``max_level_shift`` single-target levels either way.
    """

    sparsity: float | None = None
    pattern: str | None = None
    pruner: str = "wanda"
    level_step: float = 0.02
    max_level_shift: int = 6
    max_total_shift: int | None = None
    max_layer_sparsity: float = 0.95
    store_dtype: str = "float16"
    sparsity_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        nm = parse_pattern(self.pattern)
        if self.sparsity_range is not None:
            lo, hi = (float(x) for x in self.sparsity_range)
            object.__setattr__(self, "sparsity_range", (lo, hi))
            if nm is not None or self.sparsity is not None:
                raise ValueError("give sparsity_range or a target sparsity / pattern, not both")
            if not 0 < lo < hi < 1:
                raise ValueError(f"sparsity_range must satisfy 0 < low < high < 1, got {lo, hi}")
            if self.max_total_shift is not None:
                raise ValueError("max_total_shift bounds one budget; leave it unset with a range")
            if hi > self.max_layer_sparsity:
                raise ValueError(
                    f"sparsity_range ends at {hi}, above max_layer_sparsity "
                    f"{self.max_layer_sparsity}"
                )
            object.__setattr__(self, "sparsity", round((lo + hi) / 2, 12))
        if nm is None and self.sparsity is None:
            raise ValueError("give a target sparsity (e.g. 0.6) or an N:M pattern (e.g. 2:4)")
        if nm is not None and self.sparsity is not None:
            if not math.isclose(self.sparsity, 1 - nm[0] / nm[1]):
                raise ValueError(
                    f"pattern {self.pattern} means sparsity {1 - nm[0] / nm[1]:g}, "
                    f"not {self.sparsity:g}; give one of them"
                )
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must lie in (0, 1), got {self.sparsity}")
        if not 0 < self.max_layer_sparsity < 1:
            raise ValueError(
                f"max_layer_sparsity must lie in (0, 1), got {self.max_layer_sparsity}"
            )
        if nm is None and self.sparsity > self.max_layer_sparsity:
            raise ValueError(
                f"target sparsity {self.sparsity} exceeds max_layer_sparsity "
                f"{self.max_layer_sparsity}"
            )
        if not 0 < self.level_step <= 0.25:
            raise ValueError(f"level_step must lie in (0, 0.25], got {self.level_step}")
        if not 0 <= self.max_level_shift <= 17:
            raise ValueError(f"max_level_shift must lie in 0..17, got {self.max_level_shift}")
        if self.max_total_shift is not None and self.max_total_shift < 2:
            raise ValueError(
                f"max_total_shift must be >= 2 (one level switch), got {self.max_total_shift}"
            )
        if self.store_dtype not in _STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {sorted(_STORE_DTYPES)}")
        if not self.pruner.endswith(".json"):
            get_pruner(self.pruner)  # names the valid choices
        elif not Path(self.pruner).is_file():
            raise FileNotFoundError(f"pruner metric file {self.pruner} does not exist")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def budget_range(self) -> tuple[float, float] | None:
        """The range of a multi-budget search, or ``None``."""
        return self.sparsity_range

    @property
    def target(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity)


@dataclass(frozen=True)
class _Ladder:
    """Per unit: pruned weights at level 0, the level of the uniform allocation, the highest
    level, and the pruned-weight change per level (level ``k`` prunes ``round(base + k *
    step)`` weights; ``base`` and ``step`` are integers except on a range's aligned ladders)."""

    base: float
    centre: int
    top: int
    step: float

    def count(self, level: int) -> int:
        """Weights pruned at ``level``."""
        return round(self.base + level * self.step)


def _ladders(refs: list[LinearRef], config: SparsityConfig) -> list[_Ladder]:
    shift = config.max_level_shift
    nm = config.nm
    out = []
    if nm is not None:
        n, m = nm
        for ref in refs:
            if ref.shape[1] % m:
                raise ValueError(f"{ref.name}: {ref.shape[1]} inputs are not divisible by M={m}")
            step = ref.numel // m
            # level j keeps n + centre - j of every m; keep between 1 and m
            centre = min(shift, m - n)
            top = centre + min(shift, n - 1)
            out.append(_Ladder((m - n - centre) * step, centre, top, step))
        return out
    mean = sum(r.numel for r in refs) / len(refs)
    if config.sparsity_range is not None:
        return _aligned_ladders(refs, config, mean)
    step = max(1, round(config.level_step * mean))
    for ref in refs:
        uniform = round(config.target * ref.numel)
        centre = min(shift, uniform // step)
        room = max(0, math.floor(config.max_layer_sparsity * ref.numel) - uniform)
        up = min(shift, room // step)
        out.append(_Ladder(uniform - centre * step, centre, centre + up, step))
    return out


def _aligned_ladders(refs: list[LinearRef], config: SparsityConfig, mean: float) -> list[_Ladder]:
    """A range's ladders: one step of ``level_step x gcd(layer sizes)`` weights in every layer,
    so that moving from one target of the range to the next is a whole number of steps in
    every layer (``size / gcd`` of them) and *every* target's uniform allocation lies on the
    ladders, not only the middle one's. The step is finer than a single target's
    ``level_step x mean size`` (by ``mean / gcd``); the shift either way is kept the same in
    weights, i.e. ``max_level_shift x mean / gcd`` of these steps."""
    lo, hi = config.sparsity_range
    gcd = math.gcd(*(r.numel for r in refs))
    step = config.level_step * gcd
    shift = math.ceil(config.max_level_shift * config.level_step * mean / step - 1e-9)
    out = []
    for ref in refs:
        per_target = ref.numel // gcd  # steps per level_step of sparsity
        low = min(shift, math.floor(lo * ref.numel / step + 1e-9))  # level of lo's uniform
        span = math.ceil((hi - lo) / config.level_step * per_target - 1e-9)
        room = math.floor((config.max_layer_sparsity - hi) * ref.numel / step + 1e-9)
        top = low + span + max(0, min(shift, room))
        if top >= 36 * 36:
            raise ValueError(
                f"{ref.name}: a ladder of {top + 1} levels (more than {36 * 36}); use a larger "
                "level_step or a smaller max_level_shift for this range"
            )
        centre = low + round((config.target - lo) / config.level_step * per_target)
        out.append(_Ladder(lo * ref.numel - low * step, centre, top, step))
    return out


class SparsitySpace:
    """Per-layer sparsity levels over a level database (see the module docstring).

    Build it with :meth:`build`; ``genome.levels[i]`` is the level of ``refs[i]``.
    Candidates are materialised by swapping each layer for a persistent pruned copy whose
    weight is reloaded only when its level changed since the previous candidate, so one extra
    copy of the block linears is the whole memory cost.
    """

    name = "sparsity"

    def __init__(self, refs: list[LinearRef], config: SparsityConfig, db: LevelDatabase) -> None:
        self.refs = refs
        self.config_ = config
        self.db = db
        self.ladders = _ladders(refs, config)
        nm = config.nm
        if nm is None:
            groups = (0,) * len(refs)
        else:  # switches only between layers of equal size
            sizes = sorted({r.numel for r in refs})
            groups = tuple(sizes.index(r.numel) for r in refs)
        self.total_weights = sum(r.numel for r in refs)
        self._index = {r.name: i for i, r in enumerate(refs)}
        self._ranked = db.meta["parts"].get("storage") == "ranks"
        budgets: dict[int, int] = {}
        for g, lad in zip(groups, self.ladders):
            budgets[g] = budgets.get(g, 0) + lad.centre
        self.spec = LevelSpec(
            max_levels=tuple(lad.top for lad in self.ladders),
            groups=groups,
            budgets=budgets,
            names=tuple(
                r.name.split(".", 2)[-1] if r.name.count(".") > 2 else r.name for r in refs
            ),
            switch_size=self._switch_size(),
        )
        self._copies: dict[str, nn.Module] = {}
        self._loaded: dict[str, int] = {}

    def _switch_size(self) -> int:
        """Aligned range ladders are finer than ``level_step x`` mean size: a mutation switch
        moves as many of their levels as make one such step, as on a single target's ladders."""
        if self.config_.sparsity_range is None:
            return 1
        mean = self.total_weights / len(self.refs)
        return max(1, round(self.config_.level_step * mean / self.ladders[0].step))

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        input_ids: torch.Tensor,
        config: SparsityConfig,
        *,
        db_root: str | Path | None = None,
        model_id: str = "",
        log: Callable[[str], None] = print,
    ) -> SparsitySpace:
        """Open (or build, then open) the level database of ``model`` pruned by
        ``config.pruner`` on the calibration ``input_ids``, and return the space over it."""
        refs = block_linears(model)
        ladders = _ladders(refs, config)
        pruner = get_pruner(config.pruner)
        ranked = _stores_ranks(pruner, config)
        parts = {
            "model": model_fingerprint(model),
            "model_id": model_id,
            "data": tensor_fingerprint(input_ids),
            "pruner": pruner.name,
            "pruner_fingerprint": _pruner_fingerprint(config.pruner),
            "store_dtype": config.store_dtype,
        }
        if ranked:  # one database serves every ladder, range and target
            parts["storage"] = "ranks"
        else:
            parts["pattern"] = config.pattern
            parts["ladders"] = [asdict(lad) for lad in ladders]
        root = Path(db_root) if db_root else cache_dir() / "leveldb"
        dtype = _STORE_DTYPES[config.store_dtype]

        def levels() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
            log(
                f"level database: collecting statistics on {input_ids.numel()} tokens "
                f"({pruner.name})"
            )
            stats = collect_stats(
                model,
                input_ids,
                hessian=pruner.needs_hessian,
                gradients=pruner.needs_gradients,
            )
            n_levels = sum(lad.top + 1 for lad in ladders)
            if ranked:
                log(f"level database: ranking the weights of {len(refs)} layers")
            else:
                log(f"level database: pruning {len(refs)} layers at {n_levels} layer-levels")
            for i, (ref, lad) in enumerate(zip(refs, ladders)):
                weight = ref.weight(model).detach()
                layer_stats = stats.pop(ref.name)
                if ranked:
                    ranks = row_ranks(pruner.scores(weight, layer_stats)).cpu()
                    yield ref.name, {"weight": weight.to(dtype).cpu(), "rank": ranks}
                    continue
                extra = {}
                if isinstance(pruner, SparseGPT):
                    extra["factor"] = pruner.inverse_factor(layer_stats)
                tensors = {}
                for level in range(lad.top + 1):
                    target = _level_target(ref, lad, level, config.nm)
                    pruned = pruner.prune(weight, layer_stats, **target, **extra)
                    tensors[str(level)] = pruned.to(dtype).cpu()
                yield ref.name, tensors
                if (i + 1) % max(1, len(refs) // 10) == 0:
                    log(f"level database: {i + 1}/{len(refs)} layers")

        db = LevelDatabase.open_or_build(
            root,
            parts,
            [r.name for r in refs],
            levels,
            log=log,
            extra_meta={"target": config.target},
        )
        return cls(refs, config, db)

    def config(self) -> dict[str, Any]:
        return {
            "space": self.name,
            **asdict(self.config_),
            "n_layers": len(self.refs),
            "database": str(self.db.path),
        }

    def summary(self) -> str:
        c = self.config_
        if c.sparsity_range:
            target = f"{c.sparsity_range[0]:.0%}..{c.sparsity_range[1]:.0%} average sparsity"
        else:
            target = f"{c.pattern} pattern" if c.nm else f"{c.target:.0%} average sparsity"
        return (
            f"{target} over {len(self.refs)} block linears, pruner {c.pruner}, up to "
            f"{c.max_level_shift} levels from uniform"
        )

    # -- genomes --------------------------------------------------------------------------

    def uniform_genome(self) -> Genome:
        """Every layer at the target (the uniform allocation)."""
        return Genome(tuple(lad.centre for lad in self.ladders))

    def random_genome(self, rng: np.random.Generator) -> Genome:
        """The uniform allocation after ``U(1, n_layers)`` random level switches: EvoPress
        starts its search from the uniform allocation."""
        most = len(self.refs)
        if self.config_.max_total_shift is not None:
            most = min(most, self.config_.max_total_shift // 2)
        n = int(rng.integers(1, most + 1))
        return level_switch_mutation(self.uniform_genome(), self.spec, rng, n)

    def total_shift(self, genome: Genome) -> int:
        """Levels moved away from the uniform allocation, summed over layers."""
        return sum(abs(v - lad.centre) for v, lad in zip(genome.levels, self.ladders))

    def is_feasible(self, genome: Genome) -> bool:
        """Whether ``genome`` respects ``max_total_shift`` (strategies skip other genomes)."""
        bound = self.config_.max_total_shift
        return bound is None or self.total_shift(genome) <= bound

    def pruned_counts(self, genome: Genome) -> list[int]:
        """Weights pruned in each layer under ``genome`` (as planned)."""
        return [lad.count(v) for lad, v in zip(self.ladders, genome.levels)]

    def layer_sparsities(self, genome: Genome) -> list[float]:
        return [c / r.numel for c, r in zip(self.pruned_counts(genome), self.refs)]

    def range_targets(self) -> list[float]:
        """The average sparsities of a ``sparsity_range`` search: low to high in steps of
        ``level_step`` (high included)."""
        if self.config_.sparsity_range is None:
            raise ValueError("this sparsity space was built without a sparsity_range")
        lo, hi = self.config_.sparsity_range
        n = int(math.floor((hi - lo) / self.config_.level_step + 1e-9)) + 1
        targets = [round(lo + i * self.config_.level_step, 10) for i in range(n)]
        if hi - targets[-1] > 1e-9:
            targets.append(hi)
        return targets

    def range_budgets(self) -> tuple[list[dict[int, int]], list[str]]:
        """The niches of a ``sparsity_range`` search: the level budget of each of
        :meth:`range_targets`, and a label per niche."""
        targets = self.range_targets()
        base = sum(lad.base for lad in self.ladders)
        step = self.ladders[0].step
        capacity = sum(lad.top for lad in self.ladders)
        budgets = [
            min(max(round((t * self.total_weights - base) / step), 0), capacity) for t in targets
        ]
        return [{0: b} for b in budgets], [f"{t:g}" for t in targets]

    def range_uniform_genomes(self) -> list[Genome]:
        """The uniform allocation of each of :meth:`range_targets`, at its niche's budget."""
        n = len(self.refs)
        return [
            self.genome_for([t] * n, b)
            for b, t in zip(self.range_budgets()[0], self.range_targets())
        ]

    def dense_metrics(self) -> dict[str, float]:
        """The metrics of the unpruned model (the reference point of a Pareto front)."""
        return {"sparsity": 0.0, "density": 1.0, "nonzero_block_weights": self.total_weights}

    def genome_for(self, sparsities: list[float], budgets: dict[int, int] | None = None) -> Genome:
        """The valid genome closest to per-layer ``sparsities`` (e.g. an OWL allocation):
        each layer takes its nearest level, then levels are moved one at a time, where the
        rounding was worst, until every group meets its budget (``budgets``, default: the
        space's)."""
        if len(sparsities) != len(self.refs):
            raise ValueError(f"need {len(self.refs)} sparsities, got {len(sparsities)}")
        want = [
            (s * r.numel - lad.base) / lad.step
            for s, r, lad in zip(sparsities, self.refs, self.ladders)
        ]
        levels = [min(max(round(w), 0), lad.top) for w, lad in zip(want, self.ladders)]
        for g, budget in (budgets or self.spec.budgets).items():
            units = self.spec.units_of(g)
            while (excess := sum(levels[i] for i in units) - budget) != 0:
                sign = 1 if excess > 0 else -1
                movable = [i for i in units if 0 <= levels[i] - sign <= self.ladders[i].top]
                # the unit whose level is furthest from its wish in the direction of the fix
                i = max(movable, key=lambda i: sign * (levels[i] - want[i]))
                levels[i] -= sign
        return Genome(tuple(levels))

    # -- materialisation ------------------------------------------------------------------

    def replacements(self, model: nn.Module, genome: Genome) -> dict[str, nn.Module]:
        out = {}
        for ref, level in zip(self.refs, genome.levels):
            copy_ = self._copies.get(ref.name)
            if copy_ is None:
                copy_ = self._copies[ref.name] = copy.deepcopy(ref.module(model))
            if self._loaded.get(ref.name) != level:
                set_weight_(copy_, self.level_weight(ref, level).to(copy_.weight.device))
                self._loaded[ref.name] = level
            out[ref.name] = copy_
        return out

    def level_weight(self, ref: LinearRef, level: int) -> torch.Tensor:
        """``ref``'s weight ``(out, in)`` at ``level``, as the database holds it."""
        if not self._ranked:
            return self.db.get(ref.name, level)
        rows, cols = ref.shape
        count = self.ladders[self._index[ref.name]].count(level)
        counts = prune_counts(rows, cols, count / ref.numel)
        keep = self.db.get(ref.name, "rank") >= counts[:, None]
        weight = self.db.get(ref.name, "weight")
        return weight * keep.to(weight.dtype)

    def start_block(self, genome: Genome) -> int:
        pruned = [r.block for r, c in zip(self.refs, self.pruned_counts(genome)) if c]
        return min(pruned) if pruned else max(r.block for r in self.refs) + 1

    def first_difference(self, a: Genome, b: Genome) -> int:
        """The first block with a layer whose level differs between ``a`` and ``b``."""
        blocks = [r.block for r in self.refs]
        return first_changed_block(a, b, blocks, max(blocks) + 1)

    def metrics(self, genome: Genome) -> dict[str, float]:
        pruned = sum(self.pruned_counts(genome))
        return {
            "sparsity": pruned / self.total_weights,
            "density": 1 - pruned / self.total_weights,
            "nonzero_block_weights": self.total_weights - pruned,
        }

    def describe(self, genome: Genome) -> dict[str, Any]:
        counts = self.pruned_counts(genome)
        pruned: dict[int, int] = {}
        size: dict[int, int] = {}
        for ref, c in zip(self.refs, counts):
            pruned[ref.block] = pruned.get(ref.block, 0) + c
            size[ref.block] = size.get(ref.block, 0) + ref.numel
        by_block = [round(pruned[b] / size[b], 4) for b in sorted(pruned)]
        per_layer = [c / r.numel for c, r in zip(counts, self.refs)]
        return {
            "sparsity": round(self.metrics(genome)["sparsity"], 6),
            "block_sparsity": by_block,
            "layer_sparsity": {r.name: round(s, 4) for r, s in zip(self.refs, per_layer)},
        }

    def save(self, model: nn.Module, tokenizer, genome: Genome, out_dir: str) -> None:
        """Save the pruned model as a normal HF checkpoint (zeros in place) and
        ``sparsity_profile.json``, whose sparsities are measured from the saved files."""
        from evosearch.surgery import apply_replacements

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with apply_replacements(model, self.replacements(model, genome)):
            model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        measured = measure_sparsity(out, [r.name for r in self.refs])
        profile = {
            "planned_sparsity": self.metrics(genome)["sparsity"],
            **measured,
            "planned_layer_sparsity": self.describe(genome)["layer_sparsity"],
            "genome": genome.key(),
            "config": asdict(self.config_),
        }
        (out / PROFILE_FILE).write_text(json.dumps(profile, indent=1) + "\n")


def measure_sparsity(model_dir: str | Path, layers: list[str]) -> dict[str, Any]:
    """Sparsity of the named linears, counted from the ``.safetensors`` files in
    ``model_dir``: ``{"measured_sparsity": global, "measured_layer_sparsity": {...}}``."""
    from safetensors import safe_open

    wanted = {f"{name}.weight": name for name in layers}
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if key in wanted:
                    w = fh.get_tensor(key)
                    z = int((w == 0).sum())
                    per_layer[wanted[key]] = round(z / w.numel(), 6)
                    zeros, total = zeros + z, total + w.numel()
    if missing := [n for n in layers if n not in per_layer]:
        raise ValueError(f"{model_dir} lacks weights of {len(missing)} layers, e.g. {missing[0]}")
    return {"measured_sparsity": zeros / total, "measured_layer_sparsity": per_layer}


def _stores_ranks(pruner, config: SparsityConfig) -> bool:
    """Whether the database stores each layer's weight and per-row score ranks once (any
    level is then a comparison away: a fixed-size database for any number of levels) rather
    than every level's pruned weight: so for unstructured score pruners (magnitude, Wanda,
    symbolic metrics); SparseGPT updates the kept weights and N:M masks are not prefixes of
    one ranking."""
    return isinstance(pruner, ScorePruner) and config.nm is None


def _level_target(ref: LinearRef, lad: _Ladder, level: int, nm) -> dict[str, Any]:
    if nm is None:
        return {"sparsity": lad.count(level) / ref.numel}
    n, m = nm
    keep = n + lad.centre - level
    if keep == m:
        return {"sparsity": 0.0}
    return {"pattern": (keep, m)}


def _pruner_fingerprint(name: str) -> str:
    """The metric file's contents for a symbolic pruner, so an edited file rebuilds."""
    if name.endswith(".json"):
        import hashlib

        return hashlib.sha256(Path(name).read_bytes()).hexdigest()
    return name


def build(ctx) -> SparsitySpace:
    """The sparsity space of a run (``ctx``: :class:`evosearch.registry.SpaceContext`); its
    level database is built once from the calibration tokens, then reused from disk."""
    return SparsitySpace.build(
        ctx.model,
        ctx.input_ids,
        ctx.config,
        db_root=ctx.db_dir,
        model_id=ctx.model_id,
        log=ctx.log,
    )


def _niches(config: SparsityConfig, space: SparsitySpace) -> tuple[list, list[str]] | None:
    return space.range_budgets() if config.sparsity_range is not None else None


register_space(
    "sparsity",
    build,
    objectives=("density", "nonzero_block_weights", "latency"),
    config=SparsityConfig,
    starts_uniform=True,
    niches=_niches,
    range_starts=lambda *args, **kw: _baselines().range_starts(*args, **kw),
)


def _baselines():
    """The baselines module (it imports this one, so it is looked up when first needed)."""
    import importlib

    return importlib.import_module("search_spaces.sparsity_baselines")
