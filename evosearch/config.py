"""The frozen :class:`SearchConfig` of a search run, validated when it is built and saved as
``config.json`` in the run directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from evosearch import registry
from evosearch.data import DataSpec
from evosearch.models import DEFAULT_MODEL
from evosearch.strategies import EvoPressConfig, Stage

__all__ = ["SearchConfig", "RUNNER_FIELDS", "LEGACY_FIELDS", "STRATEGIES"]

STRATEGIES = ("evopress", "random", "tpe", "nsga2", "nsga3", "cmaes", "optuna-random")
RUNNERS = ("inprocess", "ray")
# Where evaluations run never changes what they return, so these may differ on --resume.
RUNNER_FIELDS = ("runner", "workers", "ray_address", "worker_cpus", "worker_gpus")
# Settings added after runs were written, with the value those runs had (for --resume).
LEGACY_FIELDS = {"adaptive_switches": False, "offset_steps": False}


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Everything that defines a search; saved as ``config.json`` in the run.

    Args:
        model: built-in name, local directory, ``.gguf`` file or hub id.
        space: ``layer-drop`` (which blocks to drop) or ``sparsity`` (per-layer unstructured
            or N:M sparsity levels, see :mod:`search_spaces.sparsity`).
        num_drop: blocks (or sublayers of each kind) to drop; or ``drop_fraction`` of blocks.
        sublayers: drop attention and MLP sublayers separately (``num_drop`` of each).
        allowed: blocks that may be dropped (default all).
        fitness: ``kl`` (KL from the dense model) or ``ppl``.
        strategy: ``evopress`` or ``random`` (random search, same racing and budget).
        generations, offspring, initial_population, max_switches: EvoPress loop settings
            (``initial_population`` random genomes next to the uniform start of sparsity and
            width and the ``warm_start`` genomes; 0: start from those alone).
        adaptive_switches: EvoPress self-adjusts its number of switches per mutation (see
            :class:`~evosearch.strategies.EvoPressConfig`).
        stages: ``(tokens, survivors)`` per racing stage.
        data: calibration source (``generated``, a local file, a hub alias or dataset name);
            data_config / data_split / text_field select inside an HF dataset.
        n_sequences, seq_len: calibration sequences and their length in tokens.
        seed: seeds data windows, generated text, the strategy and stage minibatches.
        prefix_reuse: reuse the dense hidden states of unchanged leading blocks.
        baselines: heuristics to compute and compare at the end (layer-drop: shortgpt, angular,
            sleb, last, random; sparsity: uniform, owl, fisher, random; width: uniform,
            random); sleb_tokens: calibration tokens per SLEB evaluation.
        warm_start: heuristics (the baselines but random) whose genomes join the initial
            population, so the search starts from the best heuristic choice.
        eval_ppl: datasets/files on which to report perplexity of dense, best and baselines;
            eval_seq_len / eval_windows: window length and count (None = all windows).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        storage: Optuna storage URL of the study that records every evaluation (default:
            ``sqlite:///RUN_DIR/study.db``); ``journal:PATH`` or an RDB URL to share it.
        objectives: extra minimised objectives beside the fitness (``params``,
            ``blocks_kept``) for a multi-objective search with an Optuna strategy.
        sparsity: ``sparsity`` space: target average sparsity of the block linears.
        pruner: ``sparsity`` space: base pruner (``magnitude``, ``wanda``, ``sparsegpt``, or a
            saved symbolic metric ``.json``).
        pattern: ``sparsity`` space: N:M pattern (``2:4``, ``4:8``); levels are then N of M.
        level_step: ``sparsity`` space: sparsity change per level of a layer of average size
            (every level step removes the same number of weights in every layer).
        max_level_shift: ``sparsity`` space: most levels a layer may move from uniform.
        max_total_shift: ``sparsity`` space: most levels all layers together may move from
            uniform (``None``: unbounded).
        db_dir: where level databases are stored (default: evosearch's cache directory).
        width_target: ``width`` space: fraction of the block parameters to remove (see
            :mod:`search_spaces.width`); width_attention_target: fraction of the attention
            parameters (default the same; the MLP share then makes up the total).
        width_mlp_levels: ``width`` space: MLP levels per block (must divide the intermediate
            size); width_allow_drop: let a sublayer lose all its heads/channels (so whole
            blocks can go: depth and width in one genome).
        width_train_tokens: ``width`` space: training-aware selection (DarwinLM): training
            tokens per racing stage (one per stage, growing), spent on each candidate before
            it is scored; empty: no training. width_train_mode (``lora`` / ``full``),
            width_lora_rank, width_lr, width_distill: how candidates are trained (see
            :class:`evosearch.training.TrainConfig`).
        drop_range: ``(low, high)`` or ``(low, high, step)``: search every number of dropped
            blocks in this range (every ``step``-th),
            e.g. to trace KL vs parameters across 10-50% depth pruning: ``evopress`` runs
            :class:`~evosearch.strategies.MultiBudgetEvoPress` (one elite per budget), Optuna
            strategies sample the budget. ``objectives`` defaults to ``("params",)`` then.
        budget_focus: multi-budget ``evopress`` (a range): give each generation's offspring
            to this many budgets, taken in turn (``None``: every offspring picks a budget at
            random); see :class:`~evosearch.strategies.MultiBudgetEvoPress` ``focus``.
        offset_steps: multi-budget ``evopress`` over a ``sparsity_range``: carry an elite to
            a neighbouring sparsity as its offset from its own uniform allocation, added to
            the neighbour's (``anchors`` of :class:`~evosearch.strategies.MultiBudgetEvoPress`).
        sampler_tokens: calibration tokens per evaluation of an Optuna strategy (one fidelity;
            default: the last stage's tokens).
        hv_reference: hypervolume reference point ``(fitness, *objectives)``; default: the
            worst fitness evaluated and the dense model's value of each objective.
        runner: ``inprocess`` (evaluate in this process) or ``ray`` (a pool of Ray actors;
            see :class:`evosearch.runners.RayRunner`). The runner fields (``RUNNER_FIELDS``)
            do not change results and may differ when a run is resumed.
        workers: Ray evaluator actors; ray_address: ``None`` starts a local Ray instance,
            ``auto`` / ``host:port`` / ``ray://host:port`` joins a cluster; worker_cpus /
            worker_gpus: resources per actor (fractions allowed).
    """

    model: str = DEFAULT_MODEL
    space: str = "layer-drop"
    num_drop: int | None = None
    drop_fraction: float | None = None
    sublayers: bool = False
    allowed: tuple[int, ...] | None = None
    fitness: str = "kl"
    strategy: str = "evopress"
    generations: int = 20
    offspring: int = 16
    initial_population: int = 16
    stages: tuple[tuple[int, int], ...] = ((2048, 2), (16384, 1))
    max_switches: int = 3
    adaptive_switches: bool = False
    data: str = "generated"
    data_config: str | None = None
    data_split: str = "train"
    text_field: str = "text"
    n_sequences: int = 64
    seq_len: int = 256
    seed: int = 0
    prefix_reuse: bool = True
    baselines: tuple[str, ...] = ()
    warm_start: tuple[str, ...] = ()
    sleb_tokens: int = 4096
    eval_ppl: tuple[str, ...] = ()
    eval_seq_len: int = 1024
    eval_windows: int | None = None
    device: str = "auto"
    save_model: bool = True
    storage: str | None = None
    objectives: tuple[str, ...] = ()
    sparsity: float | None = None
    pruner: str = "wanda"
    pattern: str | None = None
    level_step: float = 0.02
    max_level_shift: int = 6
    max_total_shift: int | None = None
    db_dir: str | None = None
    width_target: float | None = None
    width_attention_target: float | None = None
    width_mlp_levels: int = 16
    width_allow_drop: bool = True
    width_train_tokens: tuple[int, ...] = ()
    width_train_mode: str = "lora"
    width_lora_rank: int = 8
    width_lr: float = 1e-4
    width_distill: bool = True
    drop_range: tuple[int, int] | None = None
    sparsity_range: tuple[float, float] | None = None
    budget_focus: int | None = None
    offset_steps: bool = False
    sampler_tokens: int | None = None
    hv_reference: tuple[float, ...] | None = None
    runner: str = "inprocess"
    workers: int = 1
    ray_address: str | None = None
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "allowed",
            "baselines",
            "warm_start",
            "eval_ppl",
            "objectives",
            "drop_range",
            "sparsity_range",
            "hv_reference",
            "width_train_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, str):  # a YAML string would otherwise split into letters
                raise ValueError(f"{name} must be a list, got the string {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "stages", tuple(tuple(int(x) for x in s) for s in self.stages))
        self._check_components()
        if self.budget_range and not self.objectives and self.space_objectives():
            # a budget range is traced against size
            object.__setattr__(self, "objectives", self.space_objectives()[:1])
        self._check_layer_drop()
        self._check_space_settings()
        self._check_names()
        self._check_strategy()
        self.evopress_config()  # validates the loop settings
        DataSpec(source=self.data, n_sequences=self.n_sequences, seq_len=self.seq_len)
        if self.eval_seq_len < 2:
            raise ValueError(f"eval_seq_len must be >= 2, got {self.eval_seq_len}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        self.ray_config()  # validates workers and resources

    def space_entry(self) -> registry.SpaceEntry:
        """The registry entry of :attr:`space` (a bare one for ``custom:<name>``: a space
        object given to :func:`evosearch.run`, which brings its own builder)."""
        if self.space.startswith("custom:"):
            return registry.SpaceEntry(build=None)
        return registry.space(self.space)

    def space_objectives(self) -> tuple[str, ...]:
        """Extra objectives the space's metrics offer (the first is the budget range's)."""
        return self.space_entry().objectives

    def _check_components(self) -> None:
        """The space, fitness and strategy exist (registered, or ``module:attribute``)."""
        self.space_entry()
        if ":" not in self.fitness:
            registry.fitness(self.fitness)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")

    def _check_layer_drop(self) -> None:
        if self.space == "layer-drop":
            if (self.num_drop is None) == (self.drop_fraction is None) and not self.drop_range:
                raise ValueError(
                    "give exactly one of num_drop (e.g. 7) and drop_fraction (e.g. 0.25)"
                )
        elif self.num_drop is not None or self.drop_fraction is not None or self.sublayers:
            raise ValueError(
                f"num_drop / drop_fraction / sublayers belong to layer-drop, "
                f"not to the {self.space} space"
            )
        if self.num_drop is not None and self.num_drop < 0:
            raise ValueError(f"num_drop must be >= 0, got {self.num_drop}")
        if self.drop_fraction is not None and not 0 <= self.drop_fraction < 1:
            raise ValueError(f"drop_fraction must lie in [0, 1), got {self.drop_fraction}")
        if self.drop_range and self.space != "layer-drop":
            raise ValueError("drop_range is for the layer-drop space (sparsity: sparsity_range)")
        if self.drop_range is not None and (
            len(self.drop_range) not in (2, 3)
            or not 0 <= self.drop_range[0] <= self.drop_range[1]
            or (len(self.drop_range) == 3 and self.drop_range[2] < 1)
        ):
            raise ValueError(
                "drop_range must be (low, high) or (low, high, step) with 0 <= low <= high "
                "and step >= 1"
            )
        if self.initial_population == 0 and self.space == "layer-drop" and not self.warm_start:
            raise ValueError(
                "initial_population=0 starts from the warm start alone (sparsity and width start "
                "from uniform): give the layer-drop space a warm_start or initial_population >= 1"
            )

    def _check_space_settings(self) -> None:
        """Each space's own settings, checked by the space (its registry entry's validate)."""
        if self.sparsity_range and self.space != "sparsity":
            raise ValueError("sparsity_range is for the sparsity space (layer-drop: drop_range)")
        if self.space != "width" and (self.width_target is not None or self.width_train_tokens):
            raise ValueError(f"width_* settings belong to the width space, not to {self.space}")
        if self.width_train_tokens:
            if len(self.width_train_tokens) != len(self.stages):
                raise ValueError(
                    f"width_train_tokens needs one entry per stage ({len(self.stages)}), got "
                    f"{list(self.width_train_tokens)}"
                )
            if any(t < 0 for t in self.width_train_tokens):
                raise ValueError("width_train_tokens must be >= 0")
            self.train_config()
        entry = self.space_entry()
        if entry.validate is not None:
            entry.validate(self)

    def _check_names(self) -> None:
        """Baselines, warm starts and objectives are ones the space offers."""
        names = (*registry.baselines_for(self.space), "random")  # random search fits all
        if unknown := [b for b in self.baselines if b not in names]:
            raise ValueError(
                f"unknown baselines {unknown} for the {self.space} space; choose from {names}"
            )
        heuristics = tuple(b for b in names if b != "random")
        if unknown := [b for b in self.warm_start if b not in heuristics]:
            raise ValueError(f"unknown warm_start {unknown}; choose from {heuristics}")
        offered = self.space_objectives()
        if unknown := [o for o in self.objectives if o not in offered]:
            raise ValueError(
                f"unknown objectives {unknown} for the {self.space} space; choose from "
                f"{offered or 'none: it has no multi-objective search yet'}"
            )
        if any(len(s) != 2 for s in self.stages):
            raise ValueError("each stage is (tokens, survivors)")

    def _check_strategy(self) -> None:
        """Settings that only some strategies understand."""
        if (self.objectives or self.budget_range) and self.strategy in ("random", "cmaes"):
            raise ValueError(
                "objectives / a budget range need evopress (multi-budget EvoPress) or an "
                "Optuna strategy (tpe, nsga2, nsga3, optuna-random)"
            )
        if self.objectives and self.strategy == "evopress" and not self.budget_range:
            raise ValueError(
                "evopress searches several objectives over a range of budgets: add "
                "drop_range (--drop-range LOW,HIGH) or sparsity_range (--sparsity-range LOW,HIGH)"
            )
        if self.budget_focus is not None and (
            self.budget_focus < 1 or self.strategy != "evopress" or not self.budget_range
        ):
            raise ValueError(
                "budget_focus (>= 1) is for multi-budget evopress: a drop_range or "
                f"sparsity_range with strategy evopress (got {self.budget_focus}, "
                f"strategy {self.strategy}, range {self.budget_range})"
            )
        if self.adaptive_switches and self.strategy != "evopress":
            raise ValueError(f"adaptive_switches is for strategy evopress (got {self.strategy})")
        if self.offset_steps and (self.strategy != "evopress" or not self.sparsity_range):
            raise ValueError(
                "offset_steps is for multi-budget evopress over a sparsity_range (got strategy "
                f"{self.strategy}, sparsity_range {self.sparsity_range})"
            )

    @property
    def budget_range(self) -> tuple | None:
        """The range of budgets of a multi-budget search (``drop_range`` or
        ``sparsity_range``), or ``None``."""
        return self.drop_range or self.sparsity_range

    def train_config(self):
        """The :class:`~evosearch.training.TrainConfig` of training-aware selection."""
        from evosearch.training import TrainConfig

        return TrainConfig(
            mode=self.width_train_mode,
            rank=self.width_lora_rank,
            lr=self.width_lr,
            distill=self.width_distill,
            seed=self.seed,
        )

    def ray_config(self):
        """The :class:`~evosearch.runners.RayRunnerConfig` of ``runner="ray"``."""
        from evosearch.runners import RayRunnerConfig

        return RayRunnerConfig(
            workers=self.workers,
            address=self.ray_address,
            num_cpus=self.worker_cpus,
            num_gpus=self.worker_gpus,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchConfig:
        """Build from a dict (YAML/JSON), naming unknown keys in the error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - fields):
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(fields)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))  # tuples -> lists, as stored in config.json

    def evopress_config(self) -> EvoPressConfig:
        return EvoPressConfig(
            generations=self.generations,
            offspring=self.offspring,
            initial_population=self.initial_population,
            stages=tuple(Stage(tokens=t, survivors=s) for t, s in self.stages),
            max_switches=self.max_switches,
            adaptive_switches=self.adaptive_switches,
        )

    def data_spec(self) -> DataSpec:
        return DataSpec(
            source=self.data,
            n_sequences=self.n_sequences,
            seq_len=self.seq_len,
            seed=self.seed,
            config=self.data_config,
            split=self.data_split,
            text_field=self.text_field,
        )
