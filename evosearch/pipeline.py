"""Putting a model, data, a space, a fitness and a strategy together: the ``evosearch search``,
``baseline`` and ``eval`` jobs, driven by one frozen :class:`SearchConfig`."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evosearch.arch import get_blocks
from evosearch.data import DataSpec, TokenData, load_token_data
from evosearch.engine import Evaluator, sample_batch, search
from evosearch.errors import UserError, kill_point
from evosearch.evaluation import Batch, Candidate, measure_latency
from evosearch.forward import compute_dense_cache
from evosearch.genome import Genome
from evosearch.models import DEFAULT_MODEL, load_model, save_complete
from evosearch.run import RunDir, check_finished, known_genomes, write_json_atomic
from evosearch.strategies import EvoPress, EvoPressConfig, MultiBudgetEvoPress, RandomSearch, Stage
from evosearch.surgery import apply_replacements
from evosearch.validate import check_device, check_fields, check_search_values

__all__ = [
    "SearchConfig",
    "WorkerRecipe",
    "evaluate_perplexity",
    "export_stats",
    "finetune",
    "finetune_run",
    "make_runner",
    "resolve_device",
    "run_baseline",
    "run_search",
]

STRATEGIES = ("evopress", "random", "tpe", "nsga2", "nsga3", "cmaes", "optuna-random")
# Extra, minimised objectives per space (the first is the default when a budget range is
# searched); each is a key of the space's ``metrics``.
OBJECTIVES = {
    "layer-drop": ("params", "blocks_kept", "latency"),
    "sparsity": ("density", "nonzero_block_weights", "latency"),
    "width": (),
}
# ``latency``: measured seconds of one forward of the materialised candidate on one calibration
# sequence (median of 5, memoised per genome); unstructured zeros do not speed up dense kernels,
# so for the sparsity space it only shows that.
RUNNERS = ("inprocess", "ray")
# Where evaluations run never changes what they return, so these may differ on --resume.
RUNNER_FIELDS = ("runner", "workers", "ray_address", "worker_cpus", "worker_gpus")
# Settings added after runs were written, with the value those runs had (for --resume).
LEGACY_FIELDS = {"adaptive_switches": False, "offset_steps": False}
SPACES = ("layer-drop", "sparsity", "width")
# Baselines each space can compute; "random" (random search, same racing and budget) fits all.
SPACE_BASELINES = {
    "layer-drop": ("shortgpt", "angular", "sleb", "last", "random"),
    "sparsity": ("uniform", "owl", "fisher", "random"),
    "width": ("uniform", "random"),
}
BASELINE_NAMES = SPACE_BASELINES["layer-drop"]


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
    drop_range: tuple[int, ...] | None = None
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
        check_fields(self)  # types, naming the key: YAML and flags alike
        check_search_values(self)  # ranges and stage order
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
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "stages", tuple(tuple(int(x) for x in s) for s in self.stages))
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.budget_range and not self.objectives and OBJECTIVES[self.space]:
            # a budget range is traced against size
            object.__setattr__(self, "objectives", OBJECTIVES[self.space][:1])
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
        if self.space == "sparsity":
            self.sparsity_config()  # validates target, pruner name, pattern and levels
        if self.space == "width":
            if self.width_target is None:
                raise ValueError("the width space needs width_target (e.g. 0.5 = --target-params)")
            self.width_config()  # validates the target and levels
            self.train_config()
            if self.width_train_tokens and len(self.width_train_tokens) != len(self.stages):
                raise ValueError(
                    f"width_train_tokens needs one entry per stage ({len(self.stages)}), got "
                    f"{list(self.width_train_tokens)}"
                )
            if any(t < 0 for t in self.width_train_tokens):
                raise ValueError("width_train_tokens must be >= 0")
        elif self.width_target is not None or self.width_train_tokens:
            raise ValueError(f"width_* settings belong to the width space, not to {self.space}")
        if self.num_drop is not None and self.num_drop < 0:
            raise ValueError(f"num_drop must be >= 0, got {self.num_drop}")
        if self.drop_fraction is not None and not 0 <= self.drop_fraction < 1:
            raise ValueError(f"drop_fraction must lie in [0, 1), got {self.drop_fraction}")
        if self.fitness not in ("kl", "ppl"):
            raise ValueError(f"fitness must be 'kl' or 'ppl', got {self.fitness!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        names = SPACE_BASELINES[self.space]
        if unknown := [b for b in self.baselines if b not in names]:
            raise ValueError(
                f"unknown baselines {unknown} for the {self.space} space; choose from {names}"
            )
        heuristics = tuple(b for b in names if b != "random")
        if unknown := [b for b in self.warm_start if b not in heuristics]:
            raise ValueError(f"unknown warm_start {unknown}; choose from {heuristics}")
        if self.drop_range and self.space != "layer-drop":
            raise ValueError("drop_range is for the layer-drop space (sparsity: sparsity_range)")
        if self.sparsity_range and self.space != "sparsity":
            raise ValueError("sparsity_range is for the sparsity space (layer-drop: drop_range)")
        if unknown := [o for o in self.objectives if o not in OBJECTIVES[self.space]]:
            raise ValueError(
                f"unknown objectives {unknown} for the {self.space} space; choose from "
                f"{OBJECTIVES[self.space] or 'none: it has no multi-objective search yet'}"
            )
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
        if self.drop_range is not None and (
            len(self.drop_range) not in (2, 3)
            or not 0 <= self.drop_range[0] <= self.drop_range[1]
            or (len(self.drop_range) == 3 and self.drop_range[2] < 1)
        ):
            raise ValueError(
                "drop_range must be (low, high) or (low, high, step) with 0 <= low <= high "
                "and step >= 1"
            )
        if any(len(s) != 2 for s in self.stages):
            raise ValueError("each stage is (tokens, survivors)")
        if self.initial_population == 0 and self.space == "layer-drop" and not self.warm_start:
            raise ValueError(
                "initial_population=0 starts from the warm start alone (sparsity and width start "
                "from uniform): give the layer-drop space a warm_start or initial_population >= 1"
            )
        self.evopress_config()  # validates the loop settings
        DataSpec(source=self.data, n_sequences=self.n_sequences, seq_len=self.seq_len)
        if self.eval_seq_len < 2:
            raise ValueError(f"eval_seq_len must be >= 2, got {self.eval_seq_len}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        self.ray_config()  # validates workers and resources

    @property
    def budget_range(self) -> tuple | None:
        """The range of budgets of a multi-budget search (``drop_range`` or
        ``sparsity_range``), or ``None``."""
        return self.drop_range or self.sparsity_range

    def sparsity_config(self):
        """The :class:`~search_spaces.sparsity.SparsityConfig` of ``space="sparsity"``."""
        from search_spaces.sparsity import SparsityConfig

        return SparsityConfig(
            sparsity=self.sparsity,
            pruner=self.pruner,
            pattern=self.pattern,
            level_step=self.level_step,
            max_level_shift=self.max_level_shift,
            max_total_shift=self.max_total_shift,
            sparsity_range=self.sparsity_range,
        )

    def width_config(self):
        """The :class:`~search_spaces.width.WidthConfig` of ``space="width"``."""
        from search_spaces.width import WidthConfig

        return WidthConfig(
            target=self.width_target,
            attention_target=self.width_attention_target,
            mlp_levels=self.width_mlp_levels,
            allow_drop=self.width_allow_drop,
        )

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

    def train_schedule(self) -> dict[int, int]:
        """Scoring-batch tokens of each stage -> its training tokens (training-aware
        selection recognises a stage by its batch size, as :func:`sample_batch` cuts it)."""
        schedule: dict[int, int] = {}
        for (tokens, _), train in zip(self.stages, self.width_train_tokens):
            n = min(-(-tokens // self.seq_len), self.n_sequences) * self.seq_len
            if schedule.get(n, train) != train:
                raise ValueError(
                    f"two stages score on the same {n} tokens but train differently; give them "
                    "distinct token counts below n_sequences * seq_len"
                )
            schedule[n] = train
        return schedule

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

    def resolve_num_drop(self, n_blocks: int) -> int:
        if self.drop_range is not None:
            k = self.drop_range[1]  # the space must hold the largest budget searched
        elif self.num_drop is not None:
            k = self.num_drop
        else:
            k = round(self.drop_fraction * n_blocks)
        if not self.sublayers and k >= n_blocks:
            raise ValueError(
                f"cannot drop {k} of the model's {n_blocks} blocks: keep at least one"
            )
        if k > n_blocks:
            raise ValueError(f"cannot drop {k} sublayers of each kind: the model has {n_blocks}")
        return k


def resolve_device(device: str) -> torch.device:
    check_device(device)  # one line, not a CUDA traceback, when CUDA is missing
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Session:
    """The loaded model, calibration data, dense cache, space and fitness of one config."""

    def __init__(self, config: SearchConfig, log: Callable[[str], None]) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.model, self.tokenizer = load_model(config.model, device=resolve_device(config.device))
        n_blocks = len(get_blocks(self.model))
        log(
            f"model {config.model}: {n_blocks} blocks, "
            f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M parameters "
            f"({time.perf_counter() - t0:.1f}s)"
        )
        if config.space == "layer-drop":
            config.resolve_num_drop(n_blocks)  # an impossible budget fails before data loads
        t0 = time.perf_counter()
        self.data: TokenData = load_token_data(config.data_spec(), self.tokenizer, self.model)
        log(f"calibration data: {self.data.description} ({time.perf_counter() - t0:.1f}s)")
        self.space = _space(config, self.model, self.data.input_ids, log)
        t0 = time.perf_counter()
        self.dense = compute_dense_cache(
            self.model, self.data.input_ids, prefix_reuse=config.prefix_reuse
        )
        self.cache_seconds = time.perf_counter() - t0
        log(
            f"dense cache: teacher {self.dense.teacher_bytes_per_token()} B/token, prefix "
            f"{self.dense.prefix_bytes_per_token()} B/token ({self.cache_seconds:.1f}s)"
        )
        self.fitness = _fitness(config)
        self.fitness.prepare(self.model, self.data.input_ids, self.dense)

    def evaluator(self) -> Evaluator:
        return Evaluator(
            self.model, self.space, self.fitness, self.dense, prefix_reuse=self.config.prefix_reuse
        )

    def full_batch(self) -> Batch:
        return Batch(tuple(range(self.data.n_sequences)), self.data.input_ids)


def _fitness(config: SearchConfig):
    """The configured fitness, wrapped for training-aware selection when asked."""
    from fitness import get_fitness

    fitness = get_fitness(config.fitness)
    if config.space == "width" and config.width_train_tokens:
        from fitness.training_aware import TrainingAware

        fitness = TrainingAware(fitness, config.train_schedule(), config.train_config())
    return fitness


def _space(config: SearchConfig, model, input_ids: torch.Tensor, log=print):
    """The search space ``config.space`` names, for ``model`` (spaces with a level database
    build it from the calibration ``input_ids`` once, then reuse it from disk)."""
    if config.space == "sparsity":
        from search_spaces.sparsity import SparsitySpace

        return SparsitySpace.build(
            model,
            input_ids,
            config.sparsity_config(),
            db_root=config.db_dir,
            model_id=config.model,
            log=log,
        )
    if config.space == "width":
        from search_spaces.width import WidthSpace

        return WidthSpace.build(
            model, input_ids, config.width_config(), db_root=config.db_dir, log=log
        )
    from search_spaces import LayerDropSpace
    from search_spaces.layer_drop import param_counts

    n_blocks = len(get_blocks(model))
    k = config.resolve_num_drop(n_blocks)
    return LayerDropSpace(
        n_blocks,
        num_drop=k,
        sublayers=config.sublayers,
        allowed=config.allowed,
        counts=param_counts(model),
    )


@dataclass(frozen=True)
class WorkerRecipe:
    """How a Ray worker rebuilds a session's evaluator: it loads the model itself and takes the
    calibration tokens and the dense cache from the object store (computed once, by the driver).

    Called as ``recipe(input_ids=..., dense=...)`` in each worker; returns an
    :class:`~evosearch.engine.Evaluator`.
    """

    config: SearchConfig

    def __call__(self, *, input_ids: torch.Tensor, dense) -> Evaluator:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per worker would drown the search's log
        hf_logging.set_verbosity_error()
        config = self.config
        model, _ = load_model(config.model, device=resolve_device(config.device))
        space = _space(config, model, input_ids, log=lambda _: None)
        fitness = _fitness(config)
        fitness.prepare(model, input_ids, dense)
        return Evaluator(model, space, fitness, dense, prefix_reuse=config.prefix_reuse)


def make_runner(session: _Session, log: Callable[[str], None] = print):
    """The runner ``session.config.runner`` names (a started pool, for ``ray``)."""
    from evosearch.runners import InProcessRunner, RayRunner

    config = session.config
    if config.runner == "inprocess":
        return InProcessRunner()
    t0 = time.perf_counter()
    runner = RayRunner(
        WorkerRecipe(config),
        shared={"input_ids": session.data.input_ids, "dense": session.dense},
        config=config.ray_config(),
    )
    where = config.ray_address or "a local Ray instance"
    log(
        f"ray: {config.workers} workers on {len(set(runner.worker_nodes()))} node(s) of {where}, "
        f"{config.worker_cpus} CPUs and {config.worker_gpus} GPUs each, started in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return runner


def _direction(config: SearchConfig) -> str:
    return "minimize"  # both built-in fitnesses (kl, ppl) are minimised


def _niches(config: SearchConfig, space) -> tuple[list, list[str]] | None:
    """The budgets (and labels) of a multi-budget search, or ``None`` for a single budget."""
    if config.drop_range is not None:
        low, high, *step = config.drop_range
        ks = range(low, high + 1, step[0] if step else 1)
        return list(ks), [str(k) for k in ks]
    if config.sparsity_range is not None:
        return space.range_budgets()
    return None


def _sampled_range(budgets: list) -> tuple[int, int, int]:
    """``(low, high, step)`` of the budgets an Optuna sampler draws from (every group has the
    same range): the niches' span, on their grid when they are evenly spaced."""
    values = [b if isinstance(b, int) else min(b.values()) for b in budgets]
    steps = {b - a for a, b in zip(values, values[1:])}
    return values[0], values[-1], steps.pop() if len(steps) == 1 else 1


