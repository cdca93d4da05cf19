"""The quantization space: quantizers, the level database, the budget, baselines, exports."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import build_model, hf_tokenizer, logits, random_ids, token_data

from evosearch import quant
from evosearch.engine import Evaluator, search
from evosearch.forward import compute_dense_cache
from evosearch.genome import Genome
from evosearch.models import remove_blocks
from evosearch.operators import level_switch_mutation
from evosearch.pruning import LayerStats
from evosearch.strategies import EvoPress, EvoPressConfig, Stage
from evosearch.surgery import apply_replacements
from search_spaces.quantization import QuantConfig, QuantSpace
from search_spaces.quantization_baselines import compute, greedy


def _space(tmp_path, log=None, tied=False, **kw):
    # a RoPE base other than the default, so an export that drops it fails the logits checks
    model = build_model(
        "llama",
        tie_word_embeddings=tied,
        rope_parameters={"rope_theta": 500.0, "rope_type": "default"},
    )
    ids = random_ids(4, 16)
    config = QuantConfig(**{"bits": 3, **kw})
    space = QuantSpace.build(
        model, ids, config, db_root=tmp_path / "db", log=log or (lambda m: None)
    )
    return model, ids, space


def _gguf_space(tmp_path):
    return _space(tmp_path, tied=True, bits=None, format="gguf", gguf_embedding="Q8_0")


def _walk(space, n=30, seed=0, switches=2):
    rng = np.random.default_rng(seed)
    genome = space.uniform_genome()
    for _ in range(n):
        nxt = level_switch_mutation(genome, space.spec, rng, switches)
        if space.is_feasible(nxt):
            genome = nxt
    return genome


# -- quantizers ----------------------------------------------------------------------------------


def test_rtn_codes_lie_on_the_grid_and_round_to_nearest():
    w = torch.randn(
        8, 200, generator=torch.Generator().manual_seed(0)
    )  # 200 columns: groups of 64, 64, 64 and a ragged 8
    q = quant.rtn(w, 3, 64)
    assert q.scale.shape == (8, 4) and q.codes.max() <= 7
    err = (q.dequantize() - w).abs()
    half_step = quant._expand(q.scale.float(), 64, 200) / 2
    assert bool((err <= half_step * 1.01 + 1e-6).all())  # float16 scales: 1 % slack
    assert quant.layer_bits((8, 200), 3, 64) == 8 * 200 * 3 + 8 * 4 * (16 + 3)


def test_gptq_beats_rtn_on_the_calibration_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 96, generator=gen) @ torch.randn(96, 96, generator=gen)  # correlated
    w = torch.randn(16, 96, generator=gen)
    stats = LayerStats(x.shape[0], (x * x).sum(0), x.t() @ x)

    def out_err(approx):
        return float(((x @ (w - approx).t()) ** 2).mean())

    for act_order in (False, True):
        factor = quant.inverse_factor(stats, 0.01, act_order)
        g = quant.gptq(w, 3, 32, factor)
        assert out_err(g.dequantize()) < 0.9 * out_err(quant.rtn(w, 3, 32).dequantize())


def test_config_is_validated():
    with pytest.raises(ValueError, match="rung of the ladder"):
        QuantConfig(bits=7)
    with pytest.raises(ValueError, match="cannot be written"):
        QuantConfig(format="gguf", gguf_types=("Q4_0", "Q2_K"))
    with pytest.raises(ValueError, match="quantizer"):
        QuantConfig(bits=4, quantizer="awq")


# -- space, budget, database ---------------------------------------------------------------------


def test_level_switches_keep_the_exact_bits_within_budget(tmp_path):
    _, _, space = _space(tmp_path)
    uniform = space.uniform_genome()
    budget = space.budget_bits
    assert space.metrics(uniform)["bits_per_weight"] == pytest.approx(budget / space.total_weights)
    # default ladder 2..6 has equal gaps: switches within a shape keep the bits exactly
    genome = _walk(space)
    assert genome != uniform and space.spec.is_valid(genome)
    assert space.total_bits(genome) <= budget
    exact = [g for g in (_walk(space, seed=s) for s in range(5)) if max(g.levels) < 5]
    assert all(space.total_bits(g) == budget for g in exact)
    # the exact count: codes, float16 scales and b-bit zeros of every layer
    direct = sum(
        quant.layer_bits(u.shape, space.config_.ladder[v], 128)
        for u, v in zip(space.units, genome.levels)
    )
    assert space.total_bits(genome) == direct
    assert space.random_genome(np.random.default_rng(0)) != uniform


def test_mix_sizes_trades_bits_between_layers_of_any_size(tmp_path):
    _, _, space = _space(tmp_path, mix_sizes=True)
    assert space.spec.n_units == len(space.units) + 1  # the slack unit
    genome = _walk(space, n=80, switches=3)
    assert space.spec.is_valid(genome) and space.total_bits(genome) <= space.budget_bits
    moved = {u.shape for u, a, b in zip(space.units, genome.levels, space.uniform) if a != b}
    assert len(moved) > 1
    best = greedy(space, log=None)
    assert space.spec.is_valid(best) and space.is_feasible(best)
    assert space.total_bits(best) > 0.95 * space.budget_bits  # the freed bits are spent


def test_repair_spends_the_bits_a_move_down_left(tmp_path):
    _, _, space = _gguf_space(tmp_path)
    levels = list(space.uniform_genome().levels)
    levels[-2] -= 2  # the embedding Q8_0 -> Q5_0 alone: the slack unit takes the two rungs
    levels[-1] += 2
    lowered = Genome(tuple(levels))
    assert space.spec.is_valid(lowered) and space.is_feasible(lowered)
    fixed = space.repair(lowered)
    assert space.spec.is_valid(fixed) and space.is_feasible(fixed)
    assert space.total_bits(fixed) > space.total_bits(lowered)
    spare = space.budget_bits - space.total_bits(fixed)
    n = len(space.units)
    errors = space.level_errors()
    for u, v in enumerate(fixed.levels[:n]):  # no rung that lowers an error still fits
        if v < space.spec.max_levels[u] and errors[u][v + 1] < errors[u][v]:
            assert space.unit_costs[u][v + 1] - space.unit_costs[u][v] > spare
    assert space.repair(fixed) == fixed
    int_space = _space(tmp_path)[2]  # switches within a shape keep the bits: nothing to repair
    assert int_space.repair(_walk(int_space)) == _walk(int_space)


def test_search_spends_the_gguf_budget(tmp_path):
    """Mutations that lower a layer alone are repaired, so the best genome of a short search
    leaves no more unspent than the cheapest upgrade (the shortfall that motivated repair)."""
    from fitness import get_fitness

    model, _, space = _gguf_space(tmp_path)
    data = token_data(8, 16)
    dense = compute_dense_cache(model, data.input_ids)
    fitness = get_fitness("kl")
    fitness.prepare(model, data.input_ids, dense)
    config = EvoPressConfig(
        generations=4,
        offspring=6,
        initial_population=0,
        stages=(Stage(tokens=64, survivors=1),),
        max_switches=4,
    )
    start = (space.uniform_genome(), greedy(space, log=None))
    strategy = EvoPress(space, config=config, rng=np.random.default_rng(0), initial=start)
    result = search(strategy, Evaluator(model, space, fitness, dense), data, seed=0, progress=None)
    assert space.spec.is_valid(result.best) and space.is_feasible(result.best)
    cheapest = min(c[1] - c[0] for c in space.unit_costs)
    assert space.budget_bits - space.total_bits(result.best) < cheapest


def test_candidate_weights_are_the_dequantized_codes(tmp_path):
    model, _, space = _space(tmp_path, quantizer="rtn")
    genome = _walk(space)
    reps = space.replacements(model, genome)
    for unit, level in zip(space.units, genome.levels):
        want = quant.rtn(unit.weight(model), space.config_.ladder[level], 128).dequantize()
        torch.testing.assert_close(reps[unit.name].weight, want, rtol=0, atol=0)


def test_database_is_reused_and_a_killed_build_leaves_nothing(tmp_path, monkeypatch):
    messages: list[str] = []
    _space(tmp_path, log=messages.append)
    _space(tmp_path, log=messages.append)
    assert any("reusing" in m for m in messages)
    import search_spaces.quantization as qmod

    def killed(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(qmod, "_levels", killed)
    with pytest.raises(KeyboardInterrupt):
        _space(tmp_path / "other", bits=4)
    assert not any((tmp_path / "other" / "db").iterdir())


def test_greedy_lowers_the_summed_error_within_budget(tmp_path):
    _, _, space = _space(tmp_path)
    errors = space.level_errors()
    assert all(e[0] >= e[-1] for e in errors)  # more bits, less error
    genome = greedy(space, log=None)
    assert space.spec.is_valid(genome) and space.is_feasible(genome)
    total = sum(e[v] for e, v in zip(errors, genome.levels))
    uniform = sum(e[v] for e, v in zip(errors, space.uniform_genome().levels))
    assert total <= uniform
    assert compute("uniform", space) == space.uniform_genome()


def test_search_from_the_python_api(tmp_path):
    from fitness import get_fitness

    model, ids, space = _space(tmp_path)
    data = token_data(8, 16)
    dense = compute_dense_cache(model, data.input_ids)
    fitness = get_fitness("kl")
    fitness.prepare(model, data.input_ids, dense)
    config = EvoPressConfig(
        generations=3, offspring=4, initial_population=0, stages=(Stage(tokens=64, survivors=1),)
    )
    start = (space.uniform_genome(), greedy(space, log=None))

    def run():
        evaluator = Evaluator(model, space, fitness, dense)
        strategy = EvoPress(space, config=config, rng=np.random.default_rng(0), initial=start)
        return search(strategy, evaluator, data, seed=0, progress=None)

    result = run()
    assert space.spec.is_valid(result.best) and space.is_feasible(result.best)
    assert result.n_evaluations > len(start)
    assert run().best == result.best  # same seed, same search


# -- exports -------------------------------------------------------------------------------------


def test_compressed_tensors_export_loads_and_matches_the_candidate(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, ids, space = _space(tmp_path)
    genome = _walk(space)
    with apply_replacements(model, space.replacements(model, genome)):
        want = logits(model, ids)
    profile = space.save(model, hf_tokenizer(), genome, str(tmp_path / "ct"))
    assert profile["file_bytes"] > profile["quant_bytes"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-5)


def test_gguf_export_loads_and_matches_the_candidate(tmp_path):
    from transformers import AutoModelForCausalLM

    model, ids, space = _gguf_space(tmp_path)
    assert space.level_names(space.uniform_genome())[-1] == "Q8_0"  # the embedding unit
    genome = _walk(space, n=60)
    assert space.total_bits(genome) <= space.budget_bits
    with apply_replacements(model, space.replacements(model, genome)):
        want = logits(model, ids)
    profile = space.save(model, None, genome, str(tmp_path / "g"))
    assert profile["file_bytes"] > profile["quant_bytes"]
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "g", gguf_file="model.gguf", dtype=torch.float32
    )
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-4)


def test_gguf_export_removes_dropped_blocks_and_renumbers(tmp_path):
    from transformers import AutoModelForCausalLM

    from evosearch.export_gguf import write_gguf

    model, ids, space = _gguf_space(tmp_path)
    genome = space.uniform_genome()
    with apply_replacements(model, space.replacements(model, genome)):
        shrunk = remove_blocks(copy.deepcopy(model), {1, 2})
        want = logits(shrunk, ids)
    path = write_gguf(
        model, space._gguf_tensors(genome), tmp_path / "d.gguf", dropped_blocks={1, 2}
    )
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="d.gguf", dtype=torch.float32
    )
    assert loaded.config.num_hidden_layers == 2 and path.is_file()
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-4)


def test_genome_is_deterministic(tmp_path):
    _, _, a = _space(tmp_path)
    _, _, b = _space(tmp_path)
    assert a.db.path == b.db.path
    assert a.random_genome(np.random.default_rng(3)) == b.random_genome(np.random.default_rng(3))
    assert isinstance(a.uniform_genome(), Genome)


def test_cli_quantization_search_writes_a_loadable_model_and_the_report(tmp_path, capsys):
    """``evosearch search --space quantization`` end to end: registered like every space, with
    its baselines, its bits in results.json and report, and a compressed-tensors model."""
    pytest.importorskip("compressed_tensors")
    import json

    from evosearch.cli import main

    model_dir = tmp_path / "tiny"
    build_model("llama", max_position_embeddings=256).save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    argv = [
        "search", "--space", "quantization", "--bits", "3", "--group-size", "16",
        "--model", str(model_dir), "--data", str(text), "--n-sequences", "4", "--seq-len", "16",
        "--generations", "2", "--offspring", "4", "--initial-population", "0",
        "--stages", "16:2,64:1", "--baselines", "uniform,greedy", "--db-dir", str(tmp_path / "db"),
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    uniform_bytes = 19296  # 3 bits + group-16 scales and zero points of the tiny model's linears
    assert results["best"]["quant_bytes"] <= uniform_bytes
    fit = results["calibration_fitness"]
    assert set(fit) == {"evopress", "uniform", "greedy"} and fit["evopress"] <= fit["uniform"]
    assert (tmp_path / "run" / "model" / "quant_profile.json").is_file()
    folder = tmp_path / "run" / "model"  # bytes of the files the export wrote
    weights = (folder / "model.safetensors").stat().st_size
    everything = sum(f.stat().st_size for f in folder.iterdir())
    assert weights < results["export"]["file_bytes"] < everything
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<th>bits/weight</th>" in page and "<th>down_proj</th>" in page  # bits per layer
    assert f"<td>{results['export']['file_bytes']}</td>" in page
    assert results["export"]["new_tokens"] == 32  # the export loaded and generated


def test_cli_mix_sizes_flag_reaches_the_space_config():
    from evosearch.cli import _config, _parser

    argv = ["search", "--out", "r", "--space", "quantization", "--bits", "3", "--mix-sizes"]
    config = _config(_parser().parse_args(argv))
    assert config.space.settings.mix_sizes and config.space.settings.bits == 3
    assert not _config(_parser().parse_args(argv[:-1])).space.settings.mix_sizes


def test_gguf_search_from_evosearch_run_writes_a_file_that_loads(tmp_path):
    """The Python API end to end in the GGUF format: the run records the file's bytes, and the
    file reads back with transformers (``gguf_file=``) to the searched candidate's logits."""
    from transformers import AutoModelForCausalLM

    import evosearch
    from evosearch.config import SearchConfig
    from evosearch.data import load_token_data
    from evosearch.models import load_model
    from evosearch.problem import build_space

    model_dir = tmp_path / "tiny"
    model = build_model("llama", tie_word_embeddings=True, max_position_embeddings=256)
    model.save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    config = {
        "model": str(model_dir), "data": str(text), "n_sequences": 4, "seq_len": 16,
        "space": {"name": "quantization", "format": "gguf", "gguf_embedding": "Q8_0"},
        "generations": 2, "offspring": 4, "initial_population": 0, "stages": [[16, 2], [64, 1]],
        "baselines": ["uniform", "greedy"], "db_dir": str(tmp_path / "db"),
    }  # fmt: skip
    results = evosearch.run(config, out=tmp_path / "run", log=lambda _: None)
    file = tmp_path / "run" / "model" / "model.gguf"
    assert results["export"]["file_bytes"] == file.stat().st_size
    assert results["export"]["new_tokens"] == 32 and results["export"]["dense_load_seconds"] > 0
    assert results["best"]["quant_bytes"] <= results["baselines"]["uniform"]["quant_bytes"]
    loaded = AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32
    )
    # the candidate as the search scored it: the run's space rebuilt from its config
    cfg = SearchConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    dense, tok = load_model(str(model_dir))
    run_space = build_space(cfg, dense, load_token_data(cfg.data_spec(), tok, dense).input_ids)
    ids = random_ids(2, 16)
    with apply_replacements(dense, run_space.replacements(dense, genome_of(results))):
        want = logits(dense, ids)
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-4)


def genome_of(results: dict) -> Genome:
    return Genome.from_key(results["best"]["genome"])
