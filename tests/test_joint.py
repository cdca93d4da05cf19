"""The composite-space mechanism and the joint drop x sparsity x bits space (issue 26)."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import build_model, hf_tokenizer, logits, random_ids

import evosearch
import search_spaces.joint  # noqa: F401 - registers the joint space (until pyproject names it)
from evosearch import quant
from evosearch.composite import CompositeSpace, Part, repair_levels
from evosearch.models import remove_blocks
from evosearch.strategies import EvoPress, EvoPressConfig, MultiBudgetEvoPress, Stage
from evosearch.surgery import SkippedBlock, apply_replacements
from search_spaces.joint import JointConfig, JointSpace

GROUP = 16


def _model():
    # a RoPE base other than the default, so an export that drops it fails the logits checks
    return build_model("llama", rope_parameters={"rope_theta": 500.0, "rope_type": "default"})


def _space(tmp_path, model=None, **kw):
    model = model or _model()
    config = JointConfig(**{"bits": 4, "group_size": GROUP, "pruner": "magnitude", **kw})
    space = JointSpace.build(
        model, random_ids(4, 16), config, db_root=tmp_path / "db", log=lambda m: None
    )
    return model, space


def _with(space, genome, **levels):
    """``genome`` with some part levels replaced (``drop={1: 1}``...), niche kept."""
    parts = {k: list(v) for k, v in space.split(genome).items()}
    for name, changes in levels.items():
        for i, v in changes.items():
            parts[name][i] = v
    return space.join(parts, space.niche(genome))


def _layer_bytes(space, i, level):
    ref = space.refs[i]
    return -(-quant.layer_bits(ref.shape, space.config_.ladder[level], GROUP) // 8)


# -- the composite mechanism ---------------------------------------------------------------------


def test_repair_reaches_the_window_or_says_it_cannot():
    costs = [3, 5, 7, 40]  # cost per level; unit 3 is coarse (a block, say)

    def delta(levels, u, step):
        return costs[u] * step

    def legal(levels, u, step):
        return 0 <= levels[u] + step <= 4

    def repair(levels, budget, others=()):
        total = sum(c * v for c, v in zip(costs, levels))
        ok = repair_levels(
            levels, total=total, delta=delta, budget=budget, tolerance=7, fill=[0, 1, 2],
            others=others, legal=legal,
        )  # fmt: skip
        return ok, sum(c * v for c, v in zip(costs, levels))

    levels = [4, 4, 4, 0]  # 60: the fill units come down, the highest levels first
    assert repair(levels, 40) == (True, 37) and max(levels[:3]) - min(levels[:3]) <= 1
    levels = [4, 4, 4, 0]  # 60 < 100 - 7 with the fill units at the top: only unit 3 helps
    assert repair(levels, 100) == (False, 60)
    ok, total = repair(levels, 100, others=[3])
    assert ok and 93 <= total <= 100 and levels[3] == 1  # 40 more, then the fill refills
    levels = [0, 0, 0, 3]  # 120 > 50 with the fill units at 0: unit 3 comes down
    assert repair(levels, 50, others=[3])[0] and levels[3] == 1


def test_composite_genome_keeps_group_sums_and_any_niche_is_valid():
    parts = [
        Part("a", (1, 1), ("x", "y"), (0, 0), limit=1),
        Part("b", (3, 3), ("x", "y"), (3, 3), fills=True),
    ]

    def cost(p):
        return sum(0 if d else 10 * b for d, b in zip(p["a"], p["b"]))

    space = CompositeSpace(parts, cost=cost, budgets=[30, 50], tolerance=10)
    g = space.start_genome(1)
    assert space.split(g) == {"a": (0, 0), "b": (2, 3)} and space.niche(g) == 1
    assert space.is_feasible(g) and space.spec.group_total(g.levels, 0) == space.layout.capacity
    too_small = _with(space, g, a={0: 1})  # y alone cannot reach 40 of the budget of 50
    assert not space.is_feasible(too_small)
    assert space.repair(too_small) == g  # so x is restored
    at_30 = space.join({"a": (1, 0), "b": (3, 0)}, niche=0)  # window 20..30: y fills it
    assert space.split(space.repair(at_30)) == {"a": (1, 0), "b": (3, 2)}
    both = space.join({"a": (1, 1), "b": (1, 1)}, niche=0)
    repaired = space.repair(both, np.random.default_rng(0))
    assert sum(space.split(repaired)["a"]) == 1 and space.is_feasible(repaired)  # the limit
    assert space.start_genome(0) == space.repair(space.start_genome(0))  # canonical


def test_optuna_samples_only_the_budget_that_varies_between_niches():
    from evosearch.jobs.strategy import _sampled_range, _varying_groups

    niches = [{0: 900, 1: k} for k in range(4)]  # a composite: slack group fixed, niche moves
    assert _varying_groups(niches) == (1,) and _sampled_range(niches) == (0, 3, 1)
    sparsity = [{0: 10}, {0: 12}, {0: 14}]  # every group moves: all sampled, as before
    assert _varying_groups(sparsity) is None and _sampled_range(sparsity) == (10, 14, 2)
    assert _varying_groups([3, 4, 5]) is None and _sampled_range([3, 4, 5]) == (3, 5, 1)


# -- the joint space: bytes ----------------------------------------------------------------------


def test_bytes_are_the_stored_codes_scales_and_zero_points_of_kept_layers(tmp_path):
    _, space = _space(tmp_path)
    uniform = space.uniform_genome()
    rung = space.config_.ladder.index(4)
    expected = sum(_layer_bytes(space, i, rung) for i in range(len(space.refs)))
    assert space.budgets == (expected,) and space.cost(uniform) == expected
    assert set(space.split(uniform)["bits"]) == {rung} and space.is_feasible(uniform)
    assert space.tolerance == max(
        _layer_bytes(space, i, b + 1) - _layer_bytes(space, i, b)
        for i in range(len(space.refs))
        for b in range(len(space.config_.ladder) - 1)
    )
    in_block_1 = [i for i, r in enumerate(space.refs) if r.block == 1]
    dropped = _with(space, uniform, drop={1: 1})
    assert space.cost(dropped) == expected - sum(_layer_bytes(space, i, rung) for i in in_block_1)
    pruned = _with(space, uniform, sparsity=dict.fromkeys(range(len(space.refs)), 3))
    assert space.cost(pruned) == expected  # zeros are stored densely: no bytes saved
    assert space.metrics(pruned)["sparsity"] == pytest.approx(0.3, abs=0.01)
    desc = space.describe(dropped)
    assert desc["dropped_blocks"] == [1] and desc["blocks"][1] == {
        "block": 1, "kept": False, "bytes": 0, "sparsity": 0.0,
        "bits_per_weight": desc["blocks"][0]["bits_per_weight"],
    }  # fmt: skip
    assert sum(b["bytes"] for b in desc["blocks"]) == space.cost(dropped)


def test_a_dropped_block_gives_its_bytes_to_more_bits_elsewhere(tmp_path):
    _, space = _space(tmp_path)
    uniform = space.uniform_genome()
    traded = space.repair(_with(space, uniform, drop={1: 1}), np.random.default_rng(0))
    assert space.dropped(traded) == [1] and space.is_feasible(traded)
    bits = space.split(traded)["bits"]
    kept = [b for b, r in zip(bits, space.refs) if r.block != 1]
    assert sum(kept) > len(kept) * space.config_.ladder.index(4)


@pytest.mark.parametrize("ranged", [False, True])
def test_every_genome_a_strategy_asks_for_is_within_its_budget_window(tmp_path, ranged):
    _, space = _space(tmp_path, **({"bits": None, "bits_range": (3.5, 6.5, 1)} if ranged else {}))
    rng = np.random.default_rng(0)
    config = EvoPressConfig(
        generations=8, offspring=16, initial_population=4, stages=(Stage(tokens=64, survivors=2),)
    )
    if ranged:
        budgets, labels = space.range_budgets()
        strategy = MultiBudgetEvoPress(
            space, budgets=budgets, labels=labels, config=config, rng=rng,
            initial=space.range_starts(),
        )  # fmt: skip
    else:
        strategy = EvoPress(space, config=config, rng=rng, initial=(space.uniform_genome(),))
    asked, values = [], np.random.default_rng(1)
    while (request := strategy.ask()) is not None:
        asked += request.genomes
        strategy.tell(request, list(values.random(len(request.genomes))))
    assert len(asked) > 60
    for g in asked:
        assert space.is_feasible(g), g.key()
        assert space.budget(g) - space.tolerance <= space.cost(g) <= space.budget(g)
    dims = {d for g in asked for d in ("drop", "sparsity") if any(space.split(g)[d])}
    assert dims == {"drop", "sparsity"}  # mutations move every dimension
    if ranged:
        assert {space.niche(g) for g in asked} == set(range(len(space.budgets)))


def test_strategies_drop_blocks_as_often_as_they_move_bits(tmp_path):
    """The joint space's own mutation draws a part, then a unit: about half of the
    drop + bits mutants of the start drop a block (a uniform unit draw: 4 blocks among
    32 units, far fewer), and the repair gives the freed bytes to bits."""
    _, space = _space(tmp_path, dimensions=("drop", "bits"))
    config = EvoPressConfig(
        generations=1, offspring=200, initial_population=0, stages=(Stage(tokens=64, survivors=1),)
    )
    start = space.uniform_genome()
    strategy = EvoPress(space, config=config, rng=np.random.default_rng(0), initial=(start,))
    strategy.tell(first := strategy.ask(), [1.0] * len(first.genomes))
    offspring = [g for g in strategy.ask().genomes if g != start]
    dropped = [g for g in offspring if any(space.split(g)["drop"])]
    assert 0.3 < len(dropped) / len(offspring) < 0.8
    assert all(space.is_feasible(g) for g in dropped)
    kept_bits = [max(space.split(g)["bits"]) for g in dropped]
    assert max(kept_bits) > max(space.split(start)["bits"])  # the freed bytes bought bits


def test_range_starts_trade_the_least_influential_blocks_for_bits(tmp_path):
    _, space = _space(tmp_path, bits=None, bits_range=(3.5, 5.5, 1))
    plain = space.range_starts()
    starts = space.range_starts([2, 0, 1, 3])
    assert starts[: len(plain)] == plain and len(starts) > len(plain)
    for g in starts[len(plain) :]:
        assert space.is_feasible(g) and space.dropped(g) == [2]  # 10-30 % of 4 blocks: 1
        same_budget = plain[space.niche(g)]
        bits = [b for b, r in zip(space.split(g)["bits"], space.refs) if r.block != 2]
        kept_before = [
            b for b, r in zip(space.split(same_budget)["bits"], space.refs) if r.block != 2
        ]
        assert sum(bits) > sum(kept_before)  # the dropped block's bytes bought bits
    _, bits_only = _space(tmp_path, bits=None, bits_range=(3.5, 5.5, 1), dimensions=("bits",))
    assert bits_only.range_starts([2, 0, 1, 3]) == bits_only.range_starts()


def test_switched_off_dimensions_stay_put(tmp_path):
    _, space = _space(tmp_path, dimensions=("bits",))
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = space.random_genome(rng)
        assert not any(space.split(g)["drop"]) and not any(space.split(g)["sparsity"])


def test_config_is_validated():
    with pytest.raises(ValueError, match="bits"):
        JointConfig()
    with pytest.raises(ValueError, match="not both"):
        JointConfig(bits=4, bits_range=(3, 6, 1))
    with pytest.raises(ValueError, match="dimensions must include bits"):
        JointConfig(bits=4, dimensions=("drop",))
    with pytest.raises(ValueError, match="sparsity_levels"):
        JointConfig(bits=4, sparsity_levels=(0.1, 0.2))
    with pytest.raises(ValueError, match="ladder"):
        JointConfig(bits=7)


def test_a_range_below_the_lowest_rung_is_refused(tmp_path):
    with pytest.raises(ValueError, match="below uniform 2"):
        _space(tmp_path, bits=None, bits_range=(3, 6, 1))  # 2 bits + group-16 grids: 3.125


# -- materialisation -----------------------------------------------------------------------------


def _by_hand(weight, fraction, bits):
    """Magnitude pruning (the smallest ``|w|`` of each row, counts spread as evenly as
    possible), then round-to-nearest on the group grid: independent of the space's code."""
    rows, cols = weight.shape
    base, extra = divmod(round(fraction * rows * cols), rows)
    pruned = weight.clone()
    for r in range(rows):
        pruned[r, weight[r].abs().argsort()[: base + (r < extra)]] = 0
    return quant.rtn(pruned, bits, GROUP).dequantize()


