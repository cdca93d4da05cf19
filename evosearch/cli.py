"""The ``evosearch`` command line: ``search``, ``baseline``, ``eval``, ``metric-search`` and
``report``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

__all__ = ["main"]

# CLI flag -> SearchConfig field, for flags that override the YAML config.
_OVERRIDES = {
    "model": "model",
    "space": "space",
    "target": "sparsity",
    "pruner": "pruner",
    "pattern": "pattern",
    "level_step": "level_step",
    "max_level_shift": "max_level_shift",
    "max_total_shift": "max_total_shift",
    "db_dir": "db_dir",
    "drop": "num_drop",
    "drop_fraction": "drop_fraction",
    "attention_drop": "attention_drop",
    "sublayer_init": "sublayer_init",
    "fitness": "fitness",
    "strategy": "strategy",
    "generations": "generations",
    "offspring": "offspring",
    "initial_population": "initial_population",
    "max_switches": "max_switches",
    "adaptive_switches": "adaptive_switches",
    "locality": "locality",
    "polish": "polish",
    "polish_moves": "polish_moves",
    "max_seconds": "max_seconds",
    "data": "data",
    "data_config": "data_config",
    "data_split": "data_split",
    "text_field": "text_field",
    "n_sequences": "n_sequences",
    "seq_len": "seq_len",
    "seed": "seed",
    "eval_seq_len": "eval_seq_len",
    "eval_windows": "eval_windows",
    "sleb_tokens": "sleb_tokens",
    "device": "device",
    "storage": "storage",
    "sampler_tokens": "sampler_tokens",
    "budget_focus": "budget_focus",
    "offset_steps": "offset_steps",
    "runner": "runner",
    "workers": "workers",
    "ray_address": "ray_address",
    "worker_cpus": "worker_cpus",
    "worker_gpus": "worker_gpus",
    "dtype": "dtype",
    "heal_tokens": "heal_tokens",
    "bits": "bits",
    "quantizer": "quantizer",
    "format": "format",
    "group_size": "group_size",
    "mix_sizes": "mix_sizes",
    "shard": "shard",
    "target_params": "width_target",
    "attention_target": "width_attention_target",
    "mlp_levels": "width_mlp_levels",
    "train_mode": "width_train_mode",
    "lora_rank": "width_lora_rank",
    "train_lr": "width_lr",
    "distill": "width_distill",
}


def _stages(text: str) -> list[list[int]]:
    """``"2048:2,16384:1"`` -> ``[[2048, 2], [16384, 1]]`` (:meth:`Stage.parse`)."""
    from evosearch.strategy import Stage

    try:
        return [[s.tokens, s.survivors] for s in Stage.parse(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _csv(cast=str):
    """An argparse type: ``"a,b"`` -> ``[cast("a"), cast("b")]``, named for its error messages."""

    def parse(text: str) -> list:
        return [cast(x) for x in text.split(",")]

    parse.__name__ = f"comma-separated {cast.__name__}"
    return parse


def _top_level_csv(text: str) -> list[str]:
    """``"wanda,add(W,X)"`` -> ``["wanda", "add(W,X)"]``: commas inside parentheses stay."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in [*parts, text[start:]] if p.strip()]


