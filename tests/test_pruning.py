"""Pruning primitives: statistics, exact masks, N:M, and the three base pruners."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, random_ids

from evosearch.pruning import (
    LayerStats,
    ScorePruner,
    SparseGPT,
    block_linears,
    collect_stats,
    keep_mask,
    parse_pattern,
    prune_counts,
    sparsity_of,
)
from evosearch.symbolic import get_pruner


def _layer(seed: int = 0, rows: int = 16, cols: int = 32, tokens: int = 256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # correlated inputs with very different channel scales, as in real activations
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    x = x * torch.rand(cols, generator=g) * 3
    stats = LayerStats(tokens, (x * x).sum(0), x.t() @ x)
    return w, x, stats


@pytest.mark.parametrize("rows,cols,s", [(7, 10, 0.5), (3, 5, 0.33), (16, 32, 0.7), (4, 4, 0.0)])
def test_prune_counts_total_is_exact_and_even(rows, cols, s):
    counts = prune_counts(rows, cols, s)
    assert int(counts.sum()) == round(s * rows * cols)
    assert int(counts.max() - counts.min()) <= 1


def test_keep_mask_prunes_the_lowest_scores_of_each_row():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.7]])
    mask = keep_mask(scores, 0.5)
    assert mask.tolist() == [[True, False, True, False], [False, False, True, True]]


def test_keep_mask_nm_pattern():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    mask = keep_mask(scores, pattern=(2, 4))
    groups = mask.reshape(6, 4, 4)
    assert (groups.sum(-1) == 2).all()
    # the kept two of each group are its two largest scores
    top = torch.topk(scores.reshape(6, 4, 4), 2, dim=-1).indices
    assert torch.gather(groups, -1, top).all()
    with pytest.raises(ValueError, match="not divisible"):
        keep_mask(torch.rand(2, 6), pattern=(2, 4))


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), ("4:8", (4, 8)), (None, None)])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "a:b"])
def test_parse_pattern_rejects_bad_patterns(bad):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(bad)


def test_wanda_weighs_magnitude_by_input_norm():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    stats = LayerStats(1, torch.tensor([100.0, 1.0]))  # channel 0 has norm 10, channel 1 norm 1
    pruned = get_pruner("wanda").prune(w, stats, 0.5)
    assert pruned.tolist() == [[1.0, 0.0], [3.0, 0.0]]
    pruned = get_pruner("magnitude").prune(w, stats, 0.5)
    assert pruned.tolist() == [[0.0, 2.0], [3.0, 0.0]]


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("s", [0.3, 0.5, 0.77])
def test_pruners_hit_the_exact_sparsity(name, s):
    w, _, stats = _layer()
    pruned = get_pruner(name).prune(w, stats, s)
    assert int((pruned == 0).sum()) == round(s * w.numel())
    assert torch.equal(w, _layer()[0])  # input untouched


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
def test_pruners_respect_nm_patterns(name, pattern):
    w, _, stats = _layer()
    pruned = get_pruner(name).prune(w, stats, pattern=pattern)
    n, m = pattern
    nonzero = (pruned != 0).reshape(w.shape[0], -1, m).sum(-1)
    assert (nonzero <= n).all() and int(nonzero.sum()) == w.numel() * n // m


def _output_error(w, pruned, x):
    return float(((x @ w.t() - x @ pruned.t()) ** 2).sum())


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_outputs_better_than_scores(pattern):
    w, x, stats = _layer(tokens=512)
    errors = {
        name: _output_error(w, get_pruner(name).prune(w, stats, 0.5, pattern=pattern), x)
        for name in ("magnitude", "wanda", "sparsegpt")
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_sparsegpt_needs_hessians_and_validates():
    w, _, stats = _layer()
    with pytest.raises(ValueError, match="Hessian"):
        SparseGPT().prune(w, LayerStats(1, stats.x_sq), 0.5)
    with pytest.raises(ValueError, match="damp"):
        SparseGPT(damp=0)


def test_score_pruner_rejects_non_finite_scores():
    w, _, stats = _layer()
    bad = ScorePruner("bad", lambda w, s: w / 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        bad.prune(w, stats, 0.5)


def test_unknown_pruner_names_the_choices():
    with pytest.raises(ValueError, match="magnitude"):
        get_pruner("obs")


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_collect_stats_matches_a_manual_forward(arch):
    model = build_model(arch)
    ids = random_ids(3, 8)
    refs = block_linears(model)
    assert len({r.block for r in refs}) == 4
    stats = collect_stats(model, ids, hessian=True, micro_batch=2)
    captured = {}
    ref = refs[-1]  # the last MLP output projection: its input is block-internal
    handle = ref.module(model).register_forward_pre_hook(
        lambda m, a: captured.setdefault("x", []).append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = torch.cat(captured["x"])
    s = stats[ref.name]
    assert s.n_tokens == 24 and s.x_sq.shape == (ref.shape[1],)
    torch.testing.assert_close(s.x_sq, (x * x).sum(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.hessian, x.t() @ x, rtol=1e-4, atol=1e-4)


def test_collect_gradients_leaves_the_model_untouched():
    model = build_model("llama")
    ids = random_ids(2, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = collect_stats(model, ids, gradients=True)
    ref = block_linears(model)[0]
    g = stats[ref.name].grad_sq
    assert g.shape == ref.shape and (g >= 0).all() and g.sum() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_sparsity_of():
    assert sparsity_of(torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == 0.75


def test_collect_stats_for_named_layers_only_in_float64():
    model = build_model("llama")
    ids = random_ids(2, 8)
    refs = block_linears(model)
    wanted = {refs[3].name, refs[-1].name}
    stats = collect_stats(model, ids, hessian=True, layers=wanted, dtype=torch.float64)
    assert set(stats) == wanted
    full = collect_stats(model, ids, hessian=True)
    for name in wanted:
        assert stats[name].hessian.dtype == torch.float64
        torch.testing.assert_close(stats[name].hessian.float(), full[name].hessian)
    with pytest.raises(ValueError, match="not block linears"):
        collect_stats(model, ids, layers={"lm_head"})
