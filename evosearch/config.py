"""The nested, frozen :class:`SearchConfig` of a search run: the components' own configs under
one roof, validated when it is built and saved as ``config.json`` in the run directory.

A config file mirrors it::

    model: smollm2-135m
    data: {source: generated, n_sequences: 16, seq_len: 256}
    space: {name: layer-drop, num_drop: 7}
    strategy: {name: evopress, loop: {generations: 8, offspring: 8, stages: [[512, 2]]}}
    baselines: [shortgpt, angular]

The flat keys of earlier versions (``num_drop: 7``, ``generations: 8``) are still read, through
one table (:data:`FLAT_KEYS`), so old config files, old run directories and the CLI's flags all
land on the same nested config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from evosearch import registry
from evosearch.data import DataSpec
from evosearch.errors import UserError
from evosearch.models import DEFAULT_MODEL
from evosearch.runners import RayRunnerConfig
from evosearch.settings import build, to_plain
from evosearch.strategies import EvoPressConfig, Stage
from evosearch.training import TrainConfig
from evosearch.validate import (
    check_device,
    check_fields,
    check_loop,
    check_range,
    check_storage_url,
)

__all__ = [
    "EvalConfig",
    "FLAT_KEYS",
    "RUNNER_FIELDS",
    "RunnerConfig",
    "SearchConfig",
    "SelectionTraining",
    "SpaceConfig",
    "StrategyConfig",
    "nest",
    "put",
]

RUNNERS = ("inprocess", "ray")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Where evaluations run never changes what they return, so it may differ on --resume.
RUNNER_FIELDS = ("runner",)


@dataclass(frozen=True)
class SpaceConfig:
    """A registered space by name and its own settings (an instance of the config class it
    registered, or ``None`` for a space without settings)."""

    name: str = "layer-drop"
    settings: Any = None

    def entry(self) -> registry.SpaceEntry:
        """The registry entry (a bare one for ``custom:<name>``: a space object given to
        :func:`evosearch.run`, which brings its own builder)."""
        if self.name.startswith("custom:"):
            return registry.SpaceEntry(build=None)
        return registry.space(self.name)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SpaceConfig:
        values = dict(values)
        name = values.pop("name", "layer-drop")
        if not isinstance(name, str):
            raise ValueError(f"space.name must be a string, got {name!r}")
        settings_cls = cls(name).entry().config
        own = {f.name for f in fields(settings_cls)} if settings_cls else set()
        if foreign := sorted(set(values) - own):
            raise UserError(
                f"settings of another space in the {name} space",
                ", ".join(f"space.{k}" for k in foreign),
                _owners(foreign) + f"; the {name} space takes {sorted(own) or 'none'}",
            )
        return cls(name, build(settings_cls, values, "space.") if settings_cls else None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **(to_plain(self.settings) or {})}

    @property
    def budget_range(self):
        """The range of budgets of a multi-budget search, or ``None``."""
        return getattr(self.settings, "budget_range", None)


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """Which strategy searches, with the EvoPress loop settings it runs under.

    Args:
        name: ``evopress``, ``random`` (same racing and budget), or an Optuna sampler
            (``tpe``, ``nsga2``, ``nsga3``, ``cmaes``, ``optuna-random``).
        loop: generations, offspring, initial population, racing stages and switches.
        budget_focus: multi-budget EvoPress: give each generation's offspring to this many
            budgets of the range, taken in turn (``None``: each offspring picks at random).
        offset_steps: multi-budget EvoPress over a sparsity range: carry an elite to a
            neighbouring budget as its offset from its own uniform allocation.
        sampler_tokens: calibration tokens per evaluation of an Optuna strategy (default:
            the last stage's tokens).
    """

    name: str = "evopress"
    loop: EvoPressConfig = field(default_factory=EvoPressConfig)
    budget_focus: int | None = None
    offset_steps: bool = False
    sampler_tokens: int | None = None

    def __post_init__(self) -> None:
        if ":" not in self.name and self.name not in registry.strategies():
            raise ValueError(
                f"strategy must be one of {list(registry.strategies())} or module:attribute, "
                f"got {self.name!r}"
            )
        check_loop(self.loop)
        if self.sampler_tokens is not None:
            check_range(
                "strategy.sampler_tokens", self.sampler_tokens, self.sampler_tokens >= 1, ">= 1"
            )
        if self.budget_focus is not None and self.budget_focus < 1:
            raise ValueError(f"budget_focus must be >= 1, got {self.budget_focus}")
        if self.loop.adaptive_switches and self.name != "evopress":
            raise ValueError(f"adaptive_switches is for strategy evopress (got {self.name})")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StrategyConfig:
        values = dict(values)
        loop = values.pop("loop", {})
        if isinstance(loop, dict):
            loop = dict(loop)
            for key in ("stages", "polish_stages"):
                if loop.get(key) is not None:
                    loop[key] = _stages(loop[key], f"strategy.loop.{key}")
            loop = build(EvoPressConfig, loop, "strategy.loop.")
        return build(cls, {**values, "loop": loop}, "strategy.")


def _stages(value: Any, name: str = "strategy.loop.stages") -> tuple[Stage, ...]:
    """``[[2048, 2], [16384, 1]]`` (or Stage objects / dicts) -> Stages, naming bad ones."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of [tokens, survivors], got {value!r}")
    out = []
    for s in value:
        if isinstance(s, Stage):
            out.append(s)
        elif isinstance(s, dict):
            out.append(build(Stage, s, f"{name}."))
        elif isinstance(s, (list, tuple)) and len(s) == 2 and all(type(x) is int for x in s):
            out.append(Stage(tokens=s[0], survivors=s[1]))
        else:
            raise ValueError(f"each stage is [tokens, survivors] (integers), got {s!r}")
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class SelectionTraining:
    """Training-aware selection (DarwinLM): each candidate trains before it is scored, in any
    space, through the code healing uses (its structure kept: see :mod:`evosearch.training`).

    Args:
        tokens: training tokens per racing stage (one entry per stage, growing).
        train: how candidates train (LoRA or full, learning rate, distillation).
    """

    tokens: tuple[int, ...]
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if any(t < 0 for t in self.tokens):
            raise ValueError(f"selection_training.tokens must be >= 0, got {self.tokens}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SelectionTraining:
        values = dict(values)
        train = values.pop("train", {})
        train = build(TrainConfig, train, "selection_training.train.")
        return build(cls, {**values, "train": train}, "selection_training.")


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """Where candidates are evaluated: ``inprocess``, or ``ray`` (a pool of actors; see
    :class:`~evosearch.runners.RayRunner`). Never changes results, so it may differ when a
    run is resumed."""

    name: str = "inprocess"
    ray: RayRunnerConfig = field(default_factory=lambda: RayRunnerConfig(workers=1))

    def __post_init__(self) -> None:
        if self.name not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.name!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunnerConfig:
        values = dict(values)
        ray = build(RayRunnerConfig, {"workers": 1, **values.pop("ray", {})}, "runner.ray.")
        return build(cls, {**values, "ray": ray}, "runner.")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out perplexity of dense, best and baselines after the search.

    Args:
        ppl: datasets or files to score (none: skip).
        seq_len: window length; windows: how many windows (``None``: all).
    """

    ppl: tuple[str, ...] = ()
    seq_len: int = 1024
    windows: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ppl", tuple(self.ppl))
        if self.seq_len < 2:
            raise ValueError(f"evaluation.seq_len must be >= 2, got {self.seq_len}")
        if self.windows is not None and self.windows < 1:
            raise ValueError(f"evaluation.windows must be >= 1, got {self.windows}")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Everything that defines a search; saved as ``config.json`` in the run.

    Args:
        model: built-in name (``smollm2-135m``), local directory, ``.gguf`` file or hub id.
        data: the calibration tokens (its ``seed`` is this config's ``seed``).
        space: what to search (``layer-drop``, ``sparsity``, ``width``, a registered or
            ``module:attribute`` space) with its own settings.
        fitness: ``kl`` (KL from the dense model), ``ppl``, a registered name, or
            ``module:attribute`` naming a user's ``fn(model, batch) -> float``.
        fitness_options: keyword arguments of the registered fitness, e.g. ``{top_k: null}``
            for KL over the full vocabulary instead of the top-256 teacher.
        dtype: compute dtype of candidate evaluations: ``auto`` (bf16 where the hardware
            runs it natively, else fp32), ``float32``, ``bfloat16`` or ``float16``; the KL is
            accumulated in fp32 either way.
        selection_training: train every candidate before scoring it (``None``: no training).
        strategy: which strategy, and the EvoPress loop settings.
        runner: where candidates are evaluated (in process or on Ray).
        evaluation: held-out perplexity after the search.
        baselines: heuristics to compute and compare at the end (the space's registered
            baselines, and ``random``: random search with the same racing and budget).
        warm_start: heuristics whose genomes join the initial population.
        objectives: extra minimised objectives (metrics of the space) beside the fitness; a
            budget range defaults to the space's first one.
        hv_reference: hypervolume reference point ``(fitness, *objectives)``; default: the
            worst fitness evaluated and the dense model's value of each objective.
        seed: seeds the data windows, generated text, the strategy and stage minibatches.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        storage: Optuna storage URL of the study that records every evaluation (default:
            ``sqlite:///RUN_DIR/study.db``); ``journal:PATH`` or an RDB URL to share it.
        save_model: save the best model into the run directory.
        heal_tokens: end with structure-preserving healing of the saved model on this many
            tokens of new calibration windows (``RUN/healed``; 0: none).
        prefix_reuse: reuse the dense hidden states of unchanged leading blocks.
        parent_reuse: start each offspring from its parent's hidden states at the first block
            where they differ (in process; kept for the current batch's parents only).
        db_dir: where level databases are stored (default: evosearch's cache directory).
    """

    model: str = DEFAULT_MODEL
    data: DataSpec = field(default_factory=lambda: DataSpec(n_sequences=64))
    space: SpaceConfig = field(default_factory=SpaceConfig)
    fitness: str = "kl"
    fitness_options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    selection_training: SelectionTraining | None = None
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    baselines: tuple[str, ...] = ()
    warm_start: tuple[str, ...] = ()
    objectives: tuple[str, ...] = ()
    hv_reference: tuple[float, ...] | None = None
    seed: int = 0
    device: str = "auto"
    storage: str | None = None
    save_model: bool = True
    heal_tokens: int = 0
    prefix_reuse: bool = True
    parent_reuse: bool = True
    db_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("baselines", "warm_start", "objectives", "hv_reference"):
            value = getattr(self, name)
            if isinstance(value, str):  # a YAML string would otherwise split into letters
                raise ValueError(f"{name} must be a list, got the string {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        check_fields(self)
        check_range("seed", self.seed, self.seed >= 0, "an integer >= 0")
        check_range("heal_tokens", self.heal_tokens, self.heal_tokens >= 0, ">= 0")
        if self.heal_tokens and not self.save_model:
            raise ValueError("heal_tokens heals the saved model: it needs save_model")
        check_storage_url(self.storage)
        check_device(self.device)
        check_range("dtype", self.dtype, self.dtype in DTYPES, f"one of {', '.join(DTYPES)}")
        if self.fitness_options and ":" in self.fitness:
            raise ValueError("fitness_options are for a registered fitness, not module:attribute")
        object.__setattr__(self, "data", replace(self.data, seed=self.seed))
        entry = self.space.entry()
        if ":" not in self.fitness:
            registry.fitness(self.fitness, **self.fitness_options)  # names unknown ones
        if self.space.budget_range and not self.objectives and entry.objectives:
            object.__setattr__(self, "objectives", entry.objectives[:1])  # traced against size
        self._check_names(entry)
        self._check_strategy()
        polish = self.strategy.loop.polish_stages
        if self.selection_training and polish and len(polish) != len(self.stages):
            raise ValueError("selection_training needs as many polish_stages as stages")
        if self.selection_training and len(self.selection_training.tokens) != len(self.stages):
            raise ValueError(
                f"selection_training.tokens needs one entry per stage ({len(self.stages)}), "
                f"got {list(self.selection_training.tokens)}"
            )

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The racing stages of the search loop."""
        return self.strategy.loop.stages

    @property
    def budget_range(self):
        """The range of budgets of a multi-budget search (the space's), or ``None``."""
        return self.space.budget_range

    def _check_names(self, entry: registry.SpaceEntry) -> None:
        """Baselines, warm starts and objectives are ones the space offers."""
        space = self.space.name
        names = (*registry.baselines_for(space), "random")  # random search fits every space
        if unknown := [b for b in self.baselines if b not in names]:
            raise ValueError(
                f"unknown baselines {unknown} for the {space} space; choose from {names}"
            )
        heuristics = names[:-1]
        if unknown := [b for b in self.warm_start if b not in heuristics]:
            raise ValueError(f"unknown warm_start {unknown}; choose from {heuristics}")
        if unknown := [o for o in self.objectives if o not in entry.objectives]:
            raise ValueError(
                f"unknown objectives {unknown} for the {space} space; choose from "
                f"{entry.objectives or 'none: it has no multi-objective search yet'}"
            )
        loop = self.strategy.loop
        if loop.initial_population == 0 and not entry.starts_uniform and not self.warm_start:
            raise ValueError(
                f"initial_population=0 starts from the start genomes alone, and the {space} "
                "space has none: give a warm_start or initial_population >= 1"
            )

    def _check_strategy(self) -> None:
        """Settings that only some strategies understand."""
        name, ranged = self.strategy.name, self.budget_range
        if (self.objectives or ranged) and name in ("random", "cmaes"):
            raise ValueError(
                "objectives / a budget range need evopress (multi-budget EvoPress) or an "
                "Optuna strategy (tpe, nsga2, nsga3, optuna-random)"
            )
        if self.objectives and name == "evopress" and not ranged:
            raise ValueError(
                "evopress searches several objectives over a range of budgets: add "
                "drop_range (--drop-range LOW,HIGH), sparsity_range (--sparsity-range LOW,HIGH) "
                "or the space's own range (e.g. the joint space's bits_range)"
            )
        if self.strategy.loop.polish and (name not in ("evopress", "random") or ranged):
            raise ValueError(
                "polish is for single-budget evopress or random search (got strategy "
                f"{name}, range {ranged})"
            )
        if self.strategy.budget_focus is not None and (name != "evopress" or not ranged):
            raise ValueError(
                "budget_focus is for multi-budget evopress: a drop_range or sparsity_range "
                f"with strategy evopress (got strategy {name}, range {ranged})"
            )
        sparsity_range = getattr(self.space.settings, "sparsity_range", None)
        if self.strategy.offset_steps and (name != "evopress" or not sparsity_range):
            raise ValueError(
                "offset_steps is for multi-budget evopress over a sparsity_range (got strategy "
                f"{name}, sparsity_range {sparsity_range})"
            )

    def data_spec(self) -> DataSpec:
        """The calibration data (seeded by this config's seed)."""
        return self.data

    def evopress_config(self) -> EvoPressConfig:
        """The EvoPress loop settings."""
        return self.strategy.loop

    def train_config(self) -> TrainConfig:
        """How candidates train under training-aware selection (seeded by ``seed``)."""
        return replace(self.selection_training.train, seed=self.seed)

    def ray_config(self) -> RayRunnerConfig:
        """The Ray pool settings (used with ``runner.name == "ray"``)."""
        return self.runner.ray

    def to_dict(self) -> dict[str, Any]:
        """The nested JSON-able form saved as ``config.json`` (and read by :meth:`from_dict`)."""
        out = {f.name: to_plain(getattr(self, f.name)) for f in fields(self)}
        out["space"] = self.space.to_dict()
        out["data"] = {k: v for k, v in out["data"].items() if k not in ("seed", "contiguous")}
        if self.selection_training is not None:
            out["selection_training"]["train"].pop("seed")
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchConfig:
        """Build from a nested dict (YAML, JSON), or from the flat keys of earlier versions
        (:data:`FLAT_KEYS`), naming unknown keys and wrong types by their path."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a mapping of keys, got {type(values).__name__}")
        values = nest(values)
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        parsed = dict(values)
        for key, parse in _SECTIONS.items():
            if key in parsed and isinstance(parsed[key], dict):
                parsed[key] = parse(parsed[key])
        if isinstance(parsed.get("data"), dict):
            parsed["data"] = build(DataSpec, {"n_sequences": 64, **parsed["data"]}, "data.")
        return build(cls, parsed)


def _owners(keys: list[str]) -> str:
    """Which registered spaces take ``keys`` (for the error naming a misplaced setting)."""
    owners = []
    for space in registry.spaces():
        settings_cls = registry.space(space).config
        if settings_cls and set(keys) & {f.name for f in fields(settings_cls)}:
            owners.append(space)
    return f"they belong to {', '.join(owners)}" if owners else "no registered space takes them"


_SECTIONS = {
    "space": SpaceConfig.from_dict,
    "strategy": StrategyConfig.from_dict,
    "selection_training": SelectionTraining.from_dict,
    "runner": RunnerConfig.from_dict,
    "evaluation": lambda v: build(EvalConfig, v, "evaluation."),
}

# The flat keys of earlier versions (and of the CLI's flags) -> their path in the nested config.
FLAT_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("data", "source"),
    "data_config": ("data", "config"),
    "data_split": ("data", "split"),
    "text_field": ("data", "text_field"),
    "n_sequences": ("data", "n_sequences"),
    "seq_len": ("data", "seq_len"),
    "space": ("space", "name"),
    **{k: ("space", k) for k in ("num_drop", "drop_fraction", "sublayers", "allowed")},
    **{k: ("space", k) for k in ("attention_drop", "sublayer_init")},
    **{k: ("space", k) for k in ("drop_range", "sleb_tokens", "sparsity", "pruner", "pattern")},
    **{k: ("space", k) for k in ("level_step", "max_level_shift", "max_total_shift")},
    "sparsity_range": ("space", "sparsity_range"),
    **{k: ("space", k) for k in ("bits", "quantizer", "format", "group_size", "mix_sizes")},
    "width_target": ("space", "target"),
    "width_attention_target": ("space", "attention_target"),
    "width_mlp_levels": ("space", "mlp_levels"),
    "width_allow_drop": ("space", "allow_drop"),
    "width_train_tokens": ("selection_training", "tokens"),
    "width_train_mode": ("selection_training", "train", "mode"),
    "width_lora_rank": ("selection_training", "train", "rank"),
    "width_lr": ("selection_training", "train", "lr"),
    "width_distill": ("selection_training", "train", "distill"),
    "strategy": ("strategy", "name"),
    **{k: ("strategy", "loop", k) for k in ("generations", "offspring", "initial_population")},
    **{k: ("strategy", "loop", k) for k in ("stages", "max_switches", "adaptive_switches")},
    **{
        k: ("strategy", "loop", k)
        for k in ("locality", "polish", "polish_moves", "polish_stages", "max_seconds")
    },
    **{k: ("strategy", k) for k in ("budget_focus", "offset_steps", "sampler_tokens")},
    "runner": ("runner", "name"),
    "workers": ("runner", "ray", "workers"),
    "ray_address": ("runner", "ray", "address"),
    "worker_cpus": ("runner", "ray", "num_cpus"),
    "worker_gpus": ("runner", "ray", "num_gpus"),
    "kl_top_k": ("fitness_options", "top_k"),
    "shard": ("runner", "ray", "shard"),
    "eval_ppl": ("evaluation", "ppl"),
    "eval_seq_len": ("evaluation", "seq_len"),
    "eval_windows": ("evaluation", "windows"),
}
# Flat space keys written by earlier versions for every space, with the value that meant
# "not used": dropped when the run's space does not have them.
_UNUSED_FLAT = {
    "sublayers": False, "sleb_tokens": 4096, "pruner": "wanda", "level_step": 0.02,
    "max_level_shift": 6, "width_mlp_levels": 16, "width_allow_drop": True,
    "width_train_mode": "lora", "width_lora_rank": 8, "width_lr": 1e-4, "width_distill": True,
    "width_train_tokens": [], "adaptive_switches": False, "offset_steps": False,
}  # fmt: skip


def nest(values: dict[str, Any]) -> dict[str, Any]:
    """Move flat keys (:data:`FLAT_KEYS`) to their nested place; nested input is returned as
    it is. A flat key that the chosen space does not have is dropped when its value is the
    one that meant "unused" (as earlier ``config.json`` files hold them), else kept so that
    building the config names it."""
    flat = {k: v for k, v in values.items() if k in FLAT_KEYS and not isinstance(v, dict)}
    if not flat:
        return values
    out = {k: v for k, v in values.items() if k not in flat}
    nested_space = values.get("space") if isinstance(values.get("space"), dict) else {}
    own = _space_keys(flat.get("space") or nested_space.get("name", "layer-drop"))
    for key, value in flat.items():
        path = FLAT_KEYS[key]
        unused = value is None or (key in _UNUSED_FLAT and value == _UNUSED_FLAT[key])
        if path[0] == "space" and key != "space" and path[1] not in own and unused:
            continue
        if path[0] == "selection_training" and unused:
            continue
        if path[0] == "strategy" and unused and key in ("offset_steps", "budget_focus"):
            continue
        put(out, path, list(value) if isinstance(value, tuple) else value)
    return out


def _space_keys(name: str) -> set[str]:
    if not isinstance(name, str) or name.startswith("custom:"):
        return set()
    settings_cls = registry.space(name).config
    return {f.name for f in fields(settings_cls)} if settings_cls else set()


def put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, making the sections on the way; a section
    given by its name alone (``space: sparsity``) becomes ``{name: sparsity}``."""
    for key in path[:-1]:
        if isinstance(tree.get(key), str) and key in ("space", "strategy", "runner"):
            tree[key] = {"name": tree[key]}
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ValueError(f"{'.'.join(path[:-1])} must be a mapping")
    tree[path[-1]] = value