def _int_list(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected indices like 0-3,7, got {text!r}") from None
    return out


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    """The config file, the model and the space's flags (shared by ``search`` and
    ``baseline``)."""
    p.add_argument("--config", help="YAML file with SearchConfig fields (flags override it)")
    p.add_argument("--model", help="built-in name (smollm2-135m), local dir, .gguf or hub id")
    p.add_argument(
        "--space",
        help="what to search: layer-drop (default), sparsity, width, another registered "
        "space, or module:attribute naming a space builder",
    )
    for add in (_add_layer_drop_flags, _add_sparsity_flags, _add_width_flags):
        add(p)
    for add in (_add_quantization_flags, _add_training_flags, _add_data_flags):
        add(p)


def _add_layer_drop_flags(p: argparse.ArgumentParser) -> None:
    """The layer-drop space."""
    p.add_argument("--drop", type=int, help="number of blocks (or sublayers of each kind) to drop")
    p.add_argument("--drop-fraction", type=float, help="fraction of blocks to drop instead")
    p.add_argument(
        "--sublayers",
        action="store_true",
        default=None,
        help="drop attention and MLP sublayers separately",
    )
    p.add_argument(
        "--attention-drop",
        type=int,
        help="with --sublayers: attention sublayers to drop (--drop is then the MLP count)",
    )
    p.add_argument(
        "--sublayer-init",
        choices=("aligned", "random"),
        help="with --sublayers: the initial genomes, whole random blocks first (aligned, "
        "the default) or random sublayers",
    )
    p.add_argument("--allowed", type=_int_list, help="blocks that may be dropped, e.g. 2-27")


def _add_sparsity_flags(p: argparse.ArgumentParser) -> None:
    """The sparsity space."""
    p.add_argument("--target", type=float, help="sparsity space: average sparsity, e.g. 0.6")
    p.add_argument(
        "--sparsity-range",
        type=_csv(float),
        help="sparsity space: search every average sparsity from LOW to HIGH in steps of "
        "--level-step, e.g. 0.5,0.7, and return the Pareto front (KL vs density)",
    )
    p.add_argument("--pruner", help="sparsity space: magnitude | wanda | sparsegpt | metric.json")
    p.add_argument("--pattern", help="sparsity space: N:M pattern, e.g. 2:4 or 4:8")
    p.add_argument(
        "--level-step", type=float, help="sparsity space: sparsity per level of a mean-size layer"
    )
    p.add_argument(
        "--max-level-shift",
        type=int,
        help="sparsity space: most levels a layer moves from uniform",
    )
    p.add_argument(
        "--max-total-shift", type=int, help="sparsity space: most levels moved in total"
    )


def _add_width_flags(p: argparse.ArgumentParser) -> None:
    """The width space."""
    p.add_argument(
        "--target-params",
        type=float,
        help="width space: fraction of the block parameters to remove, e.g. 0.5",
    )
    p.add_argument(
        "--attention-target",
        type=float,
        help="width space: fraction of the attention parameters to remove (default: same)",
    )
    p.add_argument("--mlp-levels", type=int, help="width space: MLP levels per block (16)")


def _add_quantization_flags(p: argparse.ArgumentParser) -> None:
    """The quantization space."""
    p.add_argument("--bits", type=int, help="quantization space: average bit-width, e.g. 3")
    p.add_argument(
        "--quantizer", choices=["gptq", "rtn"], help="quantization space: GPTQ (default) or RTN"
    )
    p.add_argument(
        "--format",
        choices=["int", "gguf"],
        help="quantization space: int bit-widths (compressed-tensors export) or GGUF types",
    )
    p.add_argument("--group-size", type=int, help="quantization space: columns per scale (128)")
    p.add_argument(
        "--mix-sizes",
        action="store_true",
        default=None,
        help="quantization space: trade bits between layers of any shape (the budget held "
        "by size, leftover bits spent by the repair)",
    )


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    """Training-aware selection (any space)."""
    p.add_argument(
        "--train-tokens",
        type=_csv(int),
        help="training-aware selection (any space): train every candidate, keeping its "
        "structure, before scoring it; training tokens per stage, e.g. 2048,8192",
    )
    p.add_argument(
        "--train-mode",
        choices=["lora", "full"],
        help="training-aware selection: how candidates train",
    )
    p.add_argument("--lora-rank", type=int, help="training-aware selection: LoRA rank (8)")
    p.add_argument("--train-lr", type=float, help="training-aware selection: learning rate")
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="training-aware selection: train candidates on KL to the dense model (default) "
        "or on next tokens (--no-distill)",
    )


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """Calibration data, fitness, device, held-out evaluation, storage and ``--out``."""
    p.add_argument("--db-dir", help="where level databases are kept (default: the cache)")
    p.add_argument(
        "--fitness",
        help="kl (default), ppl, another registered fitness, or module:attribute naming a "
        "fn(model, batch) -> float of yours (lower is better), e.g. my_fitness:score",
    )
    p.add_argument("--data", help="calibration: generated | file.txt/.raw/.jsonl | HF dataset")
    p.add_argument("--data-config")
    p.add_argument("--data-split")
    p.add_argument("--text-field")
    p.add_argument("--n-sequences", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype of evaluations (auto: bf16 where the hardware runs it natively)",
    )
    p.add_argument(
        "--kl-top-k",
        type=int,
        help="KL fitness: teacher top-k log-probabilities kept per token (default 256; 0: the "
        "full vocabulary)",
    )
    p.add_argument(
        "--eval-ppl",
        action="append",
        help="dataset or file for a final perplexity report (repeatable)",
    )
    p.add_argument("--eval-seq-len", type=int)
    p.add_argument("--eval-windows", type=int)
    p.add_argument("--sleb-tokens", type=int)
    p.add_argument(
        "--storage",
        help="Optuna storage URL for the study record (default: "
        "sqlite in the run directory; journal:PATH or an RDB URL to share it)",
    )
    p.add_argument("--out", required=True, help="run directory")


