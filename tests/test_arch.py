"""evosearch.arch and evosearch.surgery: the architecture table and module replacement."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHS, FAMILIES, HIDDEN, N_LAYERS, build_model, logits, random_ids
from torch import nn

import evosearch.arch as arch_module
from evosearch.arch import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    arch_for,
    get_blocks,
    get_submodule,
    set_submodule,
)
from evosearch.surgery import ZeroAttention, apply_replacements, zero_output_for


def test_the_supported_families_are_exactly_the_tested_ones():
    assert set(ARCHS) | set(FAMILIES) == set(arch_module.FAMILIES)
    assert set(ARCHITECTURES) <= set(arch_module.FAMILIES)  # the exceptions are supported too


def test_get_blocks_returns_every_decoder_block(tiny_model):
    blocks = get_blocks(tiny_model)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == N_LAYERS
    spec = arch_for(tiny_model)
    assert getattr(tiny_model.config, spec.num_layers_key) == N_LAYERS
    # the blocks really are the model's decoder layers: each holds parameters of its own
    assert len({id(b) for b in blocks}) == N_LAYERS
    assert all(sum(p.numel() for p in b.parameters()) > 0 for b in blocks)


def test_every_path_resolves_in_block_0(tiny_model):
    spec = arch_for(tiny_model)
    block = get_blocks(tiny_model)[0]
    for path in spec.attention + spec.mlp:
        assert isinstance(get_submodule(block, path), nn.Module), path
    for path in spec.attention_linears + spec.mlp_linears:
        linear = get_submodule(block, path)
        assert linear.weight.ndim == 2, path  # nn.Linear or GPT-2's Conv1D
    assert spec.attention_linears and spec.mlp_linears


def test_arch_for_accepts_a_config(arch):
    model = build_model(arch)
    assert arch_for(model.config) == arch_for(model)


@pytest.mark.parametrize(
    "obj",
    [
        SimpleNamespace(config=SimpleNamespace(model_type="bert")),
        SimpleNamespace(model_type="bert"),
    ],
    ids=["model", "config"],
)
def test_unsupported_model_type_names_all_supported_types(obj):
    with pytest.raises(UnsupportedArchitectureError) as info:
        arch_for(obj)
    message = str(info.value)
    assert "bert" in message
    assert "\n" not in message
    for model_type, family in arch_module.FAMILIES.items():
        assert model_type in message and family in message
    assert isinstance(info.value, ValueError)


def test_get_blocks_of_a_real_bert_model_raises():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        get_blocks(bert)


def test_set_submodule_swaps_and_returns_the_old_module(llama):
    path = "model.layers.2.mlp"
    old = get_submodule(llama, path)
    new = nn.Identity()
    assert set_submodule(llama, path, new) is old
    assert get_submodule(llama, path) is new


def test_apply_replacements_restores_even_after_an_exception(llama):
    ids = random_ids(2, 6)
    dense = logits(llama, ids)
    originals = list(get_blocks(llama))
    with pytest.raises(KeyError):
        with apply_replacements(llama, {"model.layers.1.self_attn": ZeroAttention()}):
            assert isinstance(get_blocks(llama)[1].self_attn, ZeroAttention)
            raise KeyError("boom")
    assert list(get_blocks(llama)) == originals
    assert not isinstance(get_blocks(llama)[1].self_attn, ZeroAttention)
    assert torch.equal(logits(llama, ids), dense)


def test_zero_output_for_matches_the_output_shape_of_every_mlp_part(tiny_model):
    spec = arch_for(tiny_model)
    block = get_blocks(tiny_model)[0]
    x = torch.randn(2, 5, HIDDEN)
    for path in spec.mlp:
        module = get_submodule(block, path)
        stand_in = zero_output_for(module)
        inp = x if path != "fc2" else torch.randn(2, 5, tiny_model.config.ffn_dim)
        expected = module(inp)
        got = stand_in(inp)
        assert got.shape == expected.shape, path
        assert not got.any()


def test_zero_output_for_rejects_a_module_without_linears():
    with pytest.raises(TypeError, match="ReLU"):
        zero_output_for(nn.ReLU())


def test_readme_lists_the_supported_families_as_generated():
    """The README's family list is the generated line (``supported_families_markdown()``), so
    it stays equal to what the code supports."""
    from pathlib import Path

    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert arch_module.supported_families_markdown() in readme
