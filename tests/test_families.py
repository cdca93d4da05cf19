"""Issue 22's families (Gemma 2, Gemma 3 text, Phi-3, Qwen3) in every space.

In each space a materialised candidate is compared with a reference built by hand, independently
of evosearch's surgery: blocks removed from the ``ModuleList`` (with ``layer_types`` sliced),
output projections zeroed, weights pruned, or removed heads and channels zeroed in the fused or
separate projections. Saved drop and width models reload and give the same logits.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import FAMILIES, N_LAYERS, build_model, hf_tokenizer, logits, random_ids
from torch import nn

import evosearch.arch as arch_module
from evosearch.arch import (
    UnsupportedArchitectureError,
    arch_for,
    get_blocks,
    get_submodule,
    head_logits,
    per_layer_config_keys,
    supported_families_markdown,
)
from evosearch.genome import Genome
from evosearch.models import load_model, remove_blocks
from evosearch.operators import level_switch_mutation
from evosearch.pruning import block_linears, collect_stats
from evosearch.surgery import apply_replacements
from evosearch.symbolic import get_pruner
from search_spaces import LayerDropSpace
from search_spaces.sparsity import SparsityConfig, SparsitySpace
from search_spaces.width import WidthConfig, WidthSpace

IDS = random_ids(3, 12)  # longer than the sliding window (4): sliding and full layers differ


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# -- discovery ---------------------------------------------------------------------------------


def test_every_family_is_discovered_with_its_linears_and_roles(family):
    model = build_model(family)
    spec = arch_for(model)
    assert spec.blocks == "model.layers" and len(get_blocks(model)) == N_LAYERS
    assert (spec.attention, spec.mlp) == (("self_attn",), ("mlp",))
    assert spec.attention_linears[-1] == "self_attn.o_proj"
    assert spec.mlp_linears[-1] == "mlp.down_proj"
    if family == "phi3":  # fused projections are units of their own
        assert spec.attention_linears == ("self_attn.qkv_proj", "self_attn.o_proj")
        assert spec.mlp_linears == ("mlp.gate_up_proj", "mlp.down_proj")
        assert {"qkv", "gate_up"} <= set(spec.roles)
    else:
        assert len(spec.attention_linears) == 4 and len(spec.mlp_linears) == 3
    assert family in arch_module.FAMILIES
    assert arch_for(model.config) == spec  # from a config alone: built on the meta device


def test_a_decoder_outside_the_families_is_discovered_too():
    from transformers import AutoModelForCausalLM, Olmo2Config

    config = Olmo2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    assert config.model_type not in arch_module.FAMILIES
    space = LayerDropSpace(3, num_drop=1)
    with apply_replacements(model, space.replacements(model, space.from_dropped(blocks=[1]))):
        dropped = logits(model, IDS)
    reference = copy.deepcopy(model)
    reference.model.layers = nn.ModuleList([model.model.layers[0], model.model.layers[2]])
    reference.config.num_hidden_layers = 2
    _close(dropped, logits(reference, IDS))


def test_a_model_without_blocks_gets_a_one_line_error_naming_what_was_looked_for():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )  # fmt: skip
    )
    with pytest.raises(UnsupportedArchitectureError) as info:
        arch_for(bert)
    message = str(info.value)
    assert "\n" not in message
    assert "'bert'" in message and "self_attn" in message and "mlp" in message
    assert "Gemma 3 (text)" in message and "Phi-3" in message


def test_readme_line_names_every_family():
    line = supported_families_markdown()
    assert "\n" not in line
    assert all(name in line for name in arch_module.FAMILIES.values())


def test_per_layer_lists_are_found_but_token_id_lists_are_not():
    model = build_model("gemma3_text", n_layers=2, eos_token_id=[1, 2])
    assert per_layer_config_keys(model.config, 2) == ("layer_types",)


def test_head_logits_apply_the_final_soft_cap():
    model = build_model("gemma2", final_logit_softcapping=0.5)
    hidden = model.base_model(input_ids=IDS, use_cache=False).last_hidden_state
    _close(head_logits(model, hidden), logits(model, IDS))
    assert logits(model, IDS).abs().max() <= 0.5


@pytest.mark.parametrize("top_k", [None, 10**6])
def test_kl_and_perplexity_score_the_soft_capped_logits(top_k):
    from evosearch.engine import Evaluator
    from evosearch.evaluation import Batch
    from evosearch.forward import compute_dense_cache
    from fitness import KLDivergence, Perplexity

    model = build_model("gemma2", final_logit_softcapping=0.5)
    batch = Batch((0, 1, 2), IDS)
    dense = compute_dense_cache(model, IDS, prefix_reuse=False)
    space = LayerDropSpace(N_LAYERS, num_drop=1)
    genome = space.from_dropped(blocks=[1])
    student = logits(remove_blocks(copy.deepcopy(model), {1}), IDS)  # capped by HF's forward
    log_p, log_q = logits(model, IDS).log_softmax(-1), student.log_softmax(-1)
    want_kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    nll = -log_q[:, :-1].gather(-1, IDS[:, 1:, None]).mean().item()
    kl, ppl = KLDivergence(top_k=top_k), Perplexity()
    for fitness in (kl, ppl):
        fitness.prepare(model, IDS, dense)
    assert Evaluator(model, space, kl, dense).raw(genome, batch) == pytest.approx(
        want_kl, rel=1e-4
    )
    assert Evaluator(model, space, ppl, dense).raw(genome, batch) == pytest.approx(
        np.exp(nll), rel=1e-4
    )


# -- layer drop --------------------------------------------------------------------------------


def _hand_removed(model: nn.Module, keep: list[int]) -> nn.Module:
    """``model`` with only the blocks ``keep``, its config's lists sliced by hand."""
    reference = copy.deepcopy(model)
    layers = reference.model.layers
    reference.model.layers = nn.ModuleList([layers[i] for i in keep])
    reference.config.num_hidden_layers = len(keep)
    if getattr(reference.config, "layer_types", None) is not None:
        reference.config.layer_types = [model.config.layer_types[i] for i in keep]
    return reference