def _add_metric_search_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="as for search --model")
    p.add_argument("--data", default="generated", help="calibration text (as for search --data)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--n-sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, default=0.5, help="unstructured, per row")
    target.add_argument("--pattern", help="semi-structured N:M target instead, e.g. 2:4")
    p.add_argument("--fitness", choices=["kl", "ppl"], default="kl")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--tournament-size", type=int, default=3)
    p.add_argument("--crossover-rate", type=float, default=0.7)
    p.add_argument("--subtree-mutation-rate", type=float, default=0.2)
    p.add_argument("--point-mutation-rate", type=float, default=0.2)
    p.add_argument("--elitism", type=int, default=2)
    p.add_argument("--max-depth", type=int, default=6)
    p.add_argument("--max-size", type=int, default=20)
    p.add_argument(
        "--const-prob", type=float, default=0.1, help="chance a random leaf is a constant"
    )
    p.add_argument(
        "--holdout-sequences",
        type=int,
        default=8,
        help="re-score the leaderboard on this many other windows and pick the best there "
        "(0: off)",
    )
    p.add_argument("--terminals", type=_csv(), help="default W,X,G")
    p.add_argument(
        "--seed-metrics",
        type=_top_level_csv,
        help="known metrics (magnitude,wanda,pruner-zero,gblm) or expressions to seed with",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runner", choices=["inprocess", "ray"], default="inprocess")
    p.add_argument("--workers", type=int, default=2, help="Ray evaluator workers (--runner ray)")
    p.add_argument("--ray-address", help="join this Ray cluster: auto | host:port")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the search in --out")


def _metric_search(args: argparse.Namespace) -> None:
    from evosearch.metric_search import MetricSearchConfig, run_metric_search

    values = {
        k: getattr(args, k)
        for k in (
            "model", "data", "text_field", "n_sequences", "seq_len", "sparsity", "pattern",
            "fitness", "population", "generations", "tournament_size", "crossover_rate",
            "subtree_mutation_rate", "point_mutation_rate", "elitism", "max_depth", "max_size",
            "const_prob", "holdout_sequences", "terminals", "seed_metrics", "seed", "device",
        )
        if getattr(args, k) is not None
    }  # fmt: skip
    config = MetricSearchConfig(**values)
    if args.runner == "inprocess":
        run_metric_search(config, args.out, resume=args.resume)
        return
    from evosearch.metric_search import MetricWorker
    from evosearch.runners import RayRunner, RayRunnerConfig

    ray = RayRunnerConfig(workers=args.workers, address=args.ray_address)
    with RayRunner(MetricWorker(config), config=ray) as runner:
        run_metric_search(config, args.out, resume=args.resume, runner=runner)


def _config(args: argparse.Namespace, extra: dict | None = None):
    """The nested :class:`SearchConfig` of ``--config`` (nested or flat YAML) with the flags
    on top (each flag lands where :data:`~evosearch.config.FLAT_KEYS` puts it)."""
    import yaml

    from evosearch.config import FLAT_KEYS, SearchConfig, nest, put

    values: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {args.config}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"bad YAML in {args.config}: {exc}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{args.config} must hold a mapping of config keys")
    values = nest(values)
    flags = {field: getattr(args, flag, None) for flag, field in _OVERRIDES.items()}
    flags.pop("num_drop"), flags.pop("drop_fraction")  # set together below
    for flag in _LIST_FLAGS:
        flags[flag] = getattr(args, flag, None)
    if getattr(args, "kl_top_k", None) is not None:  # 0: the full vocabulary
        put(values, ("fitness_options", "top_k"), args.kl_top_k or None)
    flags["width_train_tokens"] = getattr(args, "train_tokens", None)
    flags.update(extra or {})
    yaml_space = values.get("space") if isinstance(values.get("space"), dict) else {}
    if flags.get("space") not in (None, yaml_space.get("name", "layer-drop")):
        values["space"] = {}  # another space than the YAML's: its settings are moot
    for field, value in flags.items():
        if value is not None:
            put(values, FLAT_KEYS.get(field, (field,)), value)
    if args.drop is not None or args.drop_fraction is not None:  # a flag replaces the YAML's
        space = values.get("space") if isinstance(values.get("space"), dict) else {}
        space.pop("num_drop", None), space.pop("drop_fraction", None)
        put(values, ("space", "num_drop" if args.drop is not None else "drop_fraction"),
             args.drop if args.drop is not None else args.drop_fraction)  # fmt: skip
    return SearchConfig.from_dict(values)


_LIST_FLAGS = (
    "sublayers", "allowed", "eval_ppl", "stages", "polish_stages", "baselines", "warm_start",
    "objectives",
    "drop_range", "sparsity_range", "hv_reference",
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of every other failure (exit code 2)."""

    def error(self, message: str):
        print(f"evosearch: error: bad arguments ({self.prog}): {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """Run the ``evosearch`` command line; returns the exit code (2: a mistake in the input)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "eval" and not (args.ppl or args.tasks):
        print(
            "evosearch: error: bad arguments (evosearch eval): give --ppl and/or --tasks",
            file=sys.stderr,
        )
        return 2
    with warnings.catch_warnings():  # filters and the one-line format end with the command
        _quiet_libraries()
        warnings.showwarning = _one_line_warning
        return _guarded(_run, args)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="evosearch", description="Find the best compressed version of an LLM by search."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_search_command,
        _add_baseline_command,
        _add_export_command,
        _add_finetune_command,
        _add_eval_command,
        _add_metric_search_and_report_commands,
    ):
        add(sub)
    for command in sub.choices.values():  # `evosearch search ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return parser


def _add_search_command(sub) -> None:
    p = sub.add_parser(
        "search", help="search which blocks to drop, per-layer sparsity or widths (EvoPress)"
    )
    _add_search_flags(p)
    p.add_argument(
        "--strategy",
        help="evopress (default), random, tpe, nsga2, nsga3, cmaes, optuna-random, another "
        "registered strategy, or module:attribute",
    )
    p.add_argument(
        "--objectives",
        type=_csv(),
        help="extra minimised objectives beside the fitness: params,blocks_kept (default with "
        "--drop-range: params)",
    )
    p.add_argument(
        "--drop-range",
        type=_csv(int),
        help="search every number of dropped blocks in this range, e.g. 3,15 (or every "
        "third: 3,15,3), and return the "
        "Pareto front (evopress: one elite per budget; Optuna strategies: sampled budget)",
    )
    p.add_argument(
        "--sampler-tokens", type=int, help="tokens per evaluation for Optuna strategies"
    )
    p.add_argument(
        "--budget-focus",
        type=int,
        help="multi-budget evopress: give each generation's offspring to this many budgets "
        "of the range, in turn (default: every offspring picks a budget at random)",
    )
    p.add_argument(
        "--offset-steps",
        action="store_true",
        default=None,
        help="multi-budget evopress over --sparsity-range: move an elite to a neighbouring "
        "sparsity as its offset from uniform (default: the budget difference on random layers)",
    )
    p.add_argument(
        "--hv-reference",
        type=_csv(float),
        help="hypervolume reference point: fitness,objective...",
    )
    _add_loop_flags(p)
    _add_run_flags(p)
    _add_runner_flags(p)


def _add_loop_flags(p: argparse.ArgumentParser) -> None:
    """The search loop of ``search``: generations, mutation, racing, polish, time budget."""
    p.add_argument("--generations", type=int)
    p.add_argument("--offspring", type=int)
    p.add_argument(
        "--initial-population",
        type=int,
        help="random genomes in generation 0 beside the uniform / warm start (0: none)",
    )
    p.add_argument("--max-switches", type=int)
    p.add_argument(
        "--adaptive-switches",
        action="store_true",
        default=None,
        help="evopress: self-adjust the number of level switches per mutation (half the "
        "offspring try half as many, half twice as many)",
    )
    p.add_argument(
        "--locality",
        type=float,
        help="probability that a mutation's switch moves a level to the neighbouring unit "
        "(layer drop: a dropped block to the adjacent block) instead of a random one",
    )
    p.add_argument(
        "--polish",
        type=int,
        help="after the last generation, up to this many generations racing the best "
        "genome's whole one-switch neighbourhood (stops at a local optimum)",
    )
    p.add_argument(
        "--polish-moves",
        choices=("all", "local"),
        help="the neighbourhood a polish generation races: every one-switch neighbour (all) "
        "or local switches only (layer drop: blocks next to a dropped one)",
    )
    p.add_argument("--stages", type=_stages, help="racing stages tokens:survivors,...")
    p.add_argument(
        "--polish-stages",
        type=_stages,
        help="racing stages of a polish generation (default: --stages), e.g. a final stage "
        "on many more tokens; its last keeps as many as --stages's",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        help="wall-clock budget of the search: end the evolution early (then polish) when "
        "the next generation would not fit; --generations becomes an upper bound",
    )


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """What ``search`` compares with, starts from and does with its run folder."""
    p.add_argument(
        "--baselines",
        type=_csv(),
        help="compare with: shortgpt,angular,sleb,last,random (layer-drop); uniform,owl,"
        "fisher,random (sparsity); uniform,random (width)",
    )
    p.add_argument(
        "--warm-start",
        type=_csv(),
        help="heuristics whose choices join the initial population: shortgpt,angular,sleb,last "
        "(layer-drop); owl,fisher (sparsity)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--heal-tokens",
        type=int,
        help="end by healing the saved model (structure kept) on this many tokens: RUN/healed",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run in --out and start over"
    )


def _add_runner_flags(p: argparse.ArgumentParser) -> None:
    """Where ``search`` evaluates its candidates (in process or on a Ray cluster)."""
    p.add_argument("--runner", choices=["inprocess", "ray"], help="where candidates are evaluated")
    p.add_argument("--workers", type=int, help="Ray evaluator workers (--runner ray)")
    p.add_argument(
        "--ray-address", help="join this Ray cluster: auto | host:port | ray://host:port"
    )
    p.add_argument("--worker-cpus", type=float, help="CPUs per Ray worker (fractions allowed)")
    p.add_argument("--worker-gpus", type=float, help="GPUs per Ray worker (e.g. 0.5)")
    p.add_argument(
        "--no-shard",
        dest="shard",
        action="store_false",
        default=None,
        help="Ray: never split a candidate's batch across workers (default: split when a "
        "stage has fewer candidates than workers and the fitness is additive)",
    )


def _add_baseline_command(sub) -> None:
    p = sub.add_parser("baseline", help="apply one published heuristic")
    p.add_argument(
        "method",
        choices=["shortgpt", "angular", "sleb", "last", "random", "uniform", "owl", "fisher"],
    )
    _add_search_flags(p)


def _add_export_command(sub) -> None:
    p = sub.add_parser("export", help="save one genome of a run (e.g. a Pareto point) as a model")
    p.add_argument("run", help="run directory")
    p.add_argument("--genome", required=True, help="genome key (from results/pareto.json)")
    p.add_argument("--out", required=True, help="where to save the model")
    p.add_argument(
        "--heal-tokens",
        type=int,
        help="heal the exported model on this many tokens (see `heal`): OUT is the healed "
        "model, OUT-unhealed the model as searched",
    )

    p = sub.add_parser(
        "heal",
        help="structure-preserving healing of a run's model by distillation: RUN/model -> "
        "RUN/healed",
    )
    p.add_argument("run", help="run directory (with model/)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens")
    p.add_argument("--mode", choices=["full", "lora"], default="full", help="updates")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 5e-5 full, 5e-4 lora)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence (default: the run's)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per step")
    p.add_argument("--no-distill", action="store_true", help="next-token loss, no teacher")
    p.add_argument("--no-autocast", action="store_true", help="float32 forward passes")
    p.add_argument("--out", help="where to save the healed model (default: RUN/healed)")
    _add_training_data_flags(p, "healing")
    p.add_argument(
        "--avoid",
        action="append",
        default=[],
        metavar="SOURCE:WINDOWS[:SEQ_LEN]",
        help="evaluation windows (first WINDOWS of SEQ_LEN, default 1024) the healing text "
        "must not overlap, beside the run's --eval-ppl ones (repeatable)",
    )


def _add_training_data_flags(p: argparse.ArgumentParser, what: str) -> None:
    """``--data`` and how to read it, for commands that train a saved model."""
    p.add_argument(
        "--data",
        help=f"{what} text: file.txt/.raw/.jsonl | HF dataset, any calibration source "
        "(default: new random windows of the run's calibration source)",
    )
    p.add_argument("--data-config", help="HF dataset config of --data")
    p.add_argument("--data-split", default="train", help="HF split of --data")
    p.add_argument("--text-field", default="text", help="jsonl key / dataset column of --data")


def _add_finetune_command(sub) -> None:
    p = sub.add_parser(
        "finetune", help="post-compression training of a run's best (e.g. width-shrunk) model"
    )
    p.add_argument("run", help="run directory (with model/)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens")
    p.add_argument(
        "--distill", action="store_true", help="train on KL to the run's dense model's logits"
    )
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per step")
    p.add_argument("--out", help="where to save the model (default: RUN/finetuned)")
    _add_training_data_flags(p, "training")


def _add_eval_command(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity and zero-shot accuracy of a model or a run's best model"
    )
    p.add_argument("model", help="model (as for --model) or a run directory")
    p.add_argument(
        "--ppl",
        action="append",
        help="dataset alias (wikitext2, c4), HF name or local file (repeatable)",
    )
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, help="first N windows only (default: all)")
    p.add_argument(
        "--tasks",
        type=lambda s: [t for t in s.split(",") if t],
        help="zero-shot tasks: arc_easy,arc_challenge,piqa,hellaswag,winogrande (offline or "
        "lm-eval); with lm-eval any of its tasks, e.g. wikitext",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "local", "lm-eval"],
        default="auto",
        help="--tasks backend; auto: local when --data-dir is given, else lm-eval if installed "
        "and the hub reachable",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("EVOSEARCH_DATA_DIR"),
        help="folder with arc/, piqa/, hellaswag/, winogrande/ (default: $EVOSEARCH_DATA_DIR)",
    )
    p.add_argument(
        "--lm-eval-include", help="folder of extra lm-eval task YAMLs (--backend lm-eval)"
    )
    p.add_argument("--limit", type=int, help="first N items of each task only (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward (--tasks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the results JSON here (and a markdown table beside it)")


