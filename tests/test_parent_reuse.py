"""Parent hidden-state reuse: offspring start at the first block where they differ from their
parent, and get exactly the fitness of a forward from the dense model's prefix."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import N_LAYERS, build_model, token_data

from evosearch.arch import get_blocks
from evosearch.engine import Evaluator, sample_batch, search
from evosearch.forward import compute_dense_cache
from evosearch.genome import Genome
from evosearch.operators import level_switch_mutation
from evosearch.space import first_changed_block
from evosearch.strategies import EvoPress, EvoPressConfig, Stage
from fitness.kl import KLDivergence
from search_spaces import LayerDropSpace
from search_spaces.quantization import QuantConfig, QuantSpace
from search_spaces.sparsity import SparsityConfig, SparsitySpace
from search_spaces.width import WidthConfig, WidthSpace

SPACES = ("sparsity", "width", "quantization", "layer-drop")


def _space(name: str, model, ids, tmp_path):
    if name == "sparsity":
        config = SparsityConfig(sparsity=0.5, level_step=0.05, max_level_shift=3)
        return SparsitySpace.build(model, ids, config, db_root=tmp_path, log=lambda _: None)
    if name == "width":
        config = WidthConfig(target=0.5, mlp_levels=8)
        return WidthSpace.build(model, ids, config, db_root=tmp_path, log=lambda _: None)
    if name == "quantization":
        return QuantSpace.build(
            model, ids, QuantConfig(bits=3), db_root=tmp_path, log=lambda _: None
        )
    return LayerDropSpace(N_LAYERS, num_drop=2)


def _offspring(space, parent: Genome, rng) -> Genome:
    """A level-switch mutant of ``parent`` that first differs from it after block 0."""
    for _ in range(200):
        child = level_switch_mutation(parent, space.spec, rng, 1)
        if 0 < space.first_difference(child, parent) < N_LAYERS and space.spec.is_valid(child):
            return child
    raise AssertionError("no mutant differing after block 0")


def _setup(name, tmp_path):
    model = build_model("llama", intermediate_size=64)
    data = token_data(6, 8)
    space = _space(name, model, data.input_ids, tmp_path)
    dense = compute_dense_cache(model, data.input_ids)
    kl = KLDivergence(micro_batch=2)
    kl.prepare(model, data.input_ids, dense)
    return model, data, space, dense, kl


@pytest.mark.parametrize("name", SPACES)
def test_offspring_from_the_parents_states_get_the_same_fitness(name, tmp_path):
    model, data, space, dense, kl = _setup(name, tmp_path)
    batch = sample_batch(data, 24, seed=3, generation=1, stage=0)  # 3 of the 6 rows
    rng = np.random.default_rng(0)
    parent = space.random_genome(rng)
    children = [_offspring(space, parent, rng) for _ in range(3)]

    reused = Evaluator(model, space, kl, dense, parent_reuse=True)
    reused.reuse_parents([parent], batch)
    with_reuse = [reused.raw(parent, batch)]
    block0 = get_blocks(model)[0]
    calls = []
    handle = block0.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with_reuse += [reused.raw(g, batch) for g in children]
    finally:
        handle.remove()
    plain = Evaluator(model, space, kl, dense, parent_reuse=False)
    plain.reuse_parents([parent], batch)  # ignored when off
    without = [plain.raw(g, batch) for g in (parent, *children)]

    assert with_reuse == without  # exact, not approximately equal
    assert calls == []  # no child recomputed block 0
    assert len(set(without)) > 1  # the children differ from their parent


def test_states_are_kept_for_the_current_batch_and_the_named_parents_only(tmp_path):
    model, data, space, dense, kl = _setup("sparsity", tmp_path)
    first = sample_batch(data, 24, seed=3, generation=1, stage=0)
    second = sample_batch(data, 24, seed=3, generation=2, stage=0)
    rng = np.random.default_rng(1)
    parent, other = space.random_genome(rng), space.random_genome(rng)
    ev = Evaluator(model, space, kl, dense)
    ev.reuse_parents([parent], first)
    ev.raw(parent, first)
    ev.raw(other, first)
    assert list(ev._states) == [parent.key()]
    assert ev._reference(other, first).block == space.first_difference(other, parent)
    ev.reuse_parents([parent], second)  # a new batch drops the old states
    assert ev._states == {} and ev._reference(other, second) is None
    tight = Evaluator(model, space, kl, dense, parent_bytes=1)  # no room: nothing kept
    tight.reuse_parents([parent], first)
    tight.raw(parent, first)
    assert tight._states == {}


def test_a_search_gives_the_same_trajectory_with_parent_reuse_on_or_off(tmp_path):
    model, data, space, dense, kl = _setup("sparsity", tmp_path)
    config = EvoPressConfig(
        generations=3,
        offspring=4,
        initial_population=3,
        stages=(Stage(tokens=16, survivors=2), Stage(tokens=32, survivors=1)),
    )
    runs = {}
    for reuse in (True, False):
        evaluator = Evaluator(model, space, kl, dense, parent_reuse=reuse)
        strategy = EvoPress(space, config=config, rng=np.random.default_rng(0))
        result = search(strategy, evaluator, data, seed=0, progress=None)
        runs[reuse] = [(e["genome"], e["batch"], e["value"]) for e in result.evaluations]
    assert runs[True] == runs[False]


def test_first_changed_block():
    a, b = Genome((0, 1, 2, 3)), Genome((0, 1, 3, 2))
    assert first_changed_block(a, b, [0, 0, 1, 2], 3) == 1
    assert first_changed_block(a, a, [0, 0, 1, 2], 3) == 3
    assert first_changed_block(a, b, [0, 0, -1, 2], 3) == 0  # the embedding: block 0
    assert first_changed_block(a, b, [0, 0, None, None], 3) == 3  # slack units change nothing
    assert first_changed_block(a, b, [0, 0, None, 2], 3) == 2