def test_dropped_blocks_equal_hand_removed_blocks_and_reload(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(family)
    space = LayerDropSpace(N_LAYERS, num_drop=2)
    genome = space.from_dropped(blocks=[0, 3])
    with apply_replacements(model, space.replacements(model, genome)):
        candidate = logits(model, IDS)
    _close(candidate, logits(_hand_removed(model, [1, 2]), IDS))
    assert not torch.allclose(candidate, logits(model, IDS), atol=1e-3)
    space.save(model, hf_tokenizer(), genome, str(tmp_path / "m"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    _close(logits(loaded, IDS), candidate)
    assert loaded.config.num_hidden_layers == 2
    types = getattr(model.config, "layer_types", None)
    if family != "phi3":  # the kept blocks keep their attention type
        assert loaded.config.layer_types == [types[1], types[2]]
        # which is what matters: the same blocks under the first two types compute otherwise
        wrong = remove_blocks(copy.deepcopy(model), {0, 3})
        wrong.config.layer_types = types[:2]
        assert not torch.allclose(logits(wrong, IDS), candidate, atol=1e-4)


def _zero_(linear: nn.Module, rows: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        if rows is None:
            linear.weight.zero_()
        else:
            linear.weight[rows] = 0
        if linear.bias is not None:
            linear.bias.zero_() if rows is None else linear.bias.__setitem__(rows, 0)


def test_dropped_sublayers_equal_zeroed_output_projections_and_reload(family, tmp_path):
    model = build_model(family)
    space = LayerDropSpace(N_LAYERS, num_drop=2, sublayers=True)
    genome = space.from_dropped(attention=[1, 2], mlp=[2, 3])
    with apply_replacements(model, space.replacements(model, genome)):
        candidate = logits(model, IDS)
    reference = copy.deepcopy(model)
    for i in (1, 2):  # Gemma's post-attention norm maps a zero output to zero
        _zero_(reference.model.layers[i].self_attn.o_proj)
    for i in (2, 3):
        _zero_(reference.model.layers[i].mlp.down_proj)
    _close(candidate, logits(reference, IDS))
    space.save(model, hf_tokenizer(), genome, str(tmp_path / "m"))
    loaded, _ = load_model(str(tmp_path / "m"))
    _close(logits(loaded, IDS), candidate)
    assert loaded.config.num_hidden_layers == 3


# -- per-layer sparsity ------------------------------------------------------------------------


def test_sparsity_candidate_equals_hand_pruned_weights(family, tmp_path):
    model = build_model(family)
    ids = random_ids(4, 16)
    config = SparsityConfig(sparsity=0.5, level_step=0.05, max_level_shift=3,
                            store_dtype="float32")  # fmt: skip
    space = SparsitySpace.build(model, ids, config, db_root=tmp_path, log=lambda _: None)
    kinds = {ref.kind for ref in space.refs}
    assert kinds == set(arch_for(model).attention_linears + arch_for(model).mlp_linears)
    genome = level_switch_mutation(space.uniform_genome(), space.spec, np.random.default_rng(1), 3)
    with apply_replacements(model, space.replacements(model, genome)):
        candidate = logits(model, IDS)
    stats = collect_stats(model, ids)
    wanda = get_pruner("wanda")
    reference = copy.deepcopy(model)
    for ref, s in zip(block_linears(model), space.layer_sparsities(genome)):
        linear = get_submodule(reference, ref.name)
        with torch.no_grad():
            linear.weight.copy_(wanda.prune(linear.weight, stats[ref.name], s))
    _close(candidate, logits(reference, IDS))
    assert not torch.allclose(candidate, logits(model, IDS), atol=1e-4)


# -- width -------------------------------------------------------------------------------------


def _hand_width_reference(model, space, genome) -> nn.Module:
    """Removed KV groups and channels zeroed in the value / up rows (fused layouts indexed by
    hand), the output projections replaced by the database's compensated weights."""
    geo, reference = space.geo, copy.deepcopy(model)
    a, m = space.levels(genome)
    for i, block in enumerate(reference.model.layers):
        groups, channels = space.kept(genome, i)
        attn, mlp = block.self_attn, block.mlp
        if a[i]:
            gone = [g for g in range(geo.n_kv) if g not in groups]
            v_rows = torch.cat([torch.arange(g * 8, (g + 1) * 8) for g in gone])  # head_dim 8
            if hasattr(attn, "qkv_proj"):  # rows: 4 query heads, 2 key heads, 2 value heads
                _zero_(attn.qkv_proj, 48 + v_rows)
            else:
                _zero_(attn.v_proj, v_rows)
            if groups:  # o_proj columns of the kept query heads: 2 heads of 8 per group
                cols = torch.cat([torch.arange(g * 16, (g + 1) * 16) for g in groups])
                with torch.no_grad():
                    attn.o_proj.weight.zero_()
                    attn.o_proj.weight[:, cols] = space.db.weight("attn", i, a[i]).float()
        if m[i]:
            gone = torch.tensor([c for c in range(geo.intermediate) if c not in channels])
            if hasattr(mlp, "gate_up_proj"):  # rows: 64 gate channels, then 64 up channels
                _zero_(mlp.gate_up_proj, 64 + gone)
            else:
                _zero_(mlp.up_proj, gone)
            if channels:
                with torch.no_grad():
                    mlp.down_proj.weight.zero_()
                    mlp.down_proj.weight[:, channels] = space.db.weight("mlp", i, m[i]).float()
    return reference


def test_width_candidate_equals_hand_zeroed_heads_and_channels_and_reloads(family, tmp_path):
    model = build_model(family, intermediate_size=64)
    ids = random_ids(8, 16)
    config = WidthConfig(target=0.5, mlp_levels=8, db_dtype="float32")
    space = WidthSpace.build(model, ids, config, db_root=tmp_path / "db", log=lambda _: None)
    assert (space.geo.n_heads, space.geo.n_kv, space.geo.head_dim) == (4, 2, 8)
    special = Genome((2, 0, 1, 1, 4, 8, 2, 2))  # block 0: no attention; block 1: no MLP
    gone = Genome((2, 0, 1, 1, 8, 0, 4, 4))  # block 0 removed: layer_types must follow
    rng = np.random.default_rng(1)
    for genome in (space.uniform_genome(), special, gone, space.random_genome(rng)):
        with apply_replacements(model, space.replacements(model, genome)):
            candidate = logits(model, IDS)
        _close(candidate, logits(_hand_width_reference(model, space, genome), IDS))
        space.save(model, hf_tokenizer(), genome, str(tmp_path / "m"))
        loaded, _ = load_model(str(tmp_path / "m"))
        _close(logits(loaded, IDS), candidate)
        assert sum(p.numel() for p in loaded.parameters()) < sum(
            p.numel() for p in model.parameters()
        )
        if genome == gone and family != "phi3":
            assert loaded.config.layer_types == model.config.layer_types[1:]
    assert model.config.num_attention_heads == 4  # slicing a fused qkv leaves the config alone


# -- metric search -----------------------------------------------------------------------------


def test_metric_space_equals_hand_pruning(family):
    from evosearch.engine import Evaluator
    from evosearch.evaluation import Batch, Candidate
    from evosearch.forward import compute_dense_cache
    from evosearch.gp import MetricGenome
    from evosearch.metric_space import MetricSpace
    from evosearch.symbolic import KNOWN_METRICS, parse
    from fitness import KLDivergence

    model = build_model(family, n_layers=2)
    ids = random_ids(3, 16)
    stats = collect_stats(model, ids, gradients=True)
    dense = compute_dense_cache(model, ids, prefix_reuse=False)
    kl = KLDivergence()
    kl.prepare(model, ids, dense)
    batch = Batch((0, 1, 2), ids)
    space = MetricSpace(stats, sparsity=0.5)
    genome = MetricGenome(parse(KNOWN_METRICS["wanda"]))
    value = Evaluator(model, space, kl, dense, prefix_reuse=False).raw(genome, batch)
    wanda = get_pruner("wanda")
    for ref in block_linears(model):
        linear = get_submodule(model, ref.name)
        with torch.no_grad():
            linear.weight.copy_(wanda.prune(linear.weight, stats[ref.name], 0.5))
    assert value == pytest.approx(kl(Candidate(model, Genome((0,)), 0, dense), batch), rel=1e-6)
    assert value > 0


# -- the demo config on local checkpoints ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_demo_config_runs_on_a_local_checkpoint(family, tmp_path, monkeypatch):
    """``configs/demo.yaml`` with only ``model:`` changed (the ``--model`` flag) on a saved
    12-block random checkpoint: it writes a report and a model that plain ``from_pretrained``
    loads, with the in-search candidate's logits."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from evosearch.cli import main

    monkeypatch.setenv("EVOSEARCH_CACHE", str(tmp_path / "cache"))
    model_dir, out = tmp_path / family, tmp_path / "run"
    build_model(family, n_layers=12, max_position_embeddings=512).save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)
    demo = Path(__file__).parents[1] / "configs" / "demo.yaml"
    assert (
        main(["search", "--config", str(demo), "--model", str(model_dir), "--out", str(out)]) == 0
    )
    assert (out / "report.html").is_file()
    best = json.loads((out / "results.json").read_text())["best"]
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    space = LayerDropSpace(12, num_drop=7)
    with apply_replacements(
        dense, space.replacements(dense, space.from_dropped(blocks=best["dropped_blocks"]))
    ):
        candidate = logits(dense, IDS)
    saved = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert saved.config.num_hidden_layers == 5
    _close(logits(saved, IDS), candidate)