def _add_metric_search_and_report_commands(sub) -> None:
    p = sub.add_parser(
        "metric-search", help="discover a symbolic pruning metric by genetic programming"
    )
    _add_metric_search_flags(p)

    p = sub.add_parser(
        "report", help="HTML report with figures for one run, or several runs compared"
    )
    p.add_argument("runs", nargs="+", help="run directories (each with results.json)")
    p.add_argument(
        "--out", help="output directory (default: the run directory; required for several runs)"
    )


def _one_line_warning(message, *_args, **_kwargs) -> None:
    print(f"evosearch: warning: {message}", file=sys.stderr)


def _guarded(run, args: argparse.Namespace) -> int:
    """``run(args)``, every expected failure turned into one line and exit code 2; an
    unexpected one into one line (exit code 1) that points to ``--debug`` for the traceback."""
    from evosearch.runners import WorkerLostError

    try:
        return run(args)
    except KeyboardInterrupt:
        print("evosearch: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except (ValueError, OSError, WorkerLostError, RecursionError) as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, RecursionError):
            message = f"input nested too deeply ({message})"
        print(f"evosearch: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line, trace with --debug
        if args.debug:
            raise
        print(
            f"evosearch: error: unexpected {type(exc).__name__}: {exc}; rerun with --debug for "
            "the traceback and report it",
            file=sys.stderr,
        )
        return 1


def _quiet_libraries() -> None:
    """evosearch prints its own progress; silence transformers' bars and warnings."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _run(args: argparse.Namespace) -> int:
    from evosearch import pipeline

    if args.command == "search":
        pipeline.run_search(_config(args), args.out, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "baseline":
        pipeline.run_baseline(_config(args), args.method, args.out)
    elif args.command == "export":
        if args.heal_tokens is None:
            out = pipeline.export_genome(args.run, args.genome, args.out)
            print(f"saved {out}")
        else:
            from evosearch.healing import heal_run

            unhealed = pipeline.export_genome(args.run, args.genome, f"{args.out}-unhealed")
            heal_run(args.run, args.heal_tokens, model_dir=unhealed, out_dir=args.out)
    elif args.command == "heal":
        _heal(args)
    elif args.command == "finetune":
        pipeline.finetune_run(
            args.run,
            args.tokens,
            out_dir=args.out,
            distill=args.distill,
            lr=args.lr,
            micro_batch=args.micro_batch,
            data=_data_source(args),
        )
    elif args.command == "eval":
        _eval(args)
    elif args.command == "metric-search":
        _metric_search(args)
    elif args.command == "report":
        from evosearch.report import write_report
        from evosearch.rundir import check_finished

        for run in args.runs:
            check_finished(run, model=False)

        print(f"report: {write_report(args.runs, args.out)}")
    return 0


def _data_source(args: argparse.Namespace) -> dict | None:
    """``--data`` and its options as a data-source dict; ``None`` (the run's calibration
    source) without ``--data``."""
    if args.data is None:
        return None
    return {
        "source": args.data,
        "config": args.data_config,
        "split": args.data_split,
        "text_field": args.text_field,
    }


def _eval_windows(item: str, cls):
    """``SOURCE:WINDOWS[:SEQ_LEN]`` -> ``cls(source, windows, seq_len)``."""
    parts = item.split(":")
    numbers = []
    while len(parts) > 1 and parts[-1].isdigit() and len(numbers) < 2:
        numbers.insert(0, int(parts.pop()))
    if not numbers:
        raise ValueError(f"--avoid {item!r}: expected SOURCE:WINDOWS[:SEQ_LEN]")
    return cls(":".join(parts), numbers[0], numbers[1] if len(numbers) > 1 else 1024)


def _heal(args: argparse.Namespace) -> None:
    from evosearch.healing import EvalWindows, HealConfig, heal_run, run_settings

    avoid = [_eval_windows(item, EvalWindows) for item in args.avoid]
    data = _data_source(args)
    config = HealConfig(
        tokens=args.tokens,
        mode=args.mode,
        lr=args.lr,
        rank=args.rank,
        alpha=2.0 * args.rank,
        seq_len=args.seq_len or run_settings(args.run)["seq_len"],
        micro_batch=args.micro_batch,
        autocast=not args.no_autocast,
    )
    heal_run(
        args.run,
        args.tokens,
        config=config,
        data=data,
        avoid=avoid,
        distill=not args.no_distill,
        out_dir=args.out,
    )


def _eval(args: argparse.Namespace) -> None:
    from evosearch.models import load_model
    from evosearch.pipeline import resolve_device

    backend = _zero_shot_backend(args)  # fails before loading the model
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    target = _eval_target(Path(args.model))
    model, tokenizer = load_model(
        str(target) if target.exists() else args.model, device=resolve_device(args.device)
    )
    results: dict = {"model": args.model, "model_dir": str(target)}
    if args.ppl:
        results.update(seq_len=args.seq_len, perplexity=_eval_perplexity(args, model, tokenizer))
    table = ""
    if args.tasks:
        scores = _zero_shot_scores(args, backend, model, tokenizer)
        results["zero_shot"] = {
            "backend": backend,
            "data_dir": args.data_dir if backend == "local" else None,
            "limit": args.limit,
            "tasks": scores,
        }
        from evosearch.zero_shot import format_table

        table = format_table(scores)
        print(table)
    if args.out:
        _write_eval(Path(args.out), results, table, args, backend)


def _zero_shot_backend(args: argparse.Namespace) -> str | None:
    """The zero-shot backend of ``--tasks`` (``None`` without tasks), its tasks and data
    checked."""
    from evosearch import lm_eval_backend
    from evosearch.zero_shot import check_tasks

    if args.tasks is None:
        return None
    backend, reason = lm_eval_backend.choose_backend(
        args.backend, data_dir=args.data_dir, installed=lm_eval_backend.lm_eval_installed()
    )
    print(f"zero-shot backend: {backend} ({reason})")
    if backend == "local":
        check_tasks(args.tasks, extra=lm_eval_backend.OFFLINE_LM_EVAL_TASKS)
        if not Path(args.data_dir).is_dir():
            raise FileNotFoundError(f"data directory not found: {args.data_dir}")
    return backend


def _eval_target(target: Path) -> Path:
    """The model to evaluate: ``target``, or a finished run directory's emitted model (its
    healed one if it was healed)."""
    from evosearch.rundir import check_finished, is_run_dir

    if not is_run_dir(target):
        return target
    check_finished(target)  # one line naming what is missing, and how to finish it
    healed = target / "healed"
    target = healed if (healed / "healing.json").is_file() else target / "model"
    print(f"evaluating {target}, the run's emitted model")
    return target


def _eval_perplexity(args: argparse.Namespace, model, tokenizer) -> dict:
    from evosearch.pipeline import evaluate_perplexity, load_eval_data

    out = {}
    for source in args.ppl:
        data = load_eval_data(source, tokenizer, args.seq_len, args.windows)
        ppl = evaluate_perplexity(model, data)
        out[source] = {"ppl": ppl, "windows": data.n_sequences}
        print(f"{source}: perplexity {ppl:.3f} ({data.n_sequences} windows of {args.seq_len})")
    return out


def _zero_shot_scores(args: argparse.Namespace, backend: str, model, tokenizer) -> dict:
    """Per-task scores of ``args.tasks`` on ``backend``, in the tasks' order."""
    from evosearch import lm_eval_backend
    from evosearch.zero_shot import evaluate_tasks

    if backend == "lm-eval":
        return lm_eval_backend.evaluate_lm_eval(
            model, tokenizer, args.tasks, args.limit,
            batch_size=args.batch_size, include_path=args.lm_eval_include,
        )  # fmt: skip
    offline = lm_eval_backend.OFFLINE_LM_EVAL_TASKS
    multiple_choice = [t for t in args.tasks if t not in offline]
    scores = {}
    if multiple_choice:
        scores = evaluate_tasks(
            model, tokenizer, multiple_choice, args.data_dir, args.limit,
            batch_size=args.batch_size,
        )  # fmt: skip
    if "wikitext" in args.tasks:
        scores["wikitext"] = lm_eval_backend.evaluate_wikitext_offline(
            model, tokenizer, args.data_dir, args.limit, batch_size=args.batch_size
        )
    return {t: scores[t] for t in args.tasks}


def _write_eval(out: Path, results: dict, table: str, args, backend) -> None:
    """``--out``: the results as JSON and, with zero-shot scores, their table as markdown."""
    out.write_text(json.dumps(results, indent=1) + "\n")
    if table:
        out.with_suffix(".md").write_text(
            f"Zero-shot, `{args.model}`, backend {backend}"
            + (f", first {args.limit} items per task" if args.limit is not None else "")
            + f"\n\n{table}\n"
        )


if __name__ == "__main__":
    sys.exit(main())
