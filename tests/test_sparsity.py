"""The sparsity space: level ladders, the level database, materialisation, OWL and saving."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import build_model, hf_tokenizer, logits, random_ids

from evosearch.genome import Genome
from evosearch.leveldb import LevelDatabase
from evosearch.operators import level_switch_mutation
from evosearch.pruning import block_linears, collect_stats, set_weight_
from evosearch.surgery import apply_replacements
from evosearch.symbolic import get_pruner
from search_spaces.sparsity import SparsityConfig, SparsitySpace, measure_sparsity
from search_spaces.sparsity_baselines import allocate, fisher_errors, owl_sparsities


def _space(tmp_path, arch="llama", log=None, **kw):
    model = build_model(arch)
    ids = random_ids(4, 16)
    messages = []
    config = SparsityConfig(**{"sparsity": 0.5, "level_step": 0.05, "max_level_shift": 3, **kw})
    space = SparsitySpace.build(
        model, ids, config, db_root=tmp_path / "db", log=log or messages.append
    )
    return model, ids, space, messages


def _pruned_weights(space, genome):
    return sum(space.pruned_counts(genome))


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_level_switches_keep_the_global_sparsity_exact(tmp_path, arch):
    model, ids, space, _ = _space(tmp_path, arch)
    uniform = space.uniform_genome()
    assert space.spec.is_valid(uniform)
    total = _pruned_weights(space, uniform)
    assert total == sum(round(0.5 * r.numel) for r in space.refs)
    rng = np.random.default_rng(0)
    genome = uniform
    for _ in range(20):
        genome = level_switch_mutation(genome, space.spec, rng, 2)
        assert space.spec.is_valid(genome)
        assert _pruned_weights(space, genome) == total
    assert genome != uniform
    # one level step prunes the same number of weights in every layer
    steps = {lad.step for lad in space.ladders}
    assert len(steps) == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D stores (in, out)
def test_materialised_candidate_equals_direct_pruning(tmp_path, arch):
    model, ids, space, _ = _space(tmp_path, arch, store_dtype="float32")
    rng = np.random.default_rng(1)
    genome = level_switch_mutation(space.uniform_genome(), space.spec, rng, 3)
    stats = collect_stats(model, ids)
    pruner = get_pruner("wanda")
    reference = build_model(arch)
    for ref, s in zip(block_linears(reference), space.layer_sparsities(genome)):
        w = pruner.prune(ref.weight(reference).detach(), stats[ref.name], s)
        set_weight_(ref.module(reference), w)
    dense = logits(model, ids)
    with apply_replacements(model, space.replacements(model, genome)):
        candidate = logits(model, ids)
    torch.testing.assert_close(candidate, logits(reference, ids))
    assert not torch.allclose(candidate, dense)
    torch.testing.assert_close(logits(model, ids), dense)  # restored


def test_only_changed_layers_are_reloaded(tmp_path, monkeypatch):
    model, ids, space, _ = _space(tmp_path)
    uniform = space.uniform_genome()
    space.replacements(model, uniform)
    calls = []
    original = space.db.get
    monkeypatch.setattr(space.db, "get", lambda *a: calls.append(a[0]) or original(*a))
    genome = level_switch_mutation(uniform, space.spec, np.random.default_rng(2), 1)
    space.replacements(model, genome)
    changed = [r.name for r, a, b in zip(space.refs, uniform.levels, genome.levels) if a != b]
    # a score pruner's database stores a weight and its ranks per layer: both are read once
    assert sorted(calls) == sorted(changed * 2) and len(changed) == 2


def test_database_is_reused_and_keyed_by_data_and_pruner(tmp_path):
    model, ids, space, messages = _space(tmp_path)
    assert any("built" in m for m in messages)
    assert space.db.size_bytes > 0
    _, _, again, messages = _space(tmp_path)
    assert any("reusing" in m for m in messages) and again.db.path == space.db.path
    _, _, other, _ = _space(tmp_path, pruner="magnitude")
    assert other.db.path != space.db.path
    meta = json.loads((space.db.path / "meta.json").read_text())
    assert meta["parts"]["pruner"] == "wanda" and meta["build_seconds"] >= 0
    # ranks serve any ladder: another target or level step reuses the database
    _, _, finer, messages = _space(tmp_path, sparsity=0.6, level_step=0.01)
    assert any("reusing" in m for m in messages) and finer.db.path == space.db.path
    # SparseGPT stores every level's weight, so its key depends on the ladders
    _, _, sgpt, _ = _space(tmp_path, pruner="sparsegpt")
    _, _, sgpt_finer, _ = _space(tmp_path, pruner="sparsegpt", level_step=0.02)
    assert sgpt_finer.db.path != sgpt.db.path


def test_ranked_database_size_does_not_grow_with_levels(tmp_path):
    _, _, coarse, _ = _space(tmp_path / "a", max_level_shift=1)
    _, _, fine, _ = _space(tmp_path / "b", level_step=0.01, max_level_shift=12)
    assert sum(lad.top + 1 for lad in fine.ladders) > 5 * sum(
        lad.top + 1 for lad in coarse.ladders
    )
    assert fine.db.size_bytes == coarse.db.size_bytes
    # weight (float16) + int16 ranks: 4 bytes per weight, plus safetensors headers
    weights = sum(r.numel for r in coarse.refs)
    assert 4 * weights <= coarse.db.size_bytes < 4 * weights + 4096 * len(coarse.refs)


def test_a_killed_build_leaves_no_database(tmp_path):
    def build():
        yield "a", {"0": torch.zeros(2)}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LevelDatabase.open_or_build(tmp_path, {"x": 1}, ["a", "b"], build, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_levels_keep_each_size_group_exact(tmp_path, pattern):
    model, ids, space, _ = _space(tmp_path, sparsity=None, pattern=pattern)
    n, m = (int(x) for x in pattern.split(":"))
    uniform = space.uniform_genome()
    with apply_replacements(model, space.replacements(model, uniform)):
        for ref in space.refs:
            w = ref.weight(model)
            assert ((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all()
    rng = np.random.default_rng(3)
    genome = level_switch_mutation(uniform, space.spec, rng, 3)
    assert _pruned_weights(space, genome) == _pruned_weights(space, uniform)
    with apply_replacements(model, space.replacements(model, genome)):
        for ref, level in zip(space.refs, genome.levels):
            keep = n + space.ladders[space.refs.index(ref)].centre - level
            w = ref.weight(model)
            assert ((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= keep).all()


def test_genome_for_maps_any_allocation_to_the_budget(tmp_path):
    _, _, space, _ = _space(tmp_path)
    rng = np.random.default_rng(4)
    wishes = list(rng.uniform(0.3, 0.7, len(space.refs)))
    genome = space.genome_for(wishes)
    assert space.spec.is_valid(genome)
    assert space.genome_for(space.layer_sparsities(genome)) == genome


def test_owl_sparsities_average_to_the_target_and_favour_outliers():
    s = owl_sparsities([0.01, 0.02, 0.05, 0.03], target=0.7, lam=0.08)
    assert np.isclose(np.mean(s), 0.7)
    assert np.isclose(max(s) - min(s), 0.16)
    assert s[2] == min(s) and s[0] == max(s)  # most outliers -> least pruned


def test_allocate_reaches_the_brute_force_optimum_at_the_exact_budget():
    import itertools

    from evosearch.genome import LevelSpec

    rng = np.random.default_rng(0)
    # convex error curves of random steepness, four units, budget 6 of 12 levels
    errors = [list(np.cumsum(np.sort(rng.uniform(0, a, 3)))) for a in (0.1, 1.0, 3.0, 0.5)]
    errors = [[0.0, *e] for e in errors]
    spec = LevelSpec(max_levels=(3, 3, 3, 3), groups=(0, 0, 0, 0), budgets={0: 6})
    start = Genome((2, 1, 1, 2))
    best = min(
        (c for c in itertools.product(range(4), repeat=4) if sum(c) == 6),
        key=lambda c: sum(e[v] for e, v in zip(errors, c)),
    )
    got = allocate(errors, spec, start)
    assert spec.is_valid(got)
    assert got.levels == best
    assert got != start
    # with a bound on the total shift from the start, the result stays within it
    bounded = allocate(errors, spec, start, max_shift=2)
    assert spec.is_valid(bounded)
    assert sum(abs(a - b) for a, b in zip(bounded.levels, start.levels)) <= 2
    assert sum(e[v] for e, v in zip(errors, bounded.levels)) < sum(
        e[v] for e, v in zip(errors, start.levels)
    )


def test_fisher_errors_weight_each_removed_weight_by_its_squared_gradient(tmp_path):
    model, ids, space, _ = _space(tmp_path, store_dtype="float32")
    errors = fisher_errors(model, space, ids, log=None)
    assert len(errors) == len(space.refs)
    assert [len(e) for e in errors] == [lad.top + 1 for lad in space.ladders]
    ref = space.refs[2]
    weight = ref.module(model).weight.requires_grad_(True)
    model.eval()
    fisher = torch.zeros_like(weight)
    for seq in ids:  # an independent empirical Fisher: one backward per sequence
        model.zero_grad()
        model(input_ids=seq[None], labels=seq[None]).loss.backward()
        fisher += weight.grad.detach() ** 2
    model.zero_grad()
    w = weight.detach()
    for level in (0, space.ladders[2].top):
        removed = w - space.level_weight(ref, level).float()
        assert errors[2][level] == pytest.approx(float((fisher * removed**2).sum()), rel=1e-4)
    assert all(e == sorted(e) and e[-1] > e[0] for e in errors)  # Wanda's levels nest


def test_fisher_allocation_is_a_warm_start_and_a_baseline(tmp_path):
    from helpers import search_args

    from evosearch.cli import main

    model_dir, text = _tiny_files(tmp_path)
    out = tmp_path / "run"
    args = [a for a in search_args(model_dir, text, out) if a not in ("--drop", "2")]
    argv = [*args, "--space", "sparsity", "--target", "0.6", "--level-step", "0.05",
            "--max-level-shift", "3", "--db-dir", str(tmp_path / "db"),
            "--warm-start", "fisher", "--baselines", "uniform,fisher"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    warm = results["baselines"]["fisher"]
    assert warm["genome"] in {e["genome"] for e in results["evaluations"]}  # it was searched
    assert warm["genome"] != results["baselines"]["uniform"]["genome"]
    assert warm["sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert set(results["calibration_fitness"]) == {"evopress", "uniform", "fisher"}
    # the search keeps the best it saw, so it is no worse than its warm start
    fit = results["calibration_fitness"]
    assert fit["evopress"] <= fit["fisher"] + 1e-6


def test_save_writes_a_normal_model_and_a_measured_profile(tmp_path):
    from transformers import AutoModelForCausalLM

    model, ids, space, _ = _space(tmp_path)
    genome = level_switch_mutation(space.uniform_genome(), space.spec, np.random.default_rng(5), 2)
    out = tmp_path / "model"
    space.save(model, hf_tokenizer(), genome, str(out))
    profile = json.loads((out / "sparsity_profile.json").read_text())
    # magnitude of exact zeros can only exceed the plan (a weight may already be 0)
    assert profile["measured_sparsity"] == pytest.approx(profile["planned_sparsity"], abs=1e-3)
    assert profile["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with apply_replacements(model, space.replacements(model, genome)):
        expected = logits(model, ids)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-3, atol=1e-3)
    assert measure_sparsity(out, [r.name for r in space.refs])["measured_sparsity"] > 0.49


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "target sparsity"),
        ({"sparsity": 1.2}, "sparsity must lie"),
        ({"sparsity": 0.5, "pattern": "2:4", "level_step": 0.02}, None),
        ({"sparsity": 0.6, "pattern": "2:4"}, "means sparsity"),
        ({"sparsity": 0.5, "pruner": "obs"}, "magnitude"),
        ({"sparsity": 0.5, "pruner": "missing.json"}, "does not exist"),
        ({"sparsity": 0.5, "max_level_shift": 40}, "max_level_shift"),
        ({"sparsity": 0.97}, "max_layer_sparsity"),
    ],
)
def test_config_validation(kwargs, match):
    if match is None:
        assert SparsityConfig(**kwargs).target == 0.5
        return
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        SparsityConfig(**kwargs)


def test_sparsegpt_database_matches_exact_sparsities(tmp_path):
    model, ids, space, _ = _space(tmp_path, pruner="sparsegpt", store_dtype="float32")
    genome = space.uniform_genome()
    with apply_replacements(model, space.replacements(model, genome)):
        for ref in space.refs:
            w = ref.weight(model)
            assert int((w == 0).sum()) == round(0.5 * ref.numel)


def test_start_block_is_the_first_pruned_block(tmp_path):
    _, _, space, _ = _space(tmp_path)
    assert space.start_block(space.uniform_genome()) == 0


def _tiny_files(tmp_path):
    """A saved tiny Llama with its tokenizer, and a calibration text file."""
    model_dir = tmp_path / "tiny"
    build_model("llama", max_position_embeddings=256).save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return model_dir, text


def test_cli_sparsity_search_end_to_end(tmp_path):
    from helpers import search_args

    from evosearch.cli import main

    model_dir, text = _tiny_files(tmp_path)
    out = tmp_path / "run"
    args = [a for a in search_args(model_dir, text, out) if a not in ("--drop", "2")]
    argv = [*args, "--space", "sparsity", "--target", "0.6", "--pruner", "wanda",
            "--level-step", "0.05", "--max-level-shift", "3", "--db-dir", str(tmp_path / "db"),
            "--baselines", "uniform,owl", "--eval-ppl", str(text), "--eval-seq-len", "32",
            "--eval-windows", "2"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["best"]["sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert set(results["calibration_fitness"]) == {"evopress", "uniform", "owl"}
    # the search starts from the uniform allocation
    uniform = results["baselines"]["uniform"]["genome"]
    assert uniform in {e["genome"] for e in results["evaluations"]}
    assert results["baselines"]["owl"]["genome"] != uniform
    assert set(results["perplexity"]) == {"dense", "evopress", "uniform", "owl"}
    profile = json.loads((out / "model" / "sparsity_profile.json").read_text())
    assert profile["measured_sparsity"] == pytest.approx(0.6, abs=2e-3)
    assert (out / "report.html").is_file()
    from evosearch.report import block_sparsities, load_run

    per_block = block_sparsities(load_run(out))
    assert set(per_block) == {"evopress", "uniform", "owl"}
    assert per_block["uniform"] == pytest.approx([0.6] * 4, abs=1e-3)
    assert len(per_block["owl"]) == 4
    assert main([*argv, "--resume"]) == 0  # a finished run resumes without new evaluations
    again = json.loads((out / "results.json").read_text())
    assert again["best"] == results["best"]


def test_cli_rejects_layer_drop_flags_in_the_sparsity_space(tmp_path, capsys):
    from evosearch.cli import main

    code = main(["search", "--space", "sparsity", "--target", "0.5", "--drop", "2",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    assert code != 0
    assert "layer-drop" in capsys.readouterr().err


def test_cli_owl_baseline_saves_a_pruned_model(tmp_path):
    from evosearch.cli import main

    model_dir, text = _tiny_files(tmp_path)
    out = tmp_path / "owl"
    argv = ["baseline", "owl", "--space", "sparsity", "--target", "0.7", "--model",
            str(model_dir), "--data", str(text), "--n-sequences", "4", "--seq-len", "16",
            "--level-step", "0.05", "--db-dir", str(tmp_path / "db"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    profile = json.loads((out / "model" / "sparsity_profile.json").read_text())
    assert profile["measured_sparsity"] == pytest.approx(0.7, abs=2e-3)
    layers = profile["measured_layer_sparsity"]
    assert max(layers.values()) - min(layers.values()) > 0.01  # not the uniform allocation


def test_max_total_shift_bounds_every_searched_genome(tmp_path):
    from evosearch.strategies import EvoPress, EvoPressConfig, Stage

    _, _, space, _ = _space(tmp_path, max_total_shift=4)
    strategy = EvoPress(
        space,
        config=EvoPressConfig(
            generations=3,
            offspring=6,
            initial_population=6,
            stages=(Stage(tokens=8, survivors=1),),
        ),
        rng=np.random.default_rng(0),
        initial=[space.uniform_genome()],
    )
    seen = []
    while (request := strategy.ask()) is not None:
        seen.extend(request.genomes)
        strategy.tell(request, [float(space.total_shift(g) % 3) for g in request.genomes])
    assert len(set(seen)) > 6
    assert all(space.is_feasible(g) for g in seen)
    assert max(space.total_shift(g) for g in seen) <= 4
    assert max(space.total_shift(g) for g in seen) > 0


@pytest.mark.parametrize("strategy", ["tpe", "nsga2"])
def test_optuna_strategies_search_the_sparsity_space_at_exact_budget(tmp_path, strategy):
    from evosearch.cli import main

    model_dir, text = _tiny_files(tmp_path)
    out = tmp_path / strategy
    argv = ["search", "--space", "sparsity", "--target", "0.5", "--model", str(model_dir),
            "--data", str(text), "--n-sequences", "4", "--seq-len", "16", "--generations", "2",
            "--offspring", "4", "--strategy", strategy, "--level-step", "0.05",
            "--db-dir", str(tmp_path / "db"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert 4 < results["n_evaluations"] <= 12  # a repeated genome is not evaluated twice
    genomes = {e["genome"] for e in results["evaluations"]}
    assert len(genomes) > 1
    # one group: every sampled allocation has the same level sum, the uniform one's
    sums = {sum(int(c, 36) for c in key) for key in genomes}
    assert len(sums) == 1
    assert results["best"]["sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_range_space_reaches_uniform_allocations_at_both_ends(tmp_path):
    _, _, space, _ = _space(tmp_path, sparsity=None, sparsity_range=(0.4, 0.6))
    assert space.range_targets() == [0.4, 0.45, 0.5, 0.55, 0.6]
    budgets, labels = space.range_budgets()
    assert labels == ["0.4", "0.45", "0.5", "0.55", "0.6"]
    assert [b[0] for b in budgets] == sorted(b[0] for b in budgets)
    n = len(space.refs)
    for b, target in zip(budgets, space.range_targets()):
        genome = space.genome_for([target] * n, b)
        assert sum(genome.levels) == b[0]
        # within half a weight per layer of the target (a layer prunes a whole number)
        slack = 0.5 * len(space.refs) / space.total_weights
        assert space.metrics(genome)["sparsity"] == pytest.approx(target, abs=slack)
        # aligned ladders: every layer sits at the target's uniform allocation exactly
        for count, ref in zip(space.pruned_counts(genome), space.refs):
            assert abs(count - target * ref.numel) <= 1
    # one level is level_step x gcd of the layer sizes, finer than a single target's step
    sizes = [r.numel for r in space.refs]
    assert len(set(sizes)) > 1
    assert space.ladders[0].step == pytest.approx(0.05 * math.gcd(*sizes))
    mean = sum(sizes) / len(sizes)
    assert space.ladders[0].step < 0.05 * mean
    # a mutation switch moves about one single-target step's weights
    assert space.spec.switch_size == round(0.05 * mean / space.ladders[0].step) > 1
    # beyond the top target, a ladder reaches as many weights as a single target's 3 levels
    for lad, ref in zip(space.ladders, space.refs):
        above = lad.base + lad.top * lad.step - 0.6 * ref.numel
        assert above >= min(3 * 0.05 * mean, (0.95 - 0.6) * ref.numel - lad.step) - 1e-6
    with pytest.raises(ValueError, match="not both"):
        SparsityConfig(sparsity=0.5, sparsity_range=(0.4, 0.6))
    with pytest.raises(ValueError, match="low < high"):
        SparsityConfig(sparsity_range=(0.6, 0.4))


@pytest.mark.parametrize("strategy", ["evopress", "nsga2"])
def test_cli_sparsity_range_search_returns_a_density_front(tmp_path, strategy):
    from evosearch.cli import main
    from evosearch.pareto import hypervolume

    model_dir, text = _tiny_files(tmp_path)
    out = tmp_path / strategy
    argv = ["search", "--space", "sparsity", "--sparsity-range", "0.4,0.6",
            "--model", str(model_dir), "--data", str(text), "--n-sequences", "4",
            "--seq-len", "16", "--generations", "3", "--offspring", "6", "--initial-population",
            "5", "--strategy", strategy, "--stages", "16:3,64:1", "--level-step", "0.05",
            "--max-level-shift", "2", "--db-dir", str(tmp_path / "db"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    pareto = json.loads((out / "pareto_front.json").read_text())
    assert pareto["objectives"] == ["kl", "density"]
    assert pareto["reference"][1] == 1.0  # the dense model
    points = [(p["kl"], p["density"]) for p in pareto["front"]]
    assert len(points) >= 2
    assert pareto["hypervolume"] == hypervolume(points, pareto["reference"]) > 0
    densities = {round(p["density"], 3) for p in pareto["front"]}
    assert all(0.4 - 1e-3 <= d <= 0.6 + 1e-3 for d in densities)
    if strategy == "evopress":  # one niche per step of the range
        assert densities <= {0.6, 0.55, 0.5, 0.45, 0.4}
        # every budget is searched, and each starts from its uniform allocation
        results = json.loads((out / "results.json").read_text())
        assert set(results["history"][-1]["niches"]) == {"0.4", "0.45", "0.5", "0.55", "0.6"}
        assert len(points) == 5  # lower density always costs KL on a real model


def test_range_warm_start_gives_every_sparsity_its_fisher_allocation(tmp_path, capsys):
    from evosearch.cli import main

    model_dir, text = _tiny_files(tmp_path)
    out = tmp_path / "range"
    argv = ["search", "--space", "sparsity", "--sparsity-range", "0.4,0.6",
            "--model", str(model_dir), "--data", str(text), "--n-sequences", "4",
            "--seq-len", "16", "--generations", "1", "--offspring", "4", "--stages", "16:2,64:1",
            "--level-step", "0.05", "--max-level-shift", "2", "--db-dir", str(tmp_path / "db"),
            "--warm-start", "fisher", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    _, _, space, _ = _space(tmp_path / "x", sparsity=None, sparsity_range=(0.4, 0.6),
                            level_step=0.05, max_level_shift=2)  # fmt: skip
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("fisher:")]
    found = {float(x.split("at sparsity ")[1].split(",")[0]) for x in lines}
    assert found == {0.4, 0.45, 0.5, 0.55, 0.6}  # one allocation per sparsity of the range
    assert all(int(x.split(", ")[-1].split()[0]) > 0 for x in lines)  # none is uniform
    seen = {e["genome"] for e in results["evaluations"]}
    for target in (0.4, 0.45, 0.5, 0.55, 0.6):  # a non-uniform genome at every budget
        at = [Genome.from_key(g) for g in seen]
        at = [g for g in at if abs(space.metrics(g)["sparsity"] - target) < 1e-3]
        assert any(space.total_shift(g) > 0 for g in at), target


def test_anchored_step_carries_an_allocation_pattern_to_another_sparsity(tmp_path):
    from evosearch.operators import anchored_step

    _, _, space, _ = _space(tmp_path, sparsity=None, sparsity_range=(0.4, 0.6))
    uniforms = space.range_uniform_genomes()
    budgets = space.range_budgets()[0]
    assert [sum(u.levels) for u in uniforms] == [b[0] for b in budgets]
    rng = np.random.default_rng(0)
    spec = dataclasses.replace(space.spec, budgets=budgets[2])
    elite = level_switch_mutation(uniforms[2], spec, rng, 3)  # a pattern at 50 %
    offset = [e - u for e, u in zip(elite.levels, uniforms[2].levels)]
    assert any(offset)
    for target in (1, 3):  # 45 % and 55 %: the same offsets from their uniform allocations
        child = anchored_step(elite, space.spec, rng, uniforms[2], uniforms[target])
        assert [c - u for c, u in zip(child.levels, uniforms[target].levels)] == offset
    # where a layer cannot follow (its ladder ends), the budget is still met exactly
    top = Genome(tuple(space.spec.max_levels))
    child = anchored_step(top, space.spec, rng, uniforms[0], uniforms[4])
    assert sum(child.levels) == budgets[4][0]
    assert all(0 <= v <= m for v, m in zip(child.levels, space.spec.max_levels))


def test_cli_offset_steps(tmp_path, capsys):
    from evosearch.cli import main

    model_dir, text = _tiny_files(tmp_path)
    argv = ["search", "--space", "sparsity", "--sparsity-range", "0.4,0.6", "--offset-steps",
            "--model", str(model_dir), "--data", str(text), "--n-sequences", "4",
            "--seq-len", "16", "--generations", "2", "--offspring", "6", "--initial-population",
            "5", "--stages", "16:3,64:1", "--level-step", "0.05", "--max-level-shift", "2",
            "--db-dir", str(tmp_path / "db"), "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["strategy"]["offset_steps"] is True
    front = json.loads((tmp_path / "run" / "pareto_front.json").read_text())["front"]
    assert len(front) == 5
    single = (
        argv[: argv.index("--sparsity-range")]
        + ["--target", "0.5"]
        + argv[argv.index("--offset-steps") :]
    )
    single[-1] = str(tmp_path / "bad")
    assert main(single) == 2
    assert "offset_steps" in capsys.readouterr().err
