"""The width space: levels and budgets, the compensated level database, masked search-time
candidates vs physically shrunk exports, training-aware selection, finetune and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_model, hf_tokenizer, logits, random_ids

from evosearch.engine import Evaluator
from evosearch.evaluation import Batch
from evosearch.forward import compute_dense_cache
from evosearch.genome import Genome
from evosearch.models import load_model
from evosearch.operators import level_switch_mutation
from evosearch.shrink import (
    WIDTH_FILE,
    MaskedLinear,
    WidthUnsupportedError,
    geometry,
    load_shrunk,
    n_params,
    save_shrunk,
)
from evosearch.surgery import apply_replacements
from evosearch.training import LoRALinear, TrainConfig
from evosearch.training_aware import TrainingAware
from fitness.kl import KLDivergence
from search_spaces.width import WidthConfig, WidthSpace, obs_levels

ARCHS = ("llama", "qwen2")


def _space(arch="llama", tmp_path=None, **config):
    model = build_model(arch, intermediate_size=64)
    ids = random_ids(8, 16)
    settings = {"target": 0.5, "mlp_levels": 8, **config}
    space = WidthSpace.build(
        model, ids, WidthConfig(**settings), db_root=tmp_path, log=lambda _: None
    )
    return model, ids, space


@pytest.mark.parametrize("arch", ARCHS)
def test_levels_and_budgets_are_exact(arch, tmp_path):
    model, _, space = _space(arch, tmp_path)
    geo = geometry(model)
    assert (geo.n_heads, geo.n_kv, geo.intermediate) == (4, 2, 64)
    # 4 blocks x 2 KV groups and 4 blocks x 8 MLP chunks, half of each removed
    assert space.spec.max_levels == (2,) * 4 + (8,) * 4
    assert space.spec.budgets == {0: 4, 1: 16}
    rng = np.random.default_rng(0)
    genome = space.random_genome(rng)
    for _ in range(20):
        genome = level_switch_mutation(genome, space.spec, rng, 2)
        assert space.spec.is_valid(genome)
        assert space.metrics(genome)["block_params_removed"] == pytest.approx(0.5)


def test_attention_target_moves_budget_to_mlp(tmp_path):
    _, _, space = _space("llama", tmp_path, attention_target=0.25)
    assert space.spec.budgets[0] == 2
    genome = space.uniform_genome()
    assert space.metrics(genome)["block_params_removed"] == pytest.approx(0.5, abs=0.02)


def test_impossible_budget_is_a_clear_error():
    model = build_model("llama", intermediate_size=64)
    with pytest.raises(ValueError, match="impossible"):
        WidthSpace(geometry(model), 4, WidthConfig(target=0.9, attention_target=0.0))
    with pytest.raises(ValueError, match="does not divide"):
        WidthSpace(geometry(model), 4, WidthConfig(mlp_levels=7))
    with pytest.raises(ValueError, match="target"):
        WidthConfig(target=1.5)


def test_unsupported_architecture_is_named():
    with pytest.raises(WidthUnsupportedError, match="opt is not supported for width search"):
        geometry(build_model("opt"))


def test_database_levels_are_nested_and_reused(tmp_path):
    model, ids, space = _space("llama", tmp_path)
    for block in range(4):
        channels = [set(space.db.keep("mlp", block, lv)) for lv in range(1, 8)]
        assert all(a > b for a, b in zip(channels, channels[1:]))  # level k+1 removes more
        assert [len(c) for c in channels] == [64 - 8 * lv for lv in range(1, 8)]
    logs = []
    WidthSpace.build(model, ids, space.settings, db_root=tmp_path, log=logs.append)
    assert "reusing" in logs[0]
    # a level database like the sparsity space's: keyed by data, so other tokens build anew
    assert space.db.meta["parts"]["kind"] == "width"
    logs = []
    WidthSpace.build(model, ids.flip(0), space.settings, db_root=tmp_path, log=logs.append)
    assert not any("reusing" in line for line in logs)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2


def test_compensation_is_least_squares_on_kept_inputs():
    torch.manual_seed(0)
    x = torch.randn(200, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    w = torch.randn(5, 12, dtype=torch.float64)
    h = x.t() @ x
    structures = [torch.arange(i, i + 3) for i in range(0, 12, 3)]
    damp = 1e-8
    for keep, wk in obs_levels(w, h, structures, 1, damp):
        cols = torch.cat([structures[s] for s in keep])
        # the best reconstruction of x @ w.T from the kept inputs alone
        ref = torch.linalg.lstsq(x[:, cols], x @ w.t()).solution.t()
        assert torch.allclose(wk, ref, atol=1e-5)
        plain = (x @ w.t() - x[:, cols] @ w[:, cols].t()).norm()
        assert (x @ w.t() - x[:, cols] @ wk.t()).norm() <= plain + 1e-9


@pytest.mark.parametrize("arch", ARCHS)
def test_shrunk_export_equals_masked_search_model(arch, tmp_path):
    model, ids, space = _space(arch, tmp_path / "db")
    rng = np.random.default_rng(1)
    # the uniform genome, random ones, and one with every head of block 0 and all MLP
    # channels of block 1 removed (a dropped attention and a dropped MLP)
    special = Genome((2, 0, 1, 1, 4, 8, 2, 2))
    assert space.spec.is_valid(special)
    for genome in [space.uniform_genome(), special, *(space.random_genome(rng) for _ in range(3))]:
        with apply_replacements(model, space.replacements(model, genome)):
            masked = logits(model, ids)
        space.save(model, hf_tokenizer(), genome, str(tmp_path / "m"))
        loaded, tok = load_model(str(tmp_path / "m"))
        assert tok is not None
        torch.testing.assert_close(logits(loaded, ids), masked, atol=1e-5, rtol=1e-4)
        assert n_params(loaded) == space.metrics(genome)["params"] or arch == "qwen2"
        assert n_params(loaded) < n_params(model)
    spec = json.loads((tmp_path / "m" / WIDTH_FILE).read_text())
    assert len(spec["layers"]) == 4


def test_block_with_everything_removed_is_deleted(tmp_path):
    model, ids, space = _space("llama", tmp_path / "db")
    genome = Genome((2, 2, 0, 0, 8, 8, 0, 0))  # blocks 0 and 1 gone entirely
    assert space.spec.is_valid(genome)
    with apply_replacements(model, space.replacements(model, genome)):
        masked = logits(model, ids)
    small = space.shrink(model, genome)
    assert small.config.num_hidden_layers == 2
    save_shrunk(small, None, tmp_path / "m")
    loaded, _ = load_shrunk(tmp_path / "m")
    torch.testing.assert_close(logits(loaded, ids), masked, atol=1e-5, rtol=1e-4)
    assert space.metrics(genome)["blocks_kept"] == 2


def test_masked_linear_cannot_regrow():
    w = torch.randn(3, 4)
    layer = MaskedLinear(w, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    layer.weight.requires_grad_(True)
    lora = LoRALinear(layer, 2, 4.0, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([layer.weight, lora.lora_a, lora.lora_b], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        lora(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    x = torch.zeros(1, 4)
    x[0, 1] = x[0, 3] = 1.0  # only removed inputs are non-zero
    assert torch.equal(lora(x), torch.zeros(1, 3))
    assert lora.delta()[:, [1, 3]].abs().max() == 0
    assert lora.delta()[:, [0, 2]].abs().max() > 0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_aware_selection_trains_then_scores(mode, tmp_path):
    model, ids, space = _space("llama", tmp_path)
    dense = compute_dense_cache(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = KLDivergence()
    plain.prepare(model, ids, dense)
    batch = Batch(tuple(range(8)), ids)
    genome = space.uniform_genome()
    untrained = Evaluator(model, space, plain, dense).raw(genome, batch)
    values = {}
    for tokens in (0, 64, 128):
        tas = TrainingAware(plain, {0: tokens}, TrainConfig(mode=mode, lr=3e-3))
        tas.prepare(model, ids, dense)
        values[tokens] = Evaluator(model, space, tas, dense).raw(genome, batch)
    assert values[0] == pytest.approx(untrained)
    assert values[128] < untrained  # trained on the scored sequences: KL must fall
    assert values[64] != values[128]  # the token budget matters
    again = TrainingAware(plain, {0: 128}, TrainConfig(mode=mode, lr=3e-3))
    again.prepare(model, ids, dense)
    assert Evaluator(model, space, again, dense).raw(genome, batch) == values[128]
    for k, v in model.state_dict().items():  # the resident model is untouched
        assert torch.equal(before[k], v), k


def test_training_rows_avoid_the_scoring_batch():
    tas = TrainingAware(KLDivergence(), {0: 32}, TrainConfig())
    tas._ids = random_ids(8, 16)
    rows = tas.training_rows(Batch((0, 1, 2), tas._ids[:3]), 64)
    assert len(rows) == 4 and not set(rows) & {0, 1, 2}
    assert len(tas.training_rows(Batch((0,), tas._ids[:1]), 16 * 20)) == 20  # repeats


def test_search_config_validates_width_fields():
    from evosearch.pipeline import SearchConfig

    assert SearchConfig.from_dict(dict(space="width")).space.settings.target == 0.5  # default
    with pytest.raises(ValueError, match="one entry per stage"):
        SearchConfig.from_dict(dict(space="width", width_target=0.5, width_train_tokens=(10,)))
    with pytest.raises(ValueError, match="belong to width"):
        SearchConfig.from_dict(dict(num_drop=2, width_target=0.5))
    config = SearchConfig.from_dict(dict(
        space="width", width_target=0.5, stages=((32, 2), (1000, 1)), n_sequences=4,
        seq_len=16, width_train_tokens=(100, 400),
    ))  # fmt: skip
    assert config.space.settings.target == 0.5
    assert config.selection_training.tokens == (100, 400)


def test_cli_search_with_training_and_finetune(tmp_path, capsys):
    from evosearch.cli import main
    from evosearch.pipeline import finetune_run

    model_dir = tmp_path / "tiny"
    build_model("llama", intermediate_size=64, max_position_embeddings=256).save_pretrained(
        model_dir
    )
    hf_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "run"
    argv = [
        "search", "--space", "width", "--target-params", "0.5", "--mlp-levels", "8",
        "--model", str(model_dir), "--data", str(text), "--n-sequences", "6",
        "--seq-len", "16", "--generations", "2", "--offspring", "3",
        "--initial-population", "0", "--stages", "16:2,48:1", "--train-tokens", "16,32",
        "--train-lr", "1e-3", "--baselines", "uniform", "--db-dir", str(tmp_path / "db"),
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["best"]["block_params_removed"] == pytest.approx(0.5)
    assert set(results["calibration_fitness"]) == {"evopress", "uniform"}
    # no random genome: generation 0 is the uniform start alone, which the offspring race
    gen0 = {e["genome"] for e in results["evaluations"] if e["generation"] == 0}
    assert gen0 == {results["baselines"]["uniform"]["genome"]}
    assert len({e["genome"] for e in results["evaluations"]}) > 1
    assert results["export"]["params"] < results["export"]["dense_params"]
    assert results["export"]["tokens_per_s"] > 0
    assert (out / "model" / WIDTH_FILE).is_file()
    assert main(["finetune", str(out), "--tokens", "64", "--distill", "--lr", "1e-3"]) == 0
    tuned = json.loads((out / "finetuned" / "finetune.json").read_text())
    assert tuned["tokens"] == 64 and tuned["steps"] == 1
    before, _ = load_model(str(out / "model"))
    after, _ = load_model(str(out / "finetuned"))
    assert n_params(after) == n_params(before)
    ids = random_ids(2, 8)
    assert not torch.allclose(logits(before, ids), logits(after, ids))
    # other training text than the calibration source, e.g. a jsonl file
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps({"body": f"a b c d e f g {i} "}) + "\n" for i in range(40))
    )
    assert main(["finetune", str(out), "--tokens", "64", "--data", str(other), "--text-field",
                 "body", "--out", str(tmp_path / "tuned2")]) == 0  # fmt: skip
    tuned2 = json.loads((tmp_path / "tuned2" / "finetune.json").read_text())
    assert tuned2["data"] == str(other) and tuned2["tokens"] == 64
    code = main(["finetune", str(out), "--tokens", "64", "--data", str(tmp_path / "no.jsonl"),
                 "--out", str(tmp_path / "tuned3")])  # fmt: skip
    assert code == 2 and "data file not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown data fields \\['sorce'\\]"):
        finetune_run(out, 64, data={"sorce": str(other)})


def test_cli_impossible_budget_fails_cleanly(tmp_path, capsys):
    from evosearch.cli import main

    code = main(["search", "--space", "width", "--target-params", "1.2", "--out",
                 str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    assert "target must lie in [0, 1)" in capsys.readouterr().err


def test_width_modules_keep_the_package_direction():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {
        root / "evosearch" / "training_aware.py": "search_spaces",
        root / "search_spaces" / "width.py": "fitness",
        root / "evosearch" / "shrink.py": "search_spaces",
        root / "evosearch" / "training.py": "search_spaces",
    }
    for path, forbidden in files.items():
        text = path.read_text()
        assert f"from {forbidden}" not in text and f"import {forbidden}" not in text, path
    for name in ("shrink.py", "training.py"):
        text = (root / "evosearch" / name).read_text()
        assert "from fitness" not in text and "import fitness" not in text
