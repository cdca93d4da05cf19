"""Depth pruning: drop exactly ``k`` whole blocks, or ``k`` attention and ``k`` MLP sublayers
separately (EvoPress, Sieberling et al. 2024, Sec. 4.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from evosearch.arch import arch_for, get_submodule
from evosearch.genome import Genome, LevelSpec
from evosearch.models import save_compressed, sublayer_replacements
from evosearch.operators import random_genome
from evosearch.registry import register_space
from evosearch.space import first_changed_block
from evosearch.surgery import SkippedBlock

__all__ = ["LayerDropConfig", "LayerDropSpace", "ParamCounts", "param_counts"]


class ParamCounts:
    """Parameter counts of a model: total, and per block its attention and MLP sublayers."""

    def __init__(self, total: int, attention: list[int], mlp: list[int]) -> None:
        self.total, self.attention, self.mlp = total, attention, mlp


def param_counts(model: nn.Module) -> ParamCounts:
    """Count the parameters a sublayer drop removes (tied weights counted once)."""
    arch = arch_for(model)
    blocks = get_submodule(model, arch.blocks)

    def count(paths, block):
        seen = {id(p): p for path in paths for p in get_submodule(block, path).parameters()}
        return sum(p.numel() for p in seen.values())

    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return ParamCounts(
        total,
        [count(arch.attention, b) for b in blocks],
        [count(arch.mlp, b) for b in blocks],
    )


class LayerDropSpace:
    """Genomes with one 0/1 level per unit (1 = dropped).

    With ``sublayers=False`` the units are the ``n_blocks`` blocks and exactly ``num_drop`` of
    them are dropped. With ``sublayers=True`` the units are ``n_blocks`` attention sublayers
    followed by ``n_blocks`` MLP sublayers, in two groups: exactly ``attention_drop``
    attention and ``num_drop`` MLP sublayers are dropped.

    Args:
        n_blocks: number of blocks of the model.
        num_drop: blocks (or MLP sublayers) to drop.
        sublayers: drop attention and MLP sublayers separately.
        attention_drop: with ``sublayers``, attention sublayers to drop (default ``num_drop``:
            the parameters of ``num_drop`` blocks; an attention sublayer usually holds far
            fewer parameters than an MLP, so a parameter budget may trade one for several).
        allowed: block indices that may be dropped (default: all).
        counts: the model's parameter counts, for :meth:`metrics` (see :func:`param_counts`).
        sublayer_init: with ``sublayers``, how a search's initial genomes are drawn
            (:meth:`initial_genome`): ``"aligned"`` (default) drops whole random blocks first,
            ``"random"`` drops random sublayers of each kind.

    Example:
        >>> space = LayerDropSpace(30, num_drop=7)
        >>> g = space.from_dropped(blocks=[3, 4, 5, 6, 7, 8, 9])
        >>> space.describe(g)["dropped_blocks"]
        [3, 4, 5, 6, 7, 8, 9]
    """

    name = "layer-drop"

    def __init__(
        self,
        n_blocks: int,
        *,
        num_drop: int,
        sublayers: bool = False,
        attention_drop: int | None = None,
        allowed: tuple[int, ...] | list[int] | None = None,
        counts: ParamCounts | None = None,
        sublayer_init: str | None = None,
    ) -> None:
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        allowed_set = set(range(n_blocks)) if allowed is None else set(allowed)
        if bad := sorted(i for i in allowed_set if not 0 <= i < n_blocks):
            raise ValueError(f"allowed blocks {bad} are outside 0..{n_blocks - 1}")
        if not sublayers and num_drop >= n_blocks:
            raise ValueError(
                f"num_drop={num_drop} must be smaller than the number of blocks ({n_blocks})"
            )
        attention_drop = num_drop if attention_drop is None else attention_drop
        if attention_drop != num_drop and not sublayers:
            raise ValueError("attention_drop needs sublayers=True")
        _check_sublayer_init(sublayer_init, sublayers)
        for name, k in (("num_drop", num_drop), ("attention_drop", attention_drop)):
            if not 0 <= k <= len(allowed_set):
                raise ValueError(
                    f"{name}={k} is impossible: {len(allowed_set)} blocks may be dropped"
                )
        self.n_blocks = n_blocks
        self.num_drop = num_drop
        self.attention_drop = attention_drop
        self.sublayers = sublayers
        self.sublayer_init = (sublayer_init or "aligned") if sublayers else None
        self.allowed = tuple(sorted(allowed_set))
        self.counts = counts
        per_block = tuple(1 if i in allowed_set else 0 for i in range(n_blocks))
        if sublayers:
            names = tuple(f"attn.{i}" for i in range(n_blocks)) + tuple(
                f"mlp.{i}" for i in range(n_blocks)
            )
            self.spec = LevelSpec(
                max_levels=per_block * 2,
                groups=(0,) * n_blocks + (1,) * n_blocks,
                budgets={0: attention_drop, 1: num_drop},
                names=names,
            )
        else:
            self.spec = LevelSpec(
                max_levels=per_block,
                groups=(0,) * n_blocks,
                budgets={0: num_drop},
                names=tuple(f"block.{i}" for i in range(n_blocks)),
            )

    def config(self) -> dict[str, Any]:
        return {
            "space": self.name,
            "n_blocks": self.n_blocks,
            "num_drop": self.num_drop,
            "sublayers": self.sublayers,
            **(
                {"attention_drop": self.attention_drop, "sublayer_init": self.sublayer_init}
                if self.sublayers
                else {}
            ),
            "allowed": list(self.allowed),
        }

    # -- encoding -------------------------------------------------------------------------

    def dropped(self, genome: Genome) -> tuple[set[int], set[int]]:
        """``(attention, mlp)`` dropped block indices; equal sets for whole-block drops."""
        lv = genome.levels
        n = self.n_blocks
        if self.sublayers:
            return {i for i in range(n) if lv[i]}, {i for i in range(n) if lv[n + i]}
        blocks = {i for i in range(n) if lv[i]}
        return blocks, set(blocks)

    def from_dropped(self, *, blocks=(), attention=(), mlp=()) -> Genome:
        """The genome dropping the given blocks (or, with ``sublayers``, sublayers).

        Whole blocks given to a sublayer space drop both of their sublayers. The result need
        not meet the budget (baselines such as SLEB build partial genomes); use
        ``space.spec.is_valid`` to check.
        """
        n = self.n_blocks
        if self.sublayers:
            levels = [0] * (2 * n)
            for i in set(blocks) | set(attention):
                levels[i] = 1
            for i in set(blocks) | set(mlp):
                levels[n + i] = 1
        else:
            if attention or mlp:
                raise ValueError("this space drops whole blocks; pass blocks=")
            levels = [1 if i in set(blocks) else 0 for i in range(n)]
        return Genome(tuple(levels))

    def random_genome(self, rng: np.random.Generator) -> Genome:
        return random_genome(self.spec, rng)

    def initial_genome(self, rng: np.random.Generator) -> Genome:
        """A genome for a search's initial population.

        A random genome, except for a sublayer space with ``sublayer_init="aligned"``:
        ``min(A, M)`` random blocks lose both sublayers, and the other ``|A - M|`` drops of
        the larger kind land on other random blocks. Whole blocks are what a good sublayer
        drop mostly consists of; on SmolLM2 (9 attention + 7 MLP sublayers) a search started
        from them beat every whole-block heuristic in 6 of 6 seeds (two runs), one from
        random sublayer genomes in 1 of 3 (``experiments/layer_drop/README.md``). Mutations
        still move single sublayers. Single-budget searches (:class:`EvoPress`) start here; a
        ``drop_range`` search draws each budget's genomes at random.
        """
        if self.sublayer_init != "aligned":
            return self.random_genome(rng)
        a, m = self.attention_drop, self.num_drop
        both = rng.choice(self.allowed, min(a, m), replace=False).tolist()
        rest = [i for i in self.allowed if i not in both]
        extra = rng.choice(rest, abs(a - m), replace=False).tolist()
        return self.from_dropped(
            attention=both + (extra if a > m else []), mlp=both + (extra if m > a else [])
        )

    # -- materialisation ------------------------------------------------------------------

    def replacements(self, model: nn.Module, genome: Genome) -> dict[str, nn.Module]:
        attention, mlp = self.dropped(genome)
        path = arch_for(model).blocks
        whole = attention & mlp
        out: dict[str, nn.Module] = {f"{path}.{i}": SkippedBlock() for i in sorted(whole)}
        out.update(sublayer_replacements(model, attention - whole, mlp - whole))
        return out

    def first_difference(self, a: Genome, b: Genome) -> int:
        """The first block with a block (or sublayer) dropped in one genome, not the other."""
        blocks = list(range(self.n_blocks)) * (2 if self.sublayers else 1)
        return first_changed_block(a, b, blocks, self.n_blocks)

    def start_block(self, genome: Genome) -> int:
        attention, mlp = self.dropped(genome)
        changed = attention | mlp
        return min(changed) if changed else self.n_blocks

    def summary(self) -> str:
        n = self.n_blocks
        if self.sublayers:
            return (
                f"drop {self.attention_drop} of {n} attention and {self.num_drop} of {n} MLP "
                "sublayers"
            )
        return f"drop {self.num_drop} of {n} blocks"

    def dense_genome(self) -> Genome:
        return self.from_dropped()

    def metrics(self, genome: Genome, counts: ParamCounts | None = None) -> dict[str, float]:
        """Compression measures of ``genome``: blocks kept, parameters left and their share
        (``counts`` defaults to the space's own).

        A block counts as kept unless both of its sublayers are dropped.
        """
        counts = counts or self.counts
        if counts is None:
            raise ValueError("metrics need parameter counts: LayerDropSpace(..., counts=...)")
        attention, mlp = self.dropped(genome)
        removed = sum(counts.attention[i] for i in attention) + sum(counts.mlp[i] for i in mlp)
        params = counts.total - removed
        return {
            "blocks_kept": self.n_blocks - len(attention & mlp),
            "params": params,
            "params_fraction": params / counts.total,
        }

    def describe(self, genome: Genome) -> dict[str, Any]:
        attention, mlp = self.dropped(genome)
        if not self.sublayers:
            return {"dropped_blocks": sorted(attention)}
        return {
            "dropped_blocks": sorted(attention & mlp),
            "dropped_attention": sorted(attention),
            "dropped_mlp": sorted(mlp),
        }

    def save(self, model: nn.Module, tokenizer, genome: Genome, out_dir: str) -> None:
        attention, mlp = self.dropped(genome)
        whole = attention & mlp
        save_compressed(
            model,
            tokenizer,
            out_dir,
            dropped_blocks=whole,
            dropped_attention=attention - whole,
            dropped_mlp=mlp - whole,
        )


@dataclass(frozen=True, kw_only=True)
class LayerDropConfig:
    """Settings of the layer-drop space.

    Args:
        num_drop: blocks (or sublayers of each kind) to drop; or ``drop_fraction`` of blocks.
        drop_fraction: fraction of the blocks to drop instead, in [0, 1).
        sublayers: drop attention and MLP sublayers separately (``num_drop`` of each unless
            ``attention_drop`` is given).
        attention_drop: with ``sublayers``, how many attention sublayers to drop (``num_drop``
            is then the number of MLP sublayers), e.g. to spend a parameter budget on many
            cheap attention sublayers.
        allowed: blocks that may be dropped (default all).
        drop_range: ``(low, high)`` or ``(low, high, step)``: search every number of dropped
            blocks in this range (a multi-budget search tracing KL against size).
        sleb_tokens: calibration tokens per evaluation of the SLEB baseline.
        sublayer_init: with ``sublayers``, the initial genomes of a single-budget search:
            ``"aligned"`` (default: whole random blocks first) or ``"random"`` (see
            :meth:`LayerDropSpace.initial_genome`).
    """

    num_drop: int | None = None
    drop_fraction: float | None = None
    sublayers: bool = False
    attention_drop: int | None = None
    allowed: tuple[int, ...] | None = None
    drop_range: tuple[int, ...] | None = None
    sleb_tokens: int = 4096
    sublayer_init: str | None = None

    def __post_init__(self) -> None:
        for name in ("allowed", "drop_range"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if (self.num_drop is None) == (self.drop_fraction is None) and not self.drop_range:
            raise ValueError("give exactly one of num_drop (e.g. 7) and drop_fraction (e.g. 0.25)")
        if self.num_drop is not None and self.num_drop < 0:
            raise ValueError(f"num_drop must be >= 0, got {self.num_drop}")
        if self.drop_fraction is not None and not 0 <= self.drop_fraction < 1:
            raise ValueError(f"drop_fraction must lie in [0, 1), got {self.drop_fraction}")
        if self.drop_range is not None and (
            len(self.drop_range) not in (2, 3)
            or not 0 <= self.drop_range[0] <= self.drop_range[1]
            or (len(self.drop_range) == 3 and self.drop_range[2] < 1)
        ):
            raise ValueError(
                "drop_range must be (low, high) or (low, high, step) with 0 <= low <= high "
                "and step >= 1"
            )
        if self.sleb_tokens < 1:
            raise ValueError(f"sleb_tokens must be >= 1, got {self.sleb_tokens}")
        _check_sublayer_init(self.sublayer_init, self.sublayers)
        if self.sublayers and self.sublayer_init is None:  # explicit in the saved config
            object.__setattr__(self, "sublayer_init", "aligned")
        if self.attention_drop is not None:
            if not self.sublayers:
                raise ValueError("attention_drop needs sublayers: true")
            if self.attention_drop < 0 or self.drop_range is not None:
                raise ValueError("attention_drop must be >= 0, and cannot go with drop_range")

    @property
    def budget_range(self) -> tuple[int, ...] | None:
        """The range of a multi-budget search, or ``None``."""
        return self.drop_range


SUBLAYER_INITS = ("aligned", "random")


def _check_sublayer_init(value: str | None, sublayers: bool) -> None:
    if value is None:
        return
    if value not in SUBLAYER_INITS:
        choices = ", ".join(SUBLAYER_INITS)
        raise ValueError(f"sublayer_init must be one of {choices}, got {value!r}")
    if not sublayers:
        raise ValueError("sublayer_init needs sublayers: true")


def resolve_num_drop(config: LayerDropConfig, n_blocks: int) -> int:
    """Blocks (or sublayers of each kind) to drop: ``num_drop``, ``drop_fraction`` of
    ``n_blocks``, or the top of ``drop_range``."""
    if config.drop_range is not None:
        k = config.drop_range[1]  # the space must hold the largest budget searched
    elif config.num_drop is not None:
        k = config.num_drop
    else:
        k = round(config.drop_fraction * n_blocks)
    if not config.sublayers and k >= n_blocks:
        raise ValueError(f"cannot drop {k} of the model's {n_blocks} blocks: keep at least one")
    if k > n_blocks:
        raise ValueError(f"cannot drop {k} sublayers of each kind: the model has {n_blocks}")
    return k


def build(ctx) -> LayerDropSpace:
    """The layer-drop space of a run (``ctx``: :class:`evosearch.registry.SpaceContext`)."""
    from evosearch.arch import get_blocks

    config = ctx.config
    n_blocks = len(get_blocks(ctx.model))
    return LayerDropSpace(
        n_blocks,
        num_drop=resolve_num_drop(config, n_blocks),
        sublayers=config.sublayers,
        attention_drop=config.attention_drop,
        allowed=config.allowed,
        counts=param_counts(ctx.model),
        sublayer_init=config.sublayer_init,
    )


def _check_model(config: LayerDropConfig, model) -> None:
    from evosearch.arch import get_blocks

    n_blocks = len(get_blocks(model))
    resolve_num_drop(config, n_blocks)
    if (config.attention_drop or 0) > n_blocks:
        raise ValueError(
            f"cannot drop {config.attention_drop} attention sublayers: the model has {n_blocks}"
        )


def _niches(config: LayerDropConfig, space) -> tuple[list, list[str]] | None:
    """The budgets (numbers of dropped blocks) of a ``drop_range`` search, with labels."""
    if config.drop_range is None:
        return None
    low, high, *step = config.drop_range
    ks = range(low, high + 1, step[0] if step else 1)
    return list(ks), [str(k) for k in ks]


register_space(
    "layer-drop",
    build,
    config=LayerDropConfig,
    objectives=("params", "blocks_kept", "latency"),
    check_model=_check_model,
    needs_data=False,
    niches=_niches,
)
