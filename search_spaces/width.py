"""Structured width search: how many KV head groups and MLP channels each block keeps
(DarwinLM, Tang et al. 2025), with ZipLM-style compensated output projections
(Kurtic et al. 2023).

Units and levels. Per block there is one attention unit, whose level is the number of KV groups
removed (``0..n_kv``; a KV group is one key/value head and the query heads sharing it, so
grouped-query attention stays valid), and one MLP unit, whose level is the number of channel
chunks removed (``0..mlp_levels``, each chunk ``intermediate / mlp_levels`` channels). One
level step removes the same number of parameters in every unit of a kind, so the attention
units form one group and the MLP units another, each with an exact level budget, and EvoPress's
level switches (one unit up, one of the *same kind* down) keep the budget exact. The top level
drops the sublayer; a block with both sublayers dropped is removed, so depth and width are
searched jointly in one genome (``allow_drop=False`` keeps at least one KV group and one chunk).

Database. From one calibration pass of the dense model, the input Hessian ``H = X^T X`` of
every ``o_proj`` / ``down_proj`` gives, per block, a nested removal order and, per level, the
least-squares output projection on the kept inputs, ``W_K = W H[:, K] (H[K, K] + λI)^-1``
(the best reconstruction of the dense output from the kept inputs). The order is greedy OBS:
at each level the structures (KV groups, or single channels) whose removal, after optimal
compensation of the rest, raises the reconstruction error least, ``tr(W_S (H^-1)_SS^-1
W_S^T)``, go (ZipLM, Alg. 1; channels of one level are taken together). Levels are stored in
a :class:`~evosearch.leveldb.LevelDatabase` keyed by a hash of model, calibration tokens and
settings, and reused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evosearch.arch import arch_for, get_blocks, get_submodule
from evosearch.genome import Genome, LevelSpec
from evosearch.leveldb import LevelDatabase, model_fingerprint, tensor_fingerprint
from evosearch.models import cache_dir, remove_blocks
from evosearch.operators import random_genome
from evosearch.pruning import collect_stats
from evosearch.registry import register_baseline, register_space
from evosearch.shrink import (
    AttentionGeometry,
    MaskedLinear,
    geometry,
    n_params,
    save_shrunk,
    shrink_block_,
)
from evosearch.space import first_changed_block
from evosearch.surgery import ZeroAttention, ZeroOutput

__all__ = ["WidthConfig", "WidthDatabase", "WidthSpace", "obs_levels"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class WidthConfig:
    """Settings of the width space.

    Args:
        target: fraction of the block parameters (attention + MLP projections) to remove.
        attention_target: fraction of the attention parameters to remove (default ``target``;
            the MLP fraction is then chosen so the total matches ``target``).
        mlp_levels: MLP levels per block; must divide the intermediate size (SmolLM2: 16
            levels of 96 channels).
        allow_drop: whether a unit may reach its top level (whole sublayer removed).
        damp: Hessian damping, relative to the mean diagonal (as in SparseGPT / ZipLM).
        db_dtype: storage dtype of the compensated projections (``float16`` halves the disk).
    """

    target: float = 0.5
    attention_target: float | None = None
    mlp_levels: int = 16
    allow_drop: bool = True
    damp: float = 0.01
    db_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not 0 <= self.target < 1:
            raise ValueError(f"target must lie in [0, 1), got {self.target}")
        if self.attention_target is not None and not 0 <= self.attention_target <= 1:
            raise ValueError(f"attention_target must lie in [0, 1], got {self.attention_target}")
        if not 1 <= self.mlp_levels <= 35:
            raise ValueError(f"mlp_levels must lie in 1..35, got {self.mlp_levels}")
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0, got {self.damp}")
        if self.db_dtype not in _DTYPES:
            raise ValueError(f"db_dtype must be one of {sorted(_DTYPES)}, got {self.db_dtype!r}")


# -- database --------------------------------------------------------------------------------


def _paths(model: nn.Module) -> tuple[str, str, str, str]:
    """Block-relative ``(attention, attention output projection, MLP, MLP output projection)``
    paths, from the roles of the architecture's projections (``o`` and ``down``)."""
    roles = arch_for(model).roles
    o, down = roles["o"], roles["down"]
    return o.rpartition(".")[0], o, down.rpartition(".")[0], down


