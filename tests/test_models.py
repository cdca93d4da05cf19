"""evosearch.models: physically removing blocks, saving compressed models as plain checkpoints
and loading them back, and clear errors for models that cannot be found."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import N_LAYERS, build_model, hf_tokenizer, logits, random_ids

from evosearch.arch import arch_for, get_blocks
from evosearch.models import (
    DROP_FILE,
    ModelLoadError,
    load_compressed,
    load_model,
    remove_blocks,
    save_compressed,
)
from evosearch.surgery import apply_replacements
from search_spaces import LayerDropSpace


def _masked_logits(model, space, genome, ids):
    with apply_replacements(model, space.replacements(model, genome)):
        return logits(model, ids)


def test_remove_blocks_updates_config_and_layer_indices(arch):
    model = build_model(arch)
    kept = [get_blocks(model)[i] for i in (0, 3)]
    remove_blocks(model, {1, 2})
    blocks = get_blocks(model)
    assert list(blocks) == kept
    assert getattr(model.config, arch_for(model).num_layers_key) == 2
    for new_idx, block in enumerate(blocks):
        indices = {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")}
        assert indices <= {new_idx}


@pytest.mark.parametrize("dropped", [{4}, {-1}, {0, 1, 2, 3}])
def test_remove_blocks_rejects_bad_indices(llama, dropped):
    with pytest.raises(ValueError, match="block"):
        remove_blocks(llama, dropped)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "opt", "gpt2"])
def test_whole_block_drop_saves_a_plain_checkpoint(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    overrides = {}
    if arch == "qwen2":  # give the blocks different layer types, so slicing them matters
        overrides = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)
    model = build_model(arch, **overrides)
    layer_types = getattr(model.config, "layer_types", None)
    ids = random_ids(2, 12)
    dense = logits(model, ids)
    space = LayerDropSpace(N_LAYERS, num_drop=2)
    genome = space.from_dropped(blocks=[1, 2])
    space.save(model, None, genome, str(tmp_path))

    assert not (tmp_path / DROP_FILE).exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(loaded.config, arch_for(loaded).num_layers_key) == N_LAYERS - 2
    assert len(get_blocks(loaded)) == N_LAYERS - 2
    if arch == "qwen2":
        assert len(set(layer_types)) == 2
        assert list(loaded.config.layer_types) == [layer_types[0], layer_types[3]]
    expected = _masked_logits(model, space, genome, ids)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)
    # the dense model itself is untouched
    assert len(get_blocks(model)) == N_LAYERS
    assert torch.equal(logits(model, ids), dense)


def test_sublayer_drops_round_trip(tmp_path):
    model = build_model("llama")
    tokenizer = hf_tokenizer()
    ids = random_ids(2, 12)
    space = LayerDropSpace(N_LAYERS, num_drop=2, sublayers=True)
    # block 2 loses both sublayers (removed); attention 0 and MLP 3 are dropped on their own
    genome = space.from_dropped(attention=[0, 2], mlp=[2, 3])
    space.save(model, tokenizer, genome, str(tmp_path))

    drops = json.loads((tmp_path / DROP_FILE).read_text())
    assert drops == {"attention": [0], "mlp": [2]}  # indices after removing block 2
    expected = _masked_logits(model, space, genome, ids)
    for loader in (load_compressed, load_model):
        loaded, loaded_tokenizer = loader(tmp_path)
        assert len(get_blocks(loaded)) == N_LAYERS - 1
        assert loaded.config.num_hidden_layers == N_LAYERS - 1
        assert not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)
        assert loaded_tokenizer("abc", add_special_tokens=False)["input_ids"] == [97, 98, 99]


def test_saving_again_without_sublayer_drops_removes_the_drop_file(tmp_path):
    model = build_model("llama")
    save_compressed(model, None, tmp_path, dropped_attention={1})
    assert (tmp_path / DROP_FILE).exists()
    save_compressed(model, None, tmp_path, dropped_blocks={1})
    assert not (tmp_path / DROP_FILE).exists()


def test_load_model_of_a_plain_directory(tmp_path):
    model = build_model("gpt2")
    model.save_pretrained(tmp_path)
    hf_tokenizer().save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    ids = random_ids(2, 7)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_load_model_of_a_missing_path_says_so(tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ModelLoadError, match="not found") as info:
        load_model(missing)
    assert missing in str(info.value)


def test_load_model_of_a_missing_gguf_file(tmp_path):
    missing = str(tmp_path / "model.gguf")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(missing)


def test_load_model_of_a_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_load_model_refuses_an_unsupported_architecture(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    from evosearch.arch import UnsupportedArchitectureError

    bert = BertLMHeadModel(
        BertConfig(
            vocab_size=128,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    bert.save_pretrained(tmp_path)
    hf_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        load_model(str(tmp_path))
