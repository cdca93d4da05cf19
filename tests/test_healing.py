"""Healing: every space keeps its structure exactly and its held-out loss falls; the data
never overlaps evaluation windows; ``evosearch heal`` and ``export --heal-tokens``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, hf_tokenizer, random_ids

from evosearch.data import DataError, DataSpec
from evosearch.healing import (
    HEAL_FILE,
    EvalWindows,
    HealConfig,
    check_structure,
    heal_,
    heal_saved_model,
    healing_data,
    read_structure,
    teacher_from,
)
from evosearch.models import DROP_FILE, load_model, save_compressed

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen jugs! " * 60


@pytest.fixture
def files(tmp_path):
    """A saved dense tiny Llama (MLP width 64, so width levels divide it) and a text file."""
    dense = build_model("llama", intermediate_size=64, max_position_embeddings=256)
    dense.save_pretrained(tmp_path / "dense")
    hf_tokenizer().save_pretrained(tmp_path / "dense")
    text = tmp_path / "heal.txt"
    text.write_text(TEXT)
    return dense, tmp_path / "dense", text


def _sparse(dense, tmp_path, **config):
    from search_spaces.sparsity import SparsityConfig, SparsitySpace

    settings = {"level_step": 0.05, "max_level_shift": 3, **config}
    space = SparsitySpace.build(
        dense, random_ids(4, 16), SparsityConfig(**settings), db_root=tmp_path / "db",
        log=lambda _: None,
    )  # fmt: skip
    out = tmp_path / "compressed"
    space.save(dense, hf_tokenizer(), space.uniform_genome(), str(out))
    return out


def _width(dense, tmp_path):
    from search_spaces.width import WidthConfig, WidthSpace

    space = WidthSpace.build(
        dense, random_ids(8, 16), WidthConfig(target=0.5, mlp_levels=8), db_root=tmp_path / "db",
        log=lambda _: None,
    )  # fmt: skip
    out = tmp_path / "compressed"
    space.save(dense, hf_tokenizer(), space.uniform_genome(), str(out))
    return out


def _compressed(space: str, dense, tmp_path):
    if space == "blocks":
        return save_compressed(dense, hf_tokenizer(), tmp_path / "compressed", dropped_blocks={1})
    if space == "sublayers":
        return save_compressed(
            dense, hf_tokenizer(), tmp_path / "compressed", dropped_attention={1}, dropped_mlp={2}
        )
    if space == "unstructured":
        return _sparse(dense, tmp_path, sparsity=0.5)
    if space == "2:4":
        return _sparse(dense, tmp_path, sparsity=0.5, pattern="2:4", level_step=0.02)
    return _width(dense, tmp_path)


SPACES = ("blocks", "sublayers", "unstructured", "2:4", "width")


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("space", SPACES)
def test_healing_keeps_each_space_structure_and_lowers_held_out_loss(space, mode, files):
    dense, dense_dir, text = files
    tmp = dense_dir.parent
    model_dir = _compressed(space, dense, tmp)
    before, _ = load_model(str(model_dir))
    config = HealConfig(
        tokens=24 * 16, mode=mode, lr=1e-3, seq_len=16,
        micro_batch=2, held_out=4, autocast=False,
    )  # fmt: skip
    record = heal_saved_model(
        model_dir, tmp / "healed", config, data=DataSpec(source=str(text)),
        teacher=str(dense_dir), log=lambda _: None,
    )  # fmt: skip
    healed, _ = load_model(str(tmp / "healed"))
    # the saved, reloaded model has exactly the structure of the unhealed one
    assert check_structure(read_structure(before), read_structure(healed)) == []
    assert record["held_out_after"] < record["held_out_before"]
    assert record["tokens"] == 24 * 16 and record["steps"] == 12
    assert json.loads((tmp / "healed" / HEAL_FILE).read_text())["losses"] == record["losses"]
    changed = [
        k for k, v in healed.state_dict().items() if not torch.equal(v, before.state_dict()[k])
    ]
    assert changed  # it did train
    structure = record["structure"]
    if space in ("unstructured", "2:4"):
        from search_spaces.sparsity import measure_sparsity

        profile = json.loads((model_dir / "sparsity_profile.json").read_text())
        layers = list(profile["measured_layer_sparsity"])
        assert measure_sparsity(tmp / "healed", layers) == measure_sparsity(model_dir, layers)
        assert structure["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert (tmp / "healed" / "sparsity_profile.json").is_file()
    if space == "sublayers":
        assert json.loads((tmp / "healed" / DROP_FILE).read_text()) == {
            "attention": [1], "mlp": [2]
        }  # fmt: skip
        assert len(structure["dropped_sublayers"]) == 2
    if space == "blocks":
        assert structure["blocks"] == 3
    if space == "width":
        assert structure["block_parameters"] < sum(
            p.numel() for p in dense.model.layers.parameters()
        )


def test_full_updates_would_move_the_zeros_without_the_mask(files):
    """The guard is needed: unmasked full training regrows pruned weights."""
    dense, dense_dir, text = files
    model, _ = load_model(str(_sparse(dense, dense_dir.parent, sparsity=0.5)))
    keep = read_structure(model)
    from evosearch.training import TrainConfig, train_

    params = list(model.model.layers.parameters())
    train_(model, params, random_ids(4, 16), TrainConfig(mode="full", lr=1e-2),
           teacher=teacher_from(dense))  # fmt: skip
    assert check_structure(keep, read_structure(model))  # zeros moved


def test_heal_in_memory_checks_structure_and_lora_merges(files):
    dense, dense_dir, text = files
    model, _ = load_model(str(_sparse(dense, dense_dir.parent, sparsity=0.5)))
    keep = read_structure(model)
    ids, held, _ = healing_data(DataSpec(source=str(text), seq_len=16), hf_tokenizer(), 24, 4)
    config = HealConfig(tokens=384, mode="lora", lr=1e-3, seq_len=16, autocast=False)
    out = heal_(model, ids, config, teacher=teacher_from(dense), held_out=held)
    assert out["held_out_after"] < out["held_out_before"]
    assert not check_structure(keep, read_structure(model))
    assert not any("lora" in k for k in model.state_dict())  # merged, no adapters left


def test_healing_data_never_overlaps_evaluation_windows(tmp_path):
    tok = hf_tokenizer()
    text = tmp_path / "wiki.test.raw"
    text.write_text(TEXT)
    other = tmp_path / "wiki.valid.raw"
    other.write_text(TEXT)
    spec = DataSpec(source=str(text), seq_len=16, seed=1)
    avoid = [EvalWindows(str(text), 10, 16), EvalWindows(str(other), None, 16)]
    train, held, info = healing_data(spec, tok, 30, 3, avoid=avoid)
    assert train.shape == (30, 16) and held.shape == (3, 16)
    assert info["skipped_prefix_tokens"] == 160
    assert info["train_region"][0] == 160 and info["held_out_region"][0] >= info["train_region"][1]
    assert len(info["notes"]) == 2
    assert "also evaluation data" in info["notes"][0] and "same corpus" in info["notes"][1]
    stream = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])
    evaluated = {tuple(stream[i : i + 16].tolist()) for i in range(0, 160 - 15)}
    # no training window starts inside the evaluated prefix (text repeats, so compare offsets)
    assert info["train_region"][0] >= 160 and len(evaluated) > 0
    with pytest.raises(DataError, match="all of"):
        healing_data(dataclasses_replace(spec, source=str(other)), tok, 4, 1, avoid=avoid)


def dataclasses_replace(spec, **kw):
    import dataclasses

    return dataclasses.replace(spec, **kw)


def test_config_validation():
    with pytest.raises(ValueError, match="tokens"):
        HealConfig(tokens=0)
    with pytest.raises(ValueError, match="mode"):
        HealConfig(tokens=10, mode="qlora")
    assert HealConfig(tokens=1025).sequences == 2
    assert HealConfig(tokens=10, mode="lora").train_config().lr == 5e-4


def test_cli_heal_keeps_both_models_and_the_report_shows_them(tiny_run, tmp_path):
    import shutil

    from evosearch.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    text = str(tiny_run.parent / "calib.txt")
    argv = ["heal", str(run), "--tokens", "160", "--lr", "1e-3", "--no-autocast",
            "--data", text, "--avoid", f"{text}:4:16"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((run / "healed" / HEAL_FILE).read_text())
    assert (run / "model" / "config.json").is_file()  # the unhealed model is kept
    assert record["tokens"] == 160 and record["data"]["skipped_prefix_tokens"] == 64
    assert record["data"]["notes"]  # healing on an evaluated text is stated
    assert main(argv) == 2  # healed/ exists: no silent overwrite
    out = tmp_path / "eval.json"  # evaluating the run evaluates its emitted, healed model
    assert main(["eval", str(run), "--ppl", text, "--seq-len", "16", "--windows", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["model_dir"] == str(run / "healed")
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "Healing" in page and "healed (emitted)" in page and "<polyline" in page


def test_cli_export_heal_tokens(tiny_run, tmp_path):
    from evosearch.cli import main

    genome = json.loads((tiny_run / "results.json").read_text())["best"]["genome"]
    out = tmp_path / "exported"
    argv = ["export", str(tiny_run), "--genome", genome, "--out", str(out), "--heal-tokens", "64"]
    assert main(argv) == 0
    assert (out / HEAL_FILE).is_file() and (
        tmp_path / "exported-unhealed" / "config.json"
    ).is_file()
    before, _ = load_model(str(tmp_path / "exported-unhealed"))
    after, _ = load_model(str(out))
    assert check_structure(read_structure(before), read_structure(after)) == []


def test_cli_search_ends_with_healing_and_resume_does_not_heal_again(tmp_path):
    """``search --heal-tokens``: RUN/model stays as searched, RUN/healed is the emitted model
    with the same dropped blocks, and a resumed run keeps the healed model it has."""
    from conftest import build_model, hf_tokenizer
    from helpers import search_args

    from evosearch.cli import main

    model_dir = tmp_path / "tiny"
    build_model("llama", n_layers=6, max_position_embeddings=256).save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    argv = search_args(model_dir, text, tmp_path / "run", "--heal-tokens", "64")
    assert main(argv) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    record = json.loads((run / "healed" / HEAL_FILE).read_text())
    assert results["healed"] == str(run / "healed") and record["tokens"] == 64
    healed, _ = load_model(str(run / "healed"))
    searched, _ = load_model(str(run / "model"))
    assert healed.config.num_hidden_layers == searched.config.num_hidden_layers == 4
    stamp = (run / "healed" / HEAL_FILE).stat().st_mtime_ns
    assert results["healing"]["tokens"] == 64
    assert results["healing"]["held_out_after"] == record["held_out_after"]
    assert main([*argv, "--resume"]) == 0
    assert (run / "healed" / HEAL_FILE).stat().st_mtime_ns == stamp
    resumed = json.loads((run / "results.json").read_text())  # still names the emitted model
    assert resumed["healed"] == str(run / "healed") and resumed["healing"] == results["healing"]


def test_finetune_refuses_a_sparse_or_quantized_model_and_points_to_heal(tmp_path):
    from evosearch.data import DataSpec
    from evosearch.jobs.models import finetune

    (tmp_path / "sparsity_profile.json").write_text("{}")
    with pytest.raises(ValueError, match="evosearch heal"):
        finetune(tmp_path, 64, tmp_path / "out", data=DataSpec())
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "quant_profile.json").write_text("{}")
    with pytest.raises(ValueError, match="off their grid"):
        finetune(quantized, 64, tmp_path / "out", data=DataSpec())


def _quantized(dense, tmp_path):
    from search_spaces.quantization import QuantConfig, QuantSpace

    space = QuantSpace.build(
        dense, random_ids(4, 16), QuantConfig(bits=3, group_size=16), db_root=tmp_path / "db",
        log=lambda _: None,
    )  # fmt: skip
    genome = space.uniform_genome()
    out = tmp_path / "compressed"
    space.save(dense, hf_tokenizer(), genome, str(out))
    return out, space, genome


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_healing_a_quantized_model_keeps_every_layer_on_its_grid(mode, files):
    """Quantization-aware healing: the codes move, the grids (bit-widths, scales, zero points)
    do not, the healed checkpoint is the same compressed-tensors format and loads in
    transformers to the weights healing measured, and the held-out loss fell."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from evosearch.export_ct import load_pack_quantized, read_pack_quantized

    dense, dense_dir, text = files
    tmp = dense_dir.parent
    model_dir, space, genome = _quantized(dense, tmp)
    # the latent weights start on grid points, half a 3-bit step (~0.025 here) from the next
    # code: a larger lr than for the other spaces moves codes within 12 steps
    lr = {"full": 3e-3, "lora": 1e-3}[mode]
    config = HealConfig(
        tokens=24 * 16, mode=mode, lr=lr, seq_len=16, micro_batch=2, held_out=4,
        autocast=False,
    )  # fmt: skip
    record = heal_saved_model(
        model_dir, tmp / "healed", config, data=DataSpec(source=str(text)),
        teacher=str(dense_dir), log=lambda _: None,
    )  # fmt: skip
    assert record["held_out_after"] < record["held_out_before"]
    before, after = read_pack_quantized(model_dir), read_pack_quantized(tmp / "healed")
    assert before.keys() == after.keys() == {u.name for u in space.refs}
    for name, q in before.items():
        assert q.grid.same(after[name].grid), name  # same bits, scales and zero points
        assert after[name].bits == space.level_names(genome)[0] == 3
    assert any(not torch.equal(q.codes, after[q_name].codes) for q_name, q in before.items())
    healed, _, _ = load_pack_quantized(tmp / "healed")
    unhealed, _, _ = load_pack_quantized(model_dir)
    structure = read_structure(healed)
    assert check_structure(read_structure(unhealed), structure) == []
    assert len(structure.grids) == len(before) and not structure.off_grid
    assert record["structure_after"]["layer_bits"] == record["structure"]["layer_bits"]
    ids = random_ids(2, 16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp / "healed", dtype=torch.float32)
    with torch.no_grad():
        want = healed(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    assert json.loads((tmp / "healed" / "quant_profile.json").read_text())["genome"]


def test_healing_refuses_a_gguf_export(tmp_path):
    """A GGUF export has no fixed grid to train on: healing says so instead of writing a
    model off its types."""
    gguf_dir = tmp_path / "exported"
    gguf_dir.mkdir()
    (gguf_dir / "model.gguf").write_bytes(b"GGUF")
    (gguf_dir / "quant_profile.json").write_text("{}")
    with pytest.raises(ValueError, match="no fixed grid"):
        heal_saved_model(
            gguf_dir, tmp_path / "healed", HealConfig(tokens=32, seq_len=16),
            data=DataSpec(source="unused.txt"), teacher=None, log=lambda _: None,
        )  # fmt: skip