def _projection_hessians(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Per block, the input Hessians ``X^T X`` (float64) of the attention and MLP output
    projections: ``{(block, "attn" | "mlp"): (in, in)}``."""
    path = arch_for(model).blocks
    _, attn_out, _, mlp_out = _paths(model)
    names = {
        (i, kind): f"{path}.{i}.{out}"
        for i in range(len(get_blocks(model)))
        for kind, out in (("attn", attn_out), ("mlp", mlp_out))
    }
    stats = collect_stats(
        model, input_ids, hessian=True, layers=set(names.values()), dtype=torch.float64
    )
    return {key: stats[name].hessian for key, name in names.items()}


def obs_levels(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    structures: list[torch.Tensor],
    per_level: int,
    damp: float,
) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy nested removal with optimal compensation (ZipLM, Alg. 1).

    Args:
        weight: ``(out, in)`` dense weight; hessian: ``(in, in)`` input ``X^T X``.
        structures: input-column index sets that are removed as a whole.
        per_level: structures removed per level.
        damp: ``λ`` relative to the mean Hessian diagonal.

    Returns:
        For every level ``1..len(structures) // per_level - 1`` (the top level keeps nothing):
        ``(kept structure ids, compensated weight on their columns (out, kept columns))``.
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    h += damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    kept = list(range(len(structures)))
    out = []
    n_levels = len(structures) // per_level
    for _ in range(n_levels - 1):
        scores = []
        for s in kept:
            idx = structures[s]
            block = hinv[idx][:, idx]
            ws = w[:, idx]
            scores.append(torch.einsum("oi,ij,oj->", ws, torch.linalg.inv(block), ws).item())
        order = np.argsort(np.asarray(scores), kind="stable")[:per_level]
        removed = [kept[k] for k in order]
        cols = torch.cat([structures[s] for s in removed])
        block_inv = torch.linalg.inv(hinv[cols][:, cols])  # (|S|, |S|)
        w -= w[:, cols] @ block_inv @ hinv[cols]  # OBS update of the remaining columns
        hinv -= hinv[:, cols] @ block_inv @ hinv[cols]
        w[:, cols] = 0
        kept = [s for s in kept if s not in set(removed)]
        cols_kept = torch.cat([structures[s] for s in sorted(kept)])
        out.append((sorted(kept), w[:, cols_kept].clone()))
    return out


def _channel_levels(weight, hessian, per_level: int, damp: float):
    """:func:`obs_levels` for single MLP channels, vectorised (scores ``w_j^2 / Hinv_jj``)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    n = w.shape[1]
    alive = torch.ones(n, dtype=torch.bool)
    out = []
    for _ in range(n // per_level - 1):
        scores = (w * w).sum(0) / hinv.diagonal().clamp_min(1e-30)
        scores[~alive] = math.inf
        cols = torch.argsort(scores, stable=True)[:per_level]
        block_inv = torch.linalg.inv(hinv[cols][:, cols])
        w -= w[:, cols] @ block_inv @ hinv[cols]
        hinv -= hinv[:, cols] @ block_inv @ hinv[cols]
        w[:, cols] = 0
        hinv[cols, :] = 0
        hinv[:, cols] = 0
        hinv[cols, cols] = 1.0  # keeps removed channels inert in later solves
        alive[cols] = False
        keep = alive.nonzero().flatten()
        out.append((keep.tolist(), w[:, keep].clone()))
    return out


class WidthDatabase:
    """The pre-computed levels of every block: kept KV groups / channels and the compensated
    ``o_proj`` / ``down_proj`` weights, in a :class:`~evosearch.leveldb.LevelDatabase`.

    Units ``attn.{block}`` and ``mlp.{block}``; tensors ``{level}.keep`` and ``{level}.weight``
    for levels strictly between 0 (dense) and the top (sublayer dropped). Keyed, built
    atomically and memory-mapped as every level database.
    """

    def __init__(self, db: LevelDatabase) -> None:
        self.db = db

    @property
    def path(self) -> Path:
        return self.db.path

    @property
    def meta(self) -> dict:
        return self.db.meta

    def keep(self, kind: str, block: int, level: int) -> list[int]:
        """Kept KV groups (``kind="attn"``) or MLP channels (``"mlp"``) of a block's level."""
        return self.db.get(f"{kind}.{block}", level, "keep").tolist()

    def weight(self, kind: str, block: int, level: int) -> torch.Tensor:
        """The compensated output projection ``(hidden, kept inputs)`` of a block's level."""
        return self.db.get(f"{kind}.{block}", level, "weight")

    @classmethod
    def open_or_build(
        cls,
        model: nn.Module,
        input_ids: torch.Tensor,
        config: WidthConfig,
        *,
        root: str | Path | None = None,
        log: Callable[[str], None] = print,
    ) -> WidthDatabase:
        """The database for (model, calibration tokens, settings); built on first use."""
        geo = geometry(model)
        parts = {
            "kind": "width",
            "model": model_fingerprint(model),
            "data": tensor_fingerprint(input_ids),
            "mlp_levels": config.mlp_levels,
            "damp": config.damp,
            "dtype": config.db_dtype,
        }
        n_blocks = len(get_blocks(model))
        units = [f"{kind}.{i}" for i in range(n_blocks) for kind in ("attn", "mlp")]

        def build() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
            log(f"width database: Hessians from {input_ids.numel()} calibration tokens")
            hess = _projection_hessians(model, input_ids)
            _, attn_out, _, mlp_out = _paths(model)
            dtype = _DTYPES[config.db_dtype]
            heads = [geo.query_columns([g]) for g in range(geo.n_kv)]
            chunk = geo.intermediate // config.mlp_levels
            for i, block in enumerate(get_blocks(model)):
                o = get_submodule(block, attn_out).weight.detach().float().cpu()
                levels = obs_levels(o, hess[i, "attn"], heads, 1, config.damp)
                yield f"attn.{i}", _level_tensors(levels, dtype)
                down = get_submodule(block, mlp_out).weight.detach().float().cpu()
                levels = _channel_levels(down, hess[i, "mlp"], chunk, config.damp)
                yield f"mlp.{i}", _level_tensors(levels, dtype)

        root = Path(root) if root is not None else cache_dir() / "leveldb"
        db = LevelDatabase.open_or_build(
            root,
            parts,
            units,
            build,
            log=log,
            extra_meta={"geometry": asdict(geo), "calibration_tokens": int(input_ids.numel())},
        )
        return cls(db)


def _level_tensors(levels, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{level}.keep`` / ``{level}.weight`` tensors of levels 1, 2, ... of one unit."""
    out = {}
    for level, (keep, w) in enumerate(levels, start=1):
        out[f"{level}.keep"] = torch.tensor(keep, dtype=torch.long)
        out[f"{level}.weight"] = w.to(dtype).contiguous()
    return out


# -- the space -------------------------------------------------------------------------------


class WidthSpace:
    """Genomes with one attention unit and one MLP unit per block (see the module docstring).

    Build with :meth:`build` (which opens or builds the database).

    Args:
        geo: head layout; n_blocks: blocks; config: :class:`WidthConfig`.
        db: level database (``None`` only for spec / metric queries).
        total_params: parameters of the model (default: those of the block projections).
    """

    name = "width"

    def __init__(
        self,
        geo: AttentionGeometry,
        n_blocks: int,
        config: WidthConfig,
        *,
        db: WidthDatabase | None = None,
        total_params: int | None = None,
    ) -> None:
        if geo.intermediate % config.mlp_levels:
            raise ValueError(
                f"mlp_levels={config.mlp_levels} does not divide the intermediate size "
                f"{geo.intermediate}"
            )
        if geo.n_kv > 35:
            raise ValueError(f"{geo.n_kv} KV groups exceed the 35 levels a genome digit holds")
        self.geo, self.n_blocks, self.settings, self.db = geo, n_blocks, config, db
        d = geo.hidden
        # one attention level: q and o rows/columns of group_size heads, k and v rows of one
        self.attn_step = (2 * geo.group_size + 2) * geo.head_dim * d
        self.mlp_step = 3 * d * geo.intermediate // config.mlp_levels
        self.block_params = n_blocks * (
            geo.n_kv * self.attn_step + config.mlp_levels * self.mlp_step
        )
        self.total_params = total_params or self.block_params
        top_a = geo.n_kv if config.allow_drop else geo.n_kv - 1
        top_m = config.mlp_levels if config.allow_drop else config.mlp_levels - 1
        budgets = self._budgets(top_a, top_m)
        self.spec = LevelSpec(
            max_levels=(top_a,) * n_blocks + (top_m,) * n_blocks,
            groups=(0,) * n_blocks + (1,) * n_blocks,
            budgets=budgets,
            names=tuple(f"attn.{i}" for i in range(n_blocks))
            + tuple(f"mlp.{i}" for i in range(n_blocks)),
        )

    def _budgets(self, top_a: int, top_m: int) -> dict[int, int]:
        c, n, geo = self.settings, self.n_blocks, self.geo
        attn_total = n * geo.n_kv * self.attn_step
        mlp_total = n * c.mlp_levels * self.mlp_step
        a_frac = c.target if c.attention_target is None else c.attention_target
        a_levels = round(a_frac * n * geo.n_kv)
        removed_attn = a_levels * self.attn_step
        m_levels = round((c.target * (attn_total + mlp_total) - removed_attn) / self.mlp_step)
        if not 0 <= a_levels <= n * top_a or not 0 <= m_levels <= n * top_m:
            raise ValueError(
                f"target {c.target} with attention_target {a_frac} is impossible: it needs "
                f"{a_levels} of {n * top_a} attention levels and {m_levels} of {n * top_m} "
                f"MLP levels"
                + ("" if c.allow_drop else " (allow_drop=False keeps one group and one chunk)")
            )
        return {0: a_levels, 1: m_levels}

    @classmethod
    def build(
        cls,
        model: nn.Module,
        input_ids: torch.Tensor,
        config: WidthConfig,
        *,
        db_root: str | Path | None = None,
        log: Callable[[str], None] = print,
    ) -> WidthSpace:
        """The space for ``model``, with its database opened or built from ``input_ids``."""
        geo = geometry(model)
        n_blocks = len(get_blocks(model))
        cls(geo, n_blocks, config)  # an impossible budget fails before the database is built
        db = WidthDatabase.open_or_build(model, input_ids, config, root=db_root, log=log)
        return cls(geo, n_blocks, config, db=db, total_params=n_params(model))

    def config(self) -> dict[str, Any]:
        return {"space": self.name, "n_blocks": self.n_blocks, **asdict(self.settings)}

    # -- encoding -----------------------------------------------------------------------

    def levels(self, genome: Genome) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(attention levels, MLP levels)`` per block."""
        n = self.n_blocks
        return genome.levels[:n], genome.levels[n:]

    def random_genome(self, rng: np.random.Generator) -> Genome:
        return random_genome(self.spec, rng)

    def dense_genome(self) -> Genome:
        return Genome((0,) * self.spec.n_units)

    def uniform_genome(self) -> Genome:
        """Every block pruned alike; where a budget does not divide evenly, the extra levels go
        to evenly spaced blocks (the same budget as the search)."""
        levels: list[int] = []
        for g in (0, 1):
            budget, n = self.spec.budgets[g], self.n_blocks
            base, extra = divmod(budget, n)
            bonus = {int(k * n / extra) for k in range(extra)} if extra else set()
            levels += [base + (i in bonus) for i in range(n)]
        return Genome(tuple(levels))

    # -- materialisation ------------------------------------------------------------------

    def kept(self, genome: Genome, block: int) -> tuple[list[int], list[int]]:
        """Kept KV groups and MLP channels of ``block``."""
        a, m = self.levels(genome)
        geo = self.geo
        if a[block] == 0:
            groups = list(range(geo.n_kv))
        elif a[block] == geo.n_kv:
            groups = []
        else:
            groups = self._db().keep("attn", block, a[block])
        if m[block] == 0:
            channels = list(range(geo.intermediate))
        elif m[block] == self.settings.mlp_levels:
            channels = []
        else:
            channels = self._db().keep("mlp", block, m[block])
        return groups, channels

    def _db(self) -> WidthDatabase:
        if self.db is None:
            raise RuntimeError("this WidthSpace has no database; build it with WidthSpace.build")
        return self.db

    def replacements(self, model: nn.Module, genome: Genome) -> dict[str, nn.Module]:
        path = arch_for(model).blocks
        attn, attn_out, mlp, mlp_out = _paths(model)
        blocks = get_blocks(model)
        a, m = self.levels(genome)
        out: dict[str, nn.Module] = {}
        for i in range(self.n_blocks):
            if a[i] == self.geo.n_kv:
                out[f"{path}.{i}.{attn}"] = ZeroAttention()
            elif a[i]:
                cols = self.geo.query_columns(self.kept(genome, i)[0])
                o = get_submodule(blocks[i], attn_out)
                out[f"{path}.{i}.{attn_out}"] = _masked(
                    o, cols, self._db().weight("attn", i, a[i])
                )
            if m[i] == self.settings.mlp_levels:
                out[f"{path}.{i}.{mlp}"] = ZeroOutput(self.geo.hidden)
            elif m[i]:
                cols = torch.tensor(self.kept(genome, i)[1], dtype=torch.long)
                down = get_submodule(blocks[i], mlp_out)
                out[f"{path}.{i}.{mlp_out}"] = _masked(
                    down, cols, self._db().weight("mlp", i, m[i])
                )
        return out

    def first_difference(self, a: Genome, b: Genome) -> int:
        """The first block whose attention or MLP width differs between ``a`` and ``b``."""
        blocks = list(range(self.n_blocks)) * 2
        return first_changed_block(a, b, blocks, self.n_blocks)

    def start_block(self, genome: Genome) -> int:
        a, m = self.levels(genome)
        changed = [i for i in range(self.n_blocks) if a[i] or m[i]]
        return changed[0] if changed else self.n_blocks

    # -- reporting ------------------------------------------------------------------------

    def metrics(self, genome: Genome) -> dict[str, float]:
        """Block parameters removed (exact), their share, and the model's parameters left."""
        a, m = self.levels(genome)
        removed = sum(a) * self.attn_step + sum(m) * self.mlp_step
        params = self.total_params - removed
        return {
            "params": params,
            "params_fraction": params / self.total_params,
            "block_params_removed": removed / self.block_params,
            "blocks_kept": sum(
                1
                for i in range(self.n_blocks)
                if a[i] < self.geo.n_kv or m[i] < self.settings.mlp_levels
            ),
        }

    def describe(self, genome: Genome) -> dict[str, Any]:
        a, m = self.levels(genome)
        chunk = self.geo.intermediate // self.settings.mlp_levels
        return {
            "kv_heads_kept": [self.geo.n_kv - v for v in a],
            "mlp_channels_kept": [self.geo.intermediate - v * chunk for v in m],
        }

    def summary(self) -> str:
        return (
            f"width: remove {self.settings.target:.0%} of block parameters in {self.n_blocks} "
            f"blocks ({self.spec.budgets[0]} of {self.n_blocks * self.geo.n_kv} KV-group "
            f"levels, {self.spec.budgets[1]} of {self.n_blocks * self.settings.mlp_levels} MLP "
            "levels)"
        )

    # -- export ---------------------------------------------------------------------------

    def shrink(self, model: nn.Module, genome: Genome) -> nn.Module:
        """A physically smaller copy of ``model`` for ``genome`` (``model`` is unchanged):
        sliced projections with the database's compensated output weights; blocks with both
        sublayers dropped are removed."""
        import copy

        small = copy.deepcopy(model)
        roles = arch_for(model).roles
        a, m = self.levels(genome)
        for i, block in enumerate(get_blocks(small)):
            groups, channels = self.kept(genome, i)
            shrink_block_(
                block,
                self.geo,
                kv_groups=None if a[i] == 0 else tuple(groups),
                o_weight=None
                if a[i] in (0, self.geo.n_kv)
                else self._db().weight("attn", i, a[i]),
                channels=None if m[i] == 0 else tuple(channels),
                down_weight=None
                if m[i] in (0, self.settings.mlp_levels)
                else self._db().weight("mlp", i, m[i]),
                roles=roles,
            )
        gone = {
            i
            for i in range(self.n_blocks)
            if a[i] == self.geo.n_kv and m[i] == self.settings.mlp_levels
        }
        if gone:
            remove_blocks(small, gone)
        return small

    def save(self, model: nn.Module, tokenizer, genome: Genome, out_dir: str) -> None:
        save_shrunk(self.shrink(model, genome), tokenizer, out_dir)


def _masked(linear: nn.Module, cols: torch.Tensor, kept_weight: torch.Tensor) -> MaskedLinear:
    """A :class:`MaskedLinear` with the compensated weight on ``cols``, zeros elsewhere."""
    w = linear.weight
    full = torch.zeros_like(w)
    full[:, cols] = kept_weight.to(device=w.device, dtype=w.dtype)
    mask = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)
    mask[cols] = 1
    return MaskedLinear(full, mask, linear.bias)


def build(ctx) -> WidthSpace:
    """The width space of a run (``ctx``: :class:`evosearch.registry.SpaceContext`)."""
    return WidthSpace.build(ctx.model, ctx.input_ids, ctx.config, db_root=ctx.db_dir, log=ctx.log)


register_space("width", build, config=WidthConfig, starts_uniform=True, shrinks=True)
register_baseline(
    "width", "uniform", lambda problem, settings, log=print: problem.space.uniform_genome()
)
