"""search_spaces.layer_drop: the genome encoding, and for every architecture that a dropped
block or sublayer computes what physically removing it would compute."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import N_LAYERS, OUT_PROJ, logits, random_ids, token_data

from evosearch.arch import get_blocks, get_submodule
from evosearch.engine import Evaluator, sample_batch
from evosearch.forward import compute_dense_cache, final_hidden
from evosearch.models import remove_blocks
from evosearch.space import SearchSpace
from evosearch.surgery import apply_replacements
from fitness import KLDivergence, Perplexity
from search_spaces import LayerDropSpace

# -- encoding -------------------------------------------------------------------------------


def test_layer_drop_space_follows_the_search_space_protocol():
    assert isinstance(LayerDropSpace(6, num_drop=2), SearchSpace)


def test_block_space_encoding():
    space = LayerDropSpace(6, num_drop=2)
    genome = space.from_dropped(blocks=[1, 4])
    assert genome.levels == (0, 1, 0, 0, 1, 0)
    assert space.spec.is_valid(genome)
    assert space.dropped(genome) == ({1, 4}, {1, 4})
    assert space.describe(genome) == {"dropped_blocks": [1, 4]}
    assert space.start_block(genome) == 1


def test_sublayer_space_encoding():
    space = LayerDropSpace(4, num_drop=2, sublayers=True)
    genome = space.from_dropped(attention=[1, 3], mlp=[3, 2])
    assert genome.levels == (0, 1, 0, 1, 0, 0, 1, 1)
    assert space.spec.is_valid(genome)
    assert space.describe(genome) == {
        "dropped_blocks": [3],
        "dropped_attention": [1, 3],
        "dropped_mlp": [2, 3],
    }
    assert space.start_block(genome) == 1
    # a whole block given to a sublayer space drops both of its sublayers
    assert space.from_dropped(blocks=[0]).levels == (1, 0, 0, 0, 1, 0, 0, 0)


def test_start_block_of_an_unchanged_genome_is_the_number_of_blocks():
    space = LayerDropSpace(5, num_drop=0)
    assert space.start_block(space.from_dropped()) == 5


def test_allowed_blocks_are_the_only_ones_ever_dropped():
    space = LayerDropSpace(8, num_drop=2, allowed=[2, 3, 5])
    rng = np.random.default_rng(0)
    dropped = set()
    for _ in range(200):
        genome = space.random_genome(rng)
        assert space.spec.is_valid(genome)
        dropped |= space.dropped(genome)[0]
    assert dropped == {2, 3, 5}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_blocks=0, num_drop=0), "n_blocks"),
        (dict(n_blocks=4, num_drop=4), "num_drop"),
        (dict(n_blocks=4, num_drop=-1), "num_drop"),
        (dict(n_blocks=4, num_drop=3, allowed=[0, 1]), "num_drop"),
        (dict(n_blocks=4, num_drop=1, allowed=[4]), "outside"),
    ],
)
def test_invalid_spaces_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerDropSpace(**kwargs)


def test_whole_block_genome_on_a_block_space_rejects_sublayer_arguments():
    with pytest.raises(ValueError, match="blocks="):
        LayerDropSpace(4, num_drop=1).from_dropped(attention=[1])


# -- equivalence with physical removal, for every architecture --------------------------------


def test_dropped_blocks_equal_physically_removed_blocks(tiny_model):
    ids = random_ids(3, 10)
    space = LayerDropSpace(N_LAYERS, num_drop=2)
    genome = space.from_dropped(blocks=[1, 2])
    with apply_replacements(tiny_model, space.replacements(tiny_model, genome)):
        masked = logits(tiny_model, ids)
    reference = remove_blocks(copy.deepcopy(tiny_model), {1, 2})
    assert len(get_blocks(reference)) == N_LAYERS - 2
    torch.testing.assert_close(masked, logits(reference, ids), atol=1e-5, rtol=0)
    # not trivially equal: the dropped model really computes something else
    assert not torch.allclose(masked, logits(tiny_model, ids), atol=1e-3)


def _zero_output_projection(model, block: int, which: int) -> None:
    """Zero the weight and bias of the attention (``which=0``) or MLP (``which=1``) output
    projection of ``block``: the sublayer then adds exactly nothing to the residual stream."""
    arch = model.config.model_type
    blocks = get_blocks(model)
    proj = get_submodule(blocks[block], OUT_PROJ[arch][which])
    with torch.no_grad():
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()


@pytest.mark.parametrize(
    ("attention", "mlp"),
    [([1], []), ([], [1]), ([1], [2]), ([1], [1])],
    ids=["attn1", "mlp1", "attn1-mlp2", "attn1-mlp1"],
)
def test_dropped_sublayers_equal_zeroed_output_projections(tiny_model, attention, mlp):
    ids = random_ids(3, 10)
    space = LayerDropSpace(N_LAYERS, num_drop=1, sublayers=True)
    genome = space.from_dropped(attention=attention, mlp=mlp)
    with apply_replacements(tiny_model, space.replacements(tiny_model, genome)):
        masked = logits(tiny_model, ids)
    reference = copy.deepcopy(tiny_model)
    for i in attention:
        _zero_output_projection(reference, i, 0)
    for i in mlp:
        _zero_output_projection(reference, i, 1)
    torch.testing.assert_close(masked, logits(reference, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(masked, logits(tiny_model, ids), atol=1e-3)


def test_model_is_restored_exactly_after_the_context(tiny_model):
    ids = random_ids(2, 9)
    dense = logits(tiny_model, ids)
    blocks_before = list(get_blocks(tiny_model))
    children_before = [list(b.modules()) for b in blocks_before]
    whole = LayerDropSpace(N_LAYERS, num_drop=2)
    sub = LayerDropSpace(N_LAYERS, num_drop=2, sublayers=True)
    for space, genome in [
        (whole, whole.from_dropped(blocks=[0, 3])),
        (sub, sub.from_dropped(attention=[1, 2], mlp=[2, 3])),
    ]:
        with apply_replacements(tiny_model, space.replacements(tiny_model, genome)):
            assert not torch.equal(logits(tiny_model, ids), dense)
        assert torch.equal(logits(tiny_model, ids), dense)
    assert list(get_blocks(tiny_model)) == blocks_before
    assert [list(b.modules()) for b in get_blocks(tiny_model)] == children_before


def test_replacements_do_not_change_the_model(llama):
    space = LayerDropSpace(N_LAYERS, num_drop=2, sublayers=True)
    before = [id(m) for m in llama.modules()]
    space.replacements(llama, space.from_dropped(attention=[0, 1], mlp=[1, 2]))
    assert [id(m) for m in llama.modules()] == before


# -- dense cache and prefix reuse ---------------------------------------------------------------


def test_dense_cache_boundaries_are_the_hidden_states_entering_each_block(llama):
    ids = random_ids(5, 7)
    dense = compute_dense_cache(llama, ids, micro_batch=2)
    assert dense.boundaries.shape == (N_LAYERS + 1, 5, 7, llama.config.hidden_size)
    assert dense.n_blocks == N_LAYERS
    with torch.no_grad():
        out = llama.model(input_ids=ids, use_cache=False, output_hidden_states=True)
    for i in range(N_LAYERS):  # HF's hidden_states[i] enters block i
        torch.testing.assert_close(dense.boundaries[i], out.hidden_states[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(dense.final_hidden, out.last_hidden_state, atol=1e-6, rtol=0)
    # the final norm maps the last boundary onto the final hidden states
    with torch.no_grad():
        normed = llama.model.norm(dense.boundaries[N_LAYERS])
    torch.testing.assert_close(normed, dense.final_hidden, atol=1e-6, rtol=0)
    assert compute_dense_cache(llama, ids, prefix_reuse=False).boundaries is None


def test_final_hidden_started_at_a_block_matches_the_full_forward(tiny_model):
    ids = random_ids(2, 6)
    dense = compute_dense_cache(tiny_model, ids)
    full = final_hidden(tiny_model, ids)
    for start in range(1, N_LAYERS):
        resumed = final_hidden(
            tiny_model, ids, start_block=start, start_hidden=dense.boundaries[start]
        )
        torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)


def _spaces_and_genomes():
    whole = LayerDropSpace(N_LAYERS, num_drop=2)
    sub = LayerDropSpace(N_LAYERS, num_drop=1, sublayers=True)
    return {
        "blocks": (whole, whole.from_dropped(blocks=[2, 3])),
        "sublayers": (sub, sub.from_dropped(attention=[1], mlp=[2])),
    }


@pytest.mark.parametrize("kind", ["blocks", "sublayers"])
@pytest.mark.parametrize("fitness_cls", [KLDivergence, Perplexity])
def test_prefix_reuse_gives_the_same_fitness(tiny_model, kind, fitness_cls):
    data = token_data(6, 8)
    space, genome = _spaces_and_genomes()[kind]
    assert space.start_block(genome) > 0
    dense = compute_dense_cache(tiny_model, data.input_ids, micro_batch=4)
    fitness = fitness_cls(micro_batch=2)
    fitness.prepare(tiny_model, data.input_ids, dense)
    batch = sample_batch(data, 24, seed=3, generation=1, stage=0)  # 3 of the 6 rows
    assert batch.indices != (0, 1, 2)

    block0_calls = []
    block0 = get_blocks(tiny_model)[0]
    handle = block0.register_forward_pre_hook(lambda *a: block0_calls.append(1))
    try:
        reused = Evaluator(tiny_model, space, fitness, dense, prefix_reuse=True).raw(genome, batch)
        calls_with_reuse = len(block0_calls)
        full = Evaluator(tiny_model, space, fitness, dense, prefix_reuse=False).raw(genome, batch)
    finally:
        handle.remove()
    assert calls_with_reuse == 0  # the reused prefix was not recomputed
    assert len(block0_calls) > 0
    assert reused == pytest.approx(full, rel=1e-5, abs=1e-7)
    dense_value = Evaluator(tiny_model, space, fitness, dense, prefix_reuse=False).raw(
        space.from_dropped(), batch
    )
    assert reused != pytest.approx(dense_value, rel=1e-3)


def test_sublayer_space_drops_unequal_counts_of_attention_and_mlp():
    space = LayerDropSpace(6, num_drop=1, sublayers=True, attention_drop=3)
    genome = space.random_genome(np.random.default_rng(0))
    attention, mlp = space.dropped(genome)
    assert (len(attention), len(mlp)) == (3, 1)
    assert space.config()["attention_drop"] == 3
    assert "3 of 6 attention and 1 of 6 MLP" in space.summary()
    with pytest.raises(ValueError, match="needs sublayers"):
        LayerDropSpace(6, num_drop=1, attention_drop=3)
    with pytest.raises(ValueError, match="attention_drop=7 is impossible"):
        LayerDropSpace(6, num_drop=1, sublayers=True, attention_drop=7)


def test_attention_drop_reaches_the_space_from_the_command_line():
    from evosearch.cli import _config, _parser

    args = _parser().parse_args(
        [
            "search",
            "--model",
            "m",
            "--out",
            "r",
            "--drop",
            "2",
            "--sublayers",
            "--attention-drop",
            "5",
        ]
    )
    space = _config(args).space.settings
    assert (space.num_drop, space.sublayers, space.attention_drop) == (2, True, 5)
    with pytest.raises(ValueError, match="attention_drop needs sublayers"):
        _config(
            _parser().parse_args(
                ["search", "--model", "m", "--out", "r", "--drop", "2", "--attention-drop", "5"]
            )
        )


@pytest.mark.parametrize("attention_drop, mlp_drop", [(5, 3), (2, 4), (3, 3)])
def test_aligned_initial_genomes_drop_whole_blocks_first(attention_drop, mlp_drop):
    allowed = (1, 2, 3, 4, 5, 6, 7, 8)
    space = LayerDropSpace(
        10, num_drop=mlp_drop, sublayers=True, attention_drop=attention_drop, allowed=allowed
    )
    assert space.sublayer_init == "aligned"  # the default with sublayers
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        genome = space.initial_genome(rng)
        attention, mlp = space.dropped(genome)
        assert space.spec.is_valid(genome)
        assert (len(attention), len(mlp)) == (attention_drop, mlp_drop)
        assert len(attention & mlp) == min(attention_drop, mlp_drop)  # whole blocks
        assert attention | mlp <= set(allowed)
        seen.add(genome)
    assert len(seen) > 10  # random, not one fixed genome


def test_random_sublayer_init_and_block_spaces_start_from_random_genomes():
    random_init = LayerDropSpace(12, num_drop=4, sublayers=True, sublayer_init="random")
    blocks = LayerDropSpace(12, num_drop=4)
    for space in (random_init, blocks):
        a, b = np.random.default_rng(3), np.random.default_rng(3)
        assert [space.initial_genome(a) for _ in range(5)] == [
            space.random_genome(b) for _ in range(5)
        ]
    rng = np.random.default_rng(0)
    overlaps = {
        len(set.intersection(*random_init.dropped(random_init.initial_genome(rng))))
        for _ in range(50)
    }
    assert overlaps != {4}  # random sublayers are not all whole blocks
    assert random_init.config()["sublayer_init"] == "random"
    assert "sublayer_init" not in blocks.config()


def test_evopress_draws_its_first_generation_from_the_spaces_initial_genomes():
    from evosearch.strategies import EvoPress, EvoPressConfig

    space = LayerDropSpace(12, num_drop=3, sublayers=True, attention_drop=4)
    strategy = EvoPress(
        space, config=EvoPressConfig(initial_population=8), rng=np.random.default_rng(0)
    )
    pool = strategy.ask().genomes
    assert len(pool) == 8
    for genome in pool:
        attention, mlp = space.dropped(genome)
        assert len(attention & mlp) == 3


def test_sublayer_init_is_checked_and_reaches_the_space_from_the_command_line():
    from evosearch.cli import _config, _parser

    def config(*flags):
        argv = ["search", "--model", "m", "--out", "r", "--drop", "2", *flags]
        return _config(_parser().parse_args(argv)).space.settings

    assert config("--sublayers", "--sublayer-init", "random").sublayer_init == "random"
    assert config("--sublayers").sublayer_init == "aligned"  # the default, explicit
    assert config().sublayer_init is None  # whole blocks: no sublayer start
    with pytest.raises(ValueError, match="sublayer_init needs sublayers"):
        config("--sublayer-init", "random")
    with pytest.raises(ValueError, match="sublayer_init must be one of aligned, random"):
        LayerDropSpace(6, num_drop=1, sublayers=True, sublayer_init="blocks")