def test_candidate_weights_are_quantize_of_sparsify_and_dropped_blocks_are_skipped(tmp_path):
    model, space = _space(tmp_path)
    ids = random_ids(2, 16, seed=1)
    n = len(space.refs)
    genome = _with(
        space,
        space.uniform_genome(),
        drop={2: 1},
        sparsity={i: i % 4 for i in range(n)},
        bits={i: i % 6 for i in range(n)},
    )
    parts = space.split(genome)
    reps = space.replacements(model, genome)
    assert isinstance(reps["model.layers.2"], SkippedBlock)
    assert not any(k.startswith("model.layers.2.") for k in reps)
    by_hand = copy.deepcopy(model)
    for i, ref in enumerate(space.refs):
        if ref.block == 2:
            continue
        frac = space.config_.sparsity_levels[parts["sparsity"][i]]
        want = _by_hand(ref.weight(model).float(), frac, space.config_.ladder[parts["bits"][i]])
        torch.testing.assert_close(reps[ref.name].weight, want, rtol=0, atol=0)
        assert int((want == 0).sum()) >= round(frac * ref.numel)  # pruned weights stay zero
        ref.module(by_hand).weight.data.copy_(want)
    remove_blocks(by_hand, {2})
    with apply_replacements(model, reps):
        got = logits(model, ids)
    torch.testing.assert_close(got, logits(by_hand, ids), rtol=0, atol=1e-5)