def _strategy(config: SearchConfig, space, name: str, initial=(), objectives=None):
    niches = _niches(config, space)
    if name not in ("evopress", "random"):
        from evosearch.optuna_strategy import OptunaStrategy, OptunaStrategyConfig

        sampler_config = OptunaStrategyConfig(
            sampler="random" if name == "optuna-random" else name,
            generations=config.generations,
            batch_size=config.offspring,
            tokens=config.sampler_tokens or config.stages[-1][0],
            budget_range=None if niches is None else _sampled_range(niches[0]),
        )
        return OptunaStrategy(
            space,
            config=sampler_config,
            seed=config.seed,
            objectives=objectives,
            initial=initial,
        )
    if name == "evopress" and niches is not None:
        return MultiBudgetEvoPress(
            space,
            budgets=niches[0],
            labels=niches[1],
            config=config.evopress_config(),
            rng=np.random.default_rng(config.seed),
            objectives=objectives,
            initial=initial,
            focus=config.budget_focus,
            anchors=space.range_uniform_genomes() if config.offset_steps else None,
        )
    cls = EvoPress if name == "evopress" else RandomSearch
    return cls(
        space,
        config=config.evopress_config(),
        rng=np.random.default_rng(config.seed),
        initial=initial,
    )


def run_search(
    config: SearchConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the search of ``config`` into ``out_dir`` and return the results dict (also written
    to ``out_dir/results.json``). With ``resume``, continue a killed run of the same config;
    with ``overwrite``, replace the run in ``out_dir``. The directory is claimed only after the
    model and data have loaded, so a failure before leaves nothing behind."""
    from evosearch.record import OptunaRecord

    out_dir = Path(out_dir)
    storage = config.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    run = RunDir(out_dir)
    claim = dict(resume=resume, overwrite=overwrite, ignore=RUNNER_FIELDS, legacy=LEGACY_FIELDS)
    run.check(config.to_dict(), **claim)  # another run in out_dir fails before anything loads
    session = _Session(config, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    run.record = record = OptunaRecord(
        storage, out_dir.resolve().name, direction=_direction(config)
    )
    resuming = run.start(config.to_dict(), **claim)
    space = session.space
    record.bind(space.spec, space.metrics)
    warm: dict[str, Genome] = {}
    # over a sparsity range, every budget gets its own Fisher allocation (one gradient pass)
    range_fisher = config.sparsity_range is not None and "fisher" in config.warm_start
    if heuristics := tuple(h for h in config.warm_start if not (range_fisher and h == "fisher")):
        warm = _baselines(session, dataclasses.replace(config, baselines=heuristics), log)
    initial: tuple[Genome, ...] = tuple(warm.values())
    if config.sparsity_range is not None:  # every budget starts from its uniform allocation
        starts = space.range_uniform_genomes()
        initial = (*starts, *initial)
        if range_fisher:
            from search_spaces.sparsity_baselines import fisher

            allocations = fisher(space, session.model, session.data.input_ids, starts, log=log)
            initial = (*initial, *allocations)
            if space.uniform_genome() in starts:  # the baseline is the middle sparsity's
                warm["fisher"] = allocations[starts.index(space.uniform_genome())]
    elif config.space in ("sparsity", "width"):  # EvoPress starts from the uniform allocation
        initial = (space.uniform_genome(), *initial)
    objectives = None
    if config.objectives:
        latencies: dict[str, float] = {}

        def objectives(genome):
            metrics = dict(space.metrics(genome))
            if "latency" in config.objectives:
                if genome.key() not in latencies:
                    model = session.model
                    with apply_replacements(model, space.replacements(model, genome)):
                        latencies[genome.key()] = measure_latency(
                            model, session.data.input_ids[:1]
                        )
                metrics["latency"] = latencies[genome.key()]
            return tuple(metrics[o] for o in config.objectives)

    strategy = _strategy(config, space, config.strategy, initial, objectives)
    evaluator = session.evaluator()
    log(
        f"search: {config.strategy}, {space.summary()}, fitness {config.fitness}, "
        f"{config.generations} generations x {config.offspring} offspring, stages "
        f"{list(config.stages)}"
    )
    run.prepare_search()  # reconcile the study with the log after a kill
    with make_runner(session, log) as runner:
        result = search(
            strategy,
            evaluator,
            session.data,
            seed=config.seed,
            run=run,
            resume=resuming,
            progress=log,
            runner=runner,
        )
    best = result.best
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "space": space.config(),
        "best": {
            "genome": best.key(),
            **space.describe(best),
            config.fitness: result.best_value,
            **space.metrics(best),
        },
        "study": {"storage": storage, "study_name": record.study.study_name},
        "history": result.history,
        **run.totals(result.evaluations),  # the whole run, across resumes
        "dense_cache": {
            "seconds": round(session.cache_seconds, 2),
            "teacher_bytes_per_token": session.dense.teacher_bytes_per_token(),
            "prefix_bytes_per_token": session.dense.prefix_bytes_per_token(),
        },
        "evaluations": result.evaluations,
    }
    run.write_json("best_genome.json", {"genome": best.key(), **space.describe(best)})
    if config.objectives or config.budget_range:
        dense_extra = {}
        if "latency" in config.objectives:
            dense_extra["latency"] = measure_latency(session.model, session.data.input_ids[:1])
        results["pareto"] = _pareto(
            config, run, strategy, space, log, result.evaluations, dense_extra
        )
    candidates = {config.strategy: best}
    if config.baselines:  # the warm start's heuristics are not computed again
        missing = tuple(b for b in config.baselines if b not in warm)
        computed = _baselines(
            session, dataclasses.replace(config, baselines=missing), log, initial
        )
        candidates.update({b: warm[b] if b in warm else computed[b] for b in config.baselines})
        results["baselines"] = {
            n: {"genome": g.key(), **space.describe(g)} for n, g in candidates.items()
        }
    # Every candidate scored on all calibration tokens, so the comparison is like for like.
    evaluator = session.evaluator()
    full = session.full_batch()
    results["calibration_fitness"] = {
        name: evaluator.raw(g, full) for name, g in candidates.items()
    }
    if warning := _selection_warning(results["calibration_fitness"], config):
        results["warnings"] = [warning]
        log(f"warning: {warning}")
    if config.eval_ppl:
        results["perplexity"] = _evaluate_candidates(session, candidates, log)
    if config.save_model:
        save_complete(
            lambda d: space.save(session.model, session.tokenizer, best, d), run.file("model")
        )
        results["model_dir"] = str(run.file("model"))
        if config.space == "width":
            results["export"] = export_stats(session.model, run.file("model"), log)
    kill_point("results")
    run.write_json("results.json", results)  # written last: marks the run finished
    _log_summary(results, config, log)
    _write_report(run.path, log)
    return results


def _pareto(
    config: SearchConfig,
    run: RunDir,
    strategy,
    space,
    log,
    evaluations: list[dict],
    dense_extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The Pareto front of a multi-objective run, its hypervolume, and pareto_front.json/.csv."""
    import csv

    from evosearch.pareto import hypervolume

    names = [config.fitness, *config.objectives]
    front = sorted(strategy.pareto(), key=lambda p: p[1])
    if config.hv_reference is not None:
        reference = list(config.hv_reference)
    else:
        dense = (
            space.dense_metrics()
            if hasattr(space, "dense_metrics")
            else space.metrics(space.dense_genome())
        )
        dense = {**dense, **(dense_extra or {})}
        worst = max(e["value"] for e in evaluations if e.get("value") is not None)
        reference = [worst, *(dense[o] for o in config.objectives)]
    rows = []
    for genome, values in front:
        rows.append(
            {
                "genome": genome.key(),
                **dict(zip(names, values)),
                **space.metrics(genome),
                **space.describe(genome),
                "materialise": f"evosearch export {run.path} --genome {genome.key()} --out DIR",
            }
        )
    hv = hypervolume([v for _, v in front], reference)
    run.write_json(
        "pareto_front.json",
        {"objectives": names, "reference": reference, "hypervolume": hv, "front": rows},
    )
    with run.file("pareto_front.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else names)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
            )
    log(
        f"pareto front: {len(rows)} points over {names}, hypervolume {hv:.6g} "
        f"(reference {reference})"
    )
    return {"objectives": names, "reference": reference, "hypervolume": hv, "size": len(rows)}


def export_genome(run_dir: str | Path, genome_key: str, out_dir: str | Path) -> Path:
    """Materialise one genome of a finished run (e.g. a Pareto point) as a saved model."""
    run_dir = Path(run_dir)
    config = SearchConfig.from_dict(check_finished(run_dir, model=False))
    if genome_key not in known_genomes(run_dir):  # e.g. a genome of another budget or run
        raise UserError(
            "unknown genome",
            "--genome",
            f"{genome_key!r} is not a genome of {run_dir}; take one from its "
            "pareto_front.json or results.json",
        )
    model, tokenizer = load_model(config.model, device=resolve_device(config.device))
    input_ids = None
    if config.space != "layer-drop":  # the level database is keyed by the calibration data
        input_ids = load_token_data(config.data_spec(), tokenizer, model).input_ids
    space = _space(config, model, input_ids)
    genome = Genome.from_key(genome_key)
    if len(genome.levels) != space.spec.n_units:
        raise ValueError(f"genome {genome_key!r} does not fit this run's space")
    save_complete(lambda d: space.save(model, tokenizer, genome, d), out_dir)
    return Path(out_dir)


def export_stats(
    dense_model, shrunk_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Parameters and measured forward throughput (tokens/s, this process's threads) of the
    dense model and of the physically shrunk model saved in ``shrunk_dir``."""
    from evosearch.shrink import n_params, throughput

    small, _ = load_model(str(shrunk_dir), device=next(dense_model.parameters()).device)
    stats = {
        "dense_params": n_params(dense_model),
        "params": n_params(small),
        "dense_tokens_per_s": round(throughput(dense_model), 1),
        "tokens_per_s": round(throughput(small), 1),
        "threads": torch.get_num_threads(),
    }
    stats["speedup"] = round(stats["tokens_per_s"] / stats["dense_tokens_per_s"], 3)
    log(
        f"shrunk model: {stats['params'] / 1e6:.1f}M parameters (dense "
        f"{stats['dense_params'] / 1e6:.1f}M), {stats['tokens_per_s']:.0f} tokens/s vs "
        f"{stats['dense_tokens_per_s']:.0f} dense ({stats['speedup']:.2f}x, "
        f"{stats['threads']} threads)"
    )
    return stats


def finetune(
    model_dir: str | Path,
    tokens: int,
    out_dir: str | Path,
    *,
    data: DataSpec,
    teacher: str | None = None,
    lr: float = 1e-4,
    micro_batch: int = 4,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Post-compression training: full fine-tuning of every block parameter of a saved
    (e.g. width-shrunk) model for ``tokens`` tokens of ``data``, optionally distilled from the
    ``teacher`` model (KL to its logits); embeddings and LM head stay frozen. A shrunk model
    has no weights for removed heads or channels, so its structure is kept by construction.
    The result is saved to ``out_dir`` in the same format as the input.
    """
    from evosearch.arch import arch_for
    from evosearch.models import DROP_FILE
    from evosearch.shrink import WIDTH_FILE, save_shrunk
    from evosearch.training import TrainConfig, train_

    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model, tokenizer = load_model(str(model_dir), device=dev)
    n = -(-tokens // data.seq_len)
    spec = dataclasses.replace(data, n_sequences=n)
    ids = load_token_data(spec, tokenizer, model).input_ids
    teacher_fn = None
    if teacher is not None:
        dense, _ = load_model(teacher, device=dev)

        def teacher_fn(input_ids, rows):
            return dense(input_ids=input_ids[rows].to(dev), use_cache=False).logits

    blocks = get_blocks(model)
    params = [p for p in blocks.parameters() if p.dtype.is_floating_point]
    if not params:
        raise ValueError(f"{model_dir} has no block parameters to train")
    losses = train_(
        model,
        params,
        ids,
        TrainConfig(mode="full", lr=lr, micro_batch=micro_batch, distill=teacher is not None),
        teacher=teacher_fn,
        progress=None,
    )
    out = Path(out_dir)
    if (Path(model_dir) / WIDTH_FILE).is_file():
        save_shrunk(model, tokenizer, out)
    elif (Path(model_dir) / DROP_FILE).is_file():
        raise ValueError("finetune supports width-shrunk and plain models, not sublayer drops")
    else:
        arch_for(model)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    k = max(1, len(losses) // 10)
    result = {
        "model": str(model_dir),
        "out": str(out),
        "tokens": int(ids.numel()),
        "steps": len(losses),
        "distill_from": teacher,
        "lr": lr,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "seconds": round(time.perf_counter() - t0, 1),
        "data": data.source,
    }
    (out / "finetune.json").write_text(json.dumps(result, indent=1) + "\n")
    log(
        f"finetune: {result['tokens']} tokens in {result['steps']} steps, loss "
        f"{result['loss_first']:.4f} -> {result['loss_last']:.4f} ({result['seconds']}s); "
        f"saved {out}"
    )
    return result


def finetune_run(
    run_dir: str | Path,
    tokens: int,
    *,
    out_dir: str | Path | None = None,
    distill: bool = False,
    lr: float = 1e-4,
    micro_batch: int = 4,
    data: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`finetune` the best model of a search run on new random windows of its
    calibration source, distilled from the run's dense model with ``distill``; saved to
    ``out_dir`` (default ``RUN/finetuned``). ``data`` changes fields of that
    :class:`DataSpec`, e.g. ``{"source": "c4.jsonl"}`` to train on other text."""
    run_dir = Path(run_dir)
    config = SearchConfig.from_dict(check_finished(run_dir))
    spec = dataclasses.replace(config.data_spec(), seed=config.seed + 1)
    fields = sorted(f.name for f in dataclasses.fields(DataSpec))
    unknown = sorted(set(data or {}) - set(fields))
    if unknown:
        raise ValueError(f"unknown data fields {unknown}; choose from {fields}")
    data = dataclasses.replace(spec, **(data or {}))
    return finetune(
        run_dir / "model",
        tokens,
        out_dir or run_dir / "finetuned",
        data=data,
        teacher=config.model if distill else None,
        lr=lr,
        micro_batch=micro_batch,
        device=config.device,
        log=log,
    )


def _write_report(run_dir: Path, log: Callable[[str], None]) -> None:
    """The run's report; a failure here is logged, never raised: results.json is written."""
    try:
        from evosearch.report import write_report

        log(f"report: {write_report([run_dir])}")
    except Exception as exc:  # noqa: BLE001 - the search results must survive any report bug
        log(
            f"warning: report not written ({type(exc).__name__}: {exc}); "
            f"retry with `evosearch report {run_dir}`"
        )


def _baselines(
    session: _Session, config: SearchConfig, log, initial: tuple[Genome, ...] = ()
) -> dict[str, Genome]:
    space = session.space
    out: dict[str, Genome] = {}
    if config.space == "width":
        for name in config.baselines:
            t0 = time.perf_counter()
            if name == "uniform":
                out[name] = space.uniform_genome()
            else:
                out[name] = _random_baseline(session, config, initial)
            log(f"baseline {name}: {space.describe(out[name])} ({time.perf_counter() - t0:.1f}s)")
        return out
    if config.space == "sparsity":
        from search_spaces import sparsity_baselines

        for name in config.baselines:
            t0 = time.perf_counter()
            if name == "random":
                out[name] = _random_baseline(session, config, initial)
            else:
                out[name] = sparsity_baselines.compute(
                    name,
                    space,
                    session.evaluator(),
                    session.data,
                    seed=config.seed,
                    tokens=config.stages[-1][0],  # the fidelity of the search's final stage
                    log=log,
                )
            log(f"baseline {name}: {space.metrics(out[name])} ({time.perf_counter() - t0:.1f}s)")
        return out
    from search_spaces import layer_drop_baselines as bl

    boundaries = session.dense.boundaries
    if boundaries is None and {"shortgpt", "angular"} & set(config.baselines):
        boundaries = compute_dense_cache(session.model, session.data.input_ids).boundaries
    for name in config.baselines:
        t0 = time.perf_counter()
        if name == "shortgpt":
            out[name] = bl.shortgpt(space, boundaries)
        elif name == "angular":
            out[name] = bl.angular(space, boundaries)
        elif name == "last":
            out[name] = bl.drop_last(space)
        elif name == "sleb":
            from fitness import Perplexity

            evaluator = Evaluator(
                session.model, space, Perplexity(), session.dense, config.prefix_reuse
            )
            batch = sample_batch(
                session.data, config.sleb_tokens, seed=config.seed, generation=2**31 - 1, stage=0
            )
            out[name] = bl.sleb(space, lambda g, ev=evaluator, b=batch: ev(g, b)[0], progress=log)
        elif name == "random":
            if config.strategy == "random":
                log("baseline random: skipped, the search itself is random search")
                continue
            out[name] = _random_baseline(session, config, initial)
        log(f"baseline {name}: {space.describe(out[name])} ({time.perf_counter() - t0:.1f}s)")
    return out


def _random_baseline(session: _Session, config: SearchConfig, initial) -> Genome:
    """Random search with the search's racing, budget and initial genomes."""
    strategy = _strategy(config, session.space, "random", initial)
    evaluator = session.evaluator()
    return search(strategy, evaluator, session.data, seed=config.seed, progress=None).best


def run_baseline(
    config: SearchConfig, method: str, out_dir: str | Path, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Compute one baseline's genome, score it on the calibration data and save its model."""
    names = SPACE_BASELINES[config.space]
    if method not in names:
        raise ValueError(
            f"unknown baseline {method!r} for the {config.space} space; choose from {names}"
        )
    config = dataclasses.replace(config, baselines=(method,))
    session = _Session(config, log)
    genome = _baselines(session, config, log)[method]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "config": config.to_dict(),
        "method": method,
        "genome": genome.key(),
        **session.space.describe(genome),
        config.fitness: session.evaluator().raw(genome, session.full_batch()),
    }
    if config.eval_ppl:
        results["perplexity"] = _evaluate_candidates(session, {method: genome}, log)
    if config.save_model:
        save_complete(
            lambda d: session.space.save(session.model, session.tokenizer, genome, d),
            out / "model",
        )
    write_json_atomic(out / "results.json", results)
    return results


def _evaluate_candidates(session: _Session, candidates: dict[str, Genome], log) -> dict:
    config = session.config
    table: dict[str, dict[str, float]] = {}
    for source in config.eval_ppl:
        data = load_eval_data(source, session.tokenizer, config.eval_seq_len, config.eval_windows)
        dense = evaluate_perplexity(session.model, data)
        table.setdefault("dense", {})[source] = dense
        for name, genome in candidates.items():
            with apply_replacements(
                session.model, session.space.replacements(session.model, genome)
            ):
                table.setdefault(name, {})[source] = evaluate_perplexity(session.model, data)
        log(
            f"perplexity on {source} ({data.description}): "
            + ", ".join(f"{n} {v[source]:.2f}" for n, v in table.items())
        )
    return table


def load_eval_data(source: str, tokenizer, seq_len: int, windows: int | None) -> TokenData:
    """Non-overlapping ``seq_len`` windows from the start of ``source`` (all, or ``windows``)."""
    spec = DataSpec(
        source=source, n_sequences=windows, seq_len=seq_len, contiguous=True, split="test"
    )
    return load_token_data(spec, tokenizer)


def evaluate_perplexity(model, data: TokenData, *, micro_batch: int = 1) -> float:
    """Perplexity of ``model`` over all windows of ``data`` (each window scored on its own)."""
    from fitness import Perplexity

    candidate = Candidate(model, Genome((0,)))
    batch = Batch(tuple(range(data.n_sequences)), data.input_ids)
    return Perplexity(micro_batch=micro_batch)(candidate, batch)


def _selection_warning(fitness: dict[str, float], config: SearchConfig) -> str | None:
    """A warning when a baseline scores better than the search's best on all calibration
    tokens (``fitness``: name -> value, lower is better, the search under its strategy's name):
    the search selected on minibatches too small to tell them apart."""
    best = fitness[config.strategy]
    beaten = {n: v for n, v in fitness.items() if n != config.strategy and v < best}
    if not beaten:
        return None
    return (
        f"{', '.join(f'{n} ({v:.4f})' for n, v in sorted(beaten.items(), key=lambda kv: kv[1]))} "
        f"beat{'s' if len(beaten) == 1 else ''} the search's best ({best:.4f}) on all "
        f"{config.n_sequences * config.seq_len} calibration tokens, though the search selected "
        f"on {config.stages[-1][0]}-token batches: give the last stage more tokens "
        "(--stages) or the search more generations"
    )


def _log_summary(results: dict, config: SearchConfig, log) -> None:
    fit = results["calibration_fitness"]
    log(
        f"calibration {config.fitness} on all {config.n_sequences * config.seq_len} tokens: "
        + ", ".join(f"{n} {v:.4f}" for n, v in sorted(fit.items(), key=lambda kv: kv[1]))
    )
    # per-layer detail (e.g. 210 layer sparsities) stays in results.json, not in the log
    short = {
        k: v for k, v in results["best"].items() if not isinstance(v, (dict, list)) or len(v) <= 40
    }
    log(f"best: {short}")
    if "model_dir" in results:
        log(f"best model saved to {results['model_dir']}")
