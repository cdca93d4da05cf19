"""Training-aware selection in every space: the candidate trains through the healing code,
keeps its structure while it is scored (zeros stay zero, quantized weights on their grid,
dropped blocks dropped), its fitness falls, and the resident model never changes."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, random_ids

from evosearch.engine import Evaluator
from evosearch.evaluation import Batch
from evosearch.forward import compute_dense_cache
from evosearch.training import FakeQuantLinear, LoRALinear, TrainConfig, block_linears
from evosearch.training_aware import TrainingAware
from fitness.kl import KLDivergence


def _layer_drop(model, ids, tmp_path, sublayers=False):
    from search_spaces.layer_drop import LayerDropSpace

    space = LayerDropSpace(4, num_drop=1, sublayers=sublayers)
    if sublayers:
        return space, space.from_dropped(attention=[1], mlp=[2])
    return space, space.from_dropped(blocks=[1])


def _sparsity(model, ids, tmp_path, pattern=None):
    from search_spaces.sparsity import SparsityConfig, SparsitySpace

    settings = dict(sparsity=0.5, level_step=0.05, max_level_shift=3)
    if pattern:
        settings.update(pattern=pattern, level_step=0.02)
    config = SparsityConfig(**settings)
    space = SparsitySpace.build(model, ids, config, db_root=tmp_path, log=lambda _: None)
    return space, space.uniform_genome()


def _quantization(model, ids, tmp_path):
    from search_spaces.quantization import QuantConfig, QuantSpace

    config = QuantConfig(bits=3, group_size=16, quantizer="rtn")
    space = QuantSpace.build(model, ids, config, db_root=tmp_path, log=lambda _: None)
    return space, space.uniform_genome()


SPACES = {
    "blocks": _layer_drop,
    "sublayers": lambda m, i, t: _layer_drop(m, i, t, sublayers=True),
    "unstructured": _sparsity,
    "2:4": lambda m, i, t: _sparsity(m, i, t, pattern="2:4"),
    "quantization": _quantization,
}


class Inspecting:
    """The KL fitness, recording the weights the candidate is scored with (as trained:
    LoRA merged and masked, fake-quantized weights projected)."""

    def __init__(self) -> None:
        self.kl, self.seen = KLDivergence(), []

    def prepare(self, model, ids, dense) -> None:
        self.kl.prepare(model, ids, dense)

    def __call__(self, candidate, batch) -> float:
        modules = dict(candidate.model.named_modules())
        weights = {}
        for path, module in block_linears(candidate.model).items():
            w = module.weight
            if path.endswith(".base"):  # wrapped for training: what the forward uses
                path = path.removesuffix(".base")
                wrapper = modules[path]
                if isinstance(wrapper, LoRALinear):
                    w = wrapper.merged()
                elif isinstance(wrapper, FakeQuantLinear):
                    w = wrapper.grid.project(w)
            weights[path] = w.detach().clone()
        self.seen.append(weights)
        return self.kl(candidate, batch)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("space_name", list(SPACES))
def test_training_aware_selection_keeps_each_space_structure(space_name, mode, tmp_path):
    model = build_model("llama", intermediate_size=64)
    ids = random_ids(8, 16)
    space, genome = SPACES[space_name](model, ids, tmp_path)
    dense = compute_dense_cache(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = Batch(tuple(range(8)), ids)
    untrained = Inspecting()
    untrained.prepare(model, ids, dense)
    value0 = Evaluator(model, space, untrained, dense).raw(genome, batch)
    inner = Inspecting()
    tas = TrainingAware(inner, {0: 128}, TrainConfig(mode=mode, lr=3e-3))
    tas.prepare(model, ids, dense)
    value = Evaluator(model, space, tas, dense).raw(genome, batch)
    assert value < value0  # trained on the scored sequences: KL must fall
    start, trained = untrained.seen[0], inner.seen[0]
    assert start.keys() == trained.keys()  # no dropped block or sublayer came back
    moved = [k for k in start if not torch.equal(start[k], trained[k])]
    assert moved  # it did train
    if space_name != "quantization":  # (a quantized zero is a code like any other)
        for name, w in start.items():
            assert torch.equal(trained[name][w == 0], w[w == 0]), name  # zeros stay zero
    if space_name == "quantization":
        for unit in space.refs:  # every trained weight lies on the grid of its level
            level = genome.levels[space.units.index(unit)]
            assert space.grid(unit, level).contains(trained[unit.name])
    if space_name in ("unstructured", "2:4"):
        zeros = sum(int((w == 0).sum()) for w in start.values())
        assert zeros == sum(int((w == 0).sum()) for w in trained.values())
    for k, v in model.state_dict().items():  # the resident model is untouched
        assert torch.equal(before[k], v), k
    again = TrainingAware(Inspecting(), {0: 128}, TrainConfig(mode=mode, lr=3e-3))
    again.prepare(model, ids, dense)  # nor are the space's cached modules: same result again
    assert Evaluator(model, space, again, dense).raw(genome, batch) == value


def test_cli_flags_ask_for_training_aware_selection_in_any_space():
    from evosearch.cli import _config, _parser

    argv = ["search", "--space", "sparsity", "--target", "0.5", "--stages", "32:2,64:1",
            "--out", "r", "--train-tokens", "64,256", "--train-mode", "full",
            "--train-lr", "1e-3"]  # fmt: skip
    config = _config(_parser().parse_args(argv))
    assert config.space.name == "sparsity"
    assert config.selection_training.tokens == (64, 256)
    assert config.selection_training.train.mode == "full"
    assert config.selection_training.train.lr == 1e-3


def test_cli_layer_drop_search_with_training_aware_selection(tmp_path):
    """``--train-tokens`` on a layer-drop search: the run records it and its scores differ
    from the same search without training (the candidates were trained before scoring)."""
    import json

    from conftest import hf_tokenizer
    from helpers import search_args

    from evosearch.cli import main

    model_dir = tmp_path / "tiny"
    build_model("llama", n_layers=6, max_position_embeddings=256).save_pretrained(model_dir)
    hf_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    results = {}
    for name, extra in (("plain", []), ("trained", ["--train-tokens", "32,64"])):
        argv = search_args(model_dir, text, tmp_path / name, *extra)
        assert main(argv) == 0
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    config = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert config["selection_training"]["tokens"] == [32, 64]
    assert results["trained"]["fitness"] == "kl+train"
    values = [[h["value"] for h in r["history"]] for r in results.values()]
    assert values[0] != values[1]  # candidates were scored after training