# -- exports -------------------------------------------------------------------------------------


def _front_like_genome(space):
    n = len(space.refs)
    genome = _with(
        space, space.uniform_genome(), drop={1: 1}, sparsity={i: i % 3 for i in range(n)}
    )
    return space.repair(genome, np.random.default_rng(0))


def test_compressed_tensors_export_drops_blocks_and_reloads_to_the_candidate(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, space = _space(tmp_path)
    genome = _front_like_genome(space)
    assert space.dropped(genome) == [1] and space.is_feasible(genome)
    ids = random_ids(2, 16, seed=1)
    with apply_replacements(model, space.replacements(model, genome)):
        want = logits(model, ids)
    profile = space.save(model, hf_tokenizer(), genome, str(tmp_path / "ct"))
    assert profile["bytes"] == space.cost(genome) and profile["file_bytes"] > profile["bytes"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "ct" / "joint_profile.json").read_text())["dropped_blocks"] == [
        1
    ]


def test_gguf_export_drops_blocks_and_reloads_to_the_candidate(tmp_path):
    from transformers import AutoModelForCausalLM

    model, space = _space(tmp_path, bits=None, format="gguf", gguf_type="Q4_0")
    genome = _front_like_genome(space)
    assert space.dropped(genome) == [1] and space.is_feasible(genome)
    ids = random_ids(2, 16, seed=1)
    with apply_replacements(model, space.replacements(model, genome)):
        want = logits(model, ids)
    profile = space.save(model, None, genome, str(tmp_path / "g"))
    assert profile["file_bytes"] > profile["bytes"] == space.cost(genome)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "g", gguf_file="model.gguf", dtype=torch.float32
    )
    assert loaded.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-4)


# -- searches end to end -------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny"
    build_model("llama", max_position_embeddings=256).save_pretrained(path)
    hf_tokenizer().save_pretrained(path)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path, text


def _config(model, text, tmp_path, strategy="evopress", **space):
    return {
        "model": str(model),
        "data": {"source": str(text), "n_sequences": 4, "seq_len": 16},
        "space": {"name": "joint", "group_size": GROUP, "pruner": "magnitude", **space},
        "strategy": {
            "name": strategy,
            "loop": {
                "generations": 2,
                "offspring": 4,
                "initial_population": 0,
                "stages": [[16, 2], [64, 1]],
            },
        },  # fmt: skip
        "db_dir": str(tmp_path / "db"),
    }


@pytest.mark.parametrize("strategy", ["evopress", "nsga2"])
def test_front_of_kl_against_bytes_from_the_python_api(tmp_path, model_dir, strategy):
    """Multi-budget EvoPress and NSGA-II over a range of byte budgets: every front point is
    a feasible genome of its budget, and the report shows where its bytes went."""
    config = _config(*model_dir, tmp_path, strategy, bits_range=[3.5, 6.5, 1])
    config["save_model"] = False
    results = evosearch.run(config, out=str(tmp_path / "run"))
    front = json.loads((tmp_path / "run" / "pareto_front.json").read_text())
    assert front["objectives"] == ["kl", "bytes"] and front["front"]
    weights = 4 * 9216  # the tiny model's block linears
    budgets = [int(bits * weights // 8) for bits in (3.5, 4.5, 5.5, 6.5)]
    assert results["space"]["budgets_bytes"] == budgets
    window = results["space"]["tolerance_bytes"]
    for point in front["front"]:
        assert any(b - window <= point["bytes"] <= b for b in budgets), point["bytes"]
        assert sum(b["bytes"] for b in point["blocks"]) == point["bytes"]
    assert results["pareto"]["size"] == len(front["front"])
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Where the bytes went" in page
    if strategy == "evopress" and importlib.util.find_spec("compressed_tensors"):
        from evosearch.jobs.models import export_genome

        point = front["front"][0]  # any point of the front exports, its blocks removed
        export_genome(tmp_path / "run", point["genome"], tmp_path / "p0")
        profile = json.loads((tmp_path / "p0" / "joint_profile.json").read_text())
        assert profile["bytes"] == point["bytes"] and profile["genome"] == point["genome"]


def test_cli_joint_search_exports_a_model_that_reloads(tmp_path, model_dir, capsys):
    pytest.importorskip("compressed_tensors")
    import yaml
    from transformers import AutoModelForCausalLM

    from evosearch.cli import main

    config = tmp_path / "joint.yaml"
    config.write_text(yaml.safe_dump(_config(*model_dir, tmp_path, bits=4)))
    out = tmp_path / "run"
    assert main(["search", "--config", str(config), "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    results = json.loads((out / "results.json").read_text())
    assert results["best"]["bytes"] <= 24192  # 4 bits + group-16 scales and zero points
    assert results["calibration_fitness"]["evopress"] >= 0
    profile = json.loads((out / "model" / "joint_profile.json").read_text())
    assert profile["genome"] == results["best"]["genome"]
    loaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert loaded.config.num_hidden_layers == results["best"]["blocks_kept"]
