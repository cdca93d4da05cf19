"""Symbolic metrics: operator definitions, the parser's allow-list, canonical forms, safety."""

from __future__ import annotations

import json

import pytest
import torch

from evosearch.pruning import LayerStats, keep_mask
from evosearch.symbolic import (
    EPS,
    KNOWN_METRICS,
    OPS,
    TERMINALS,
    MetricError,
    Node,
    Terminal,
    canonical,
    evaluate,
    from_json,
    get_pruner,
    load_metric,
    metric_pruner,
    parse,
    register_terminal,
    save_metric,
    score_layer,
    to_json,
    to_math,
    to_string,
)


def _layer(seed: int = 0, rows: int = 8, cols: int = 16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x_sq = torch.rand(cols, generator=g) * 10 + 0.1
    grad_sq = torch.rand(rows, cols, generator=g) * 1e-3 + 1e-6
    return w, LayerStats(64, x_sq, None, grad_sq)


def _terms(w, stats):
    return {"W": w.abs(), "X": stats.x_norm[None, :], "G": stats.grad_sq.sqrt()}


def test_operator_definitions(monkeypatch):
    a = torch.tensor([[-2.0, 0.5], [3.0, -4.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # Frobenius norm 5
    t = {"A": a, "B": b}

    def ev(text):
        node = _parse_ab(text, monkeypatch)
        return evaluate(node, t)

    assert torch.allclose(ev("div(A, B)"), a / 5.0)  # Pruner-Zero's div: by ||B||_F
    assert torch.allclose(ev("pdiv(A, B)"), a / (b.abs() + EPS))
    assert torch.allclose(ev("sqrt(A)"), a.abs().sqrt())
    assert torch.allclose(ev("log(A)"), (a.abs() + EPS).log())
    assert torch.allclose(ev("sqr(A)"), a * a)
    assert torch.allclose(ev("mms(A)"), (a + 4.0) / 7.0)
    z = ev("zscore(A)")
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1.0) < 1e-5
    assert torch.isfinite(ev("exp(mul(A, 1000))")).all()  # clamped before exp
    assert torch.equal(ev("sub(A, B)"), a - b) and torch.equal(ev("neg(A)"), -a)
    # row- and column-relative (RIA): each entry over its row's / column's l1 norm
    assert torch.allclose(ev("rown(A)"), a / torch.tensor([[2.5], [7.0]]))
    assert torch.allclose(ev("coln(A)"), a / torch.tensor([[5.0, 4.5]]))
    assert torch.allclose(ev("coln(2)"), torch.tensor(1.0))  # a scalar is its own column


def test_row_relative_scaling_keeps_the_mask_and_column_relative_does_not():
    w, stats = _layer(rows=6, cols=8)
    for text in ("mul(W, X)", "mul(sqr(W), mms(G))"):
        plain = score_layer(parse(text), w, stats).argsort(1)
        assert torch.equal(score_layer(parse(f"rown({text})"), w, stats).argsort(1), plain)
        assert to_string(canonical(parse(f"rown({text})"))) == to_string(canonical(parse(text)))
    ria = parse("mul(add(coln(W), rown(W)), sqrt(X))")
    assert canonical(ria) == ria  # nothing to simplify or strip
    assert not torch.equal(score_layer(parse("coln(W)"), w, stats).argsort(1), w.abs().argsort(1))


def _parse_ab(text: str, monkeypatch) -> Node:
    """Parse with two ad-hoc signed terminals A and B (registered for this test only)."""
    monkeypatch.setattr("evosearch.symbolic.TERMINALS", dict(TERMINALS))
    for name in ("A", "B"):
        register_terminal(Terminal(name, lambda w, s: w, nonneg=False))
    return parse(text)


def test_terminals_broadcast_per_channel_and_per_weight():
    w, stats = _layer()
    score = score_layer(parse("mul(W, X)"), w, stats)
    assert score.shape == w.shape
    assert torch.allclose(score, w.abs() * stats.x_norm[None, :])
    # a metric of X alone still gives an (out, in) score: every row ranks channels alike
    score = score_layer(parse("X"), w, stats)
    assert score.shape == w.shape and torch.equal(score[0], score[-1])
    score = score_layer(parse("mul(sqr(W), mms(G))"), w, stats)
    g = stats.grad_sq.sqrt()
    assert torch.allclose(score, w**2 * (g - g.min()) / (g.max() - g.min()), atol=1e-6)


def test_known_metrics_match_the_built_in_pruners():
    w, stats = _layer(1)
    for name in ("magnitude", "wanda"):
        ours = metric_pruner(KNOWN_METRICS[name]).prune(w, stats, 0.5)
        assert torch.equal(ours, get_pruner(name).prune(w, stats, 0.5))


@pytest.mark.parametrize(
    "text",
    [
        "__import__(os)",
        "W.abs()",
        "mul(W, X); print(1)",
        "foo(W)",
        "mul(W)",
        "sqrt(W, X)",
        "mul(W, X",
        "Y",
        "lambda",
    ],
)
def test_parse_rejects_anything_outside_the_allow_list(text):
    with pytest.raises(MetricError):
        parse(text)


def test_from_json_rejects_unknown_operators():
    with pytest.raises(MetricError, match="unknown operator"):
        from_json({"op": "system", "children": [{"op": "W"}]})
    with pytest.raises(MetricError, match="unknown terminal"):
        from_json({"op": "os"})


@pytest.mark.parametrize("text", [*KNOWN_METRICS.values(), "exp(pdiv(log(G), neg(X)))", "-1.5"])
def test_string_and_json_round_trip(text):
    tree = parse(text)
    assert parse(to_string(tree)) == tree
    assert from_json(json.loads(json.dumps(to_json(tree)))) == tree


@pytest.mark.parametrize(
    "text,expected",
    [
        ("neg(neg(X))", "X"),
        ("sqrt(sqr(W))", "W"),  # |W| is non-negative: abs disappears
        ("sqr(sqrt(G))", "G"),
        ("exp(log(mul(W, X)))", "mul(W, X)"),
        ("log(exp(sub(W, X)))", "sub(W, X)"),
        ("abs(neg(sub(W, X)))", "abs(sub(W, X))"),
        ("id(mul(X, W))", "mul(W, X)"),
        ("mul(X, mul(G, W))", "mul(G, mul(W, X))"),  # associative and commutative
        ("mul(neg(W), neg(X))", "mul(W, X)"),
        ("mms(zscore(mul(X, W)))", "mul(W, X)"),
        ("sub(G, G)", "0"),
    ],
)
def test_canonical_simplifications(text, expected):
    assert to_string(canonical(parse(text))) == expected


@pytest.mark.parametrize(
    "text,stripped",
    [
        ("sqrt(mul(W, X))", "mul(W, X)"),
        ("sqr(mul(W, X))", "mul(W, X)"),
        ("log(mul(W, G))", "mul(G, W)"),
        ("exp(mul(W, X))", "mul(W, X)"),
        ("mms(mul(W, X))", "mul(W, X)"),
        ("zscore(mul(W, G))", "mul(G, W)"),
        ("div(mul(W, X), G)", "mul(W, X)"),
        ("mul(3, mul(W, X))", "mul(W, X)"),
        ("add(5, mul(W, X))", "mul(W, X)"),
        ("tanh(mul(W, 0.1))", "W"),
        # a common positive factor of a sum: its last term (by constant-free string) gets scale 1
        ("add(mul(2, mul(W, X)), mul(96, mul(G, W)))", "add(mul(48, mul(G, W)), mul(W, X))"),
        ("add(mul(6, X), mul(3, W))", "add(X, mul(0.5, W))"),
    ],
)
def test_root_monotone_transforms_are_stripped_and_give_the_same_mask(text, stripped):
    tree, simple = parse(text), parse(stripped)
    assert to_string(canonical(tree)) == stripped
    assert to_string(canonical(tree, ranking=False)) != stripped  # only for ranking
    for seed in range(3):
        w, stats = _layer(seed, rows=16, cols=32)
        for pattern in (None, (2, 4)):
            masks = [
                keep_mask(score_layer(t, w, stats), None if pattern else 0.5, pattern=pattern)
                for t in (tree, simple)
            ]
            assert torch.equal(masks[0], masks[1])


def test_non_monotone_root_is_kept():
    # neg reverses the ranking; sqr of a signed value is not monotone
    assert to_string(canonical(parse("neg(mul(W, X))"))) == "neg(mul(W, X))"
    assert to_string(canonical(parse("sqr(sub(W, X))"))) == "sqr(sub(W, X))"
    assert to_string(canonical(parse("mul(-2, W)"))) == "mul(-2, W)"


def test_non_finite_and_constant_scores_are_rejected_with_a_reason():
    w, stats = _layer()
    w[0, 0] = float("nan")
    with pytest.raises(MetricError, match="non-finite"):
        score_layer(parse("W"), w, stats)
    w, stats = _layer()
    with pytest.raises(MetricError, match="constant"):
        score_layer(parse("pdiv(W, W)"), w * 0 + 1, stats)
    with pytest.raises(MetricError, match="constant"):
        score_layer(parse("sub(W, W)"), w, stats)
    with pytest.raises(MetricError, match="gradients"):
        score_layer(parse("G"), w, LayerStats(64, stats.x_sq))
    # the pruner interface raises the same error
    with pytest.raises(MetricError, match="constant"):
        metric_pruner("sub(X, X)").prune(w, stats, 0.5)


def test_to_math_is_readable():
    assert to_math(parse(KNOWN_METRICS["wanda"])) == "|W| · ‖X‖"
    assert to_math(parse("sqr(mul(W, G))")) == "(|W| · |G|)^2"
    assert to_math(parse("div(W, X)")) == "|W| / ‖‖X‖‖_F"


def test_saved_metric_loads_back_as_a_pruner(tmp_path):
    tree = parse(KNOWN_METRICS["pruner-zero"])
    path = save_metric(tree, tmp_path / "m.json", fitness=1.5)
    record = json.loads(path.read_text())
    assert record["expression"] == to_string(tree) and record["fitness"] == 1.5
    assert record["math"] == to_math(tree)
    pruner = get_pruner(str(path))
    assert pruner.needs_gradients and not load_metric(path).needs_hessian
    w, stats = _layer(2)
    expected = metric_pruner(tree).prune(w, stats, 0.5)
    assert torch.equal(pruner.prune(w, stats, 0.5), expected)
    assert not get_pruner(
        str(save_metric(parse("mul(W, X)"), tmp_path / "w.json"))
    ).needs_gradients
    (tmp_path / "bad.json").write_text('{"expression": "eval(W)"}')
    with pytest.raises(MetricError):
        get_pruner(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError):
        get_pruner(str(tmp_path / "missing.json"))


def test_register_terminal_validates_names():
    with pytest.raises(ValueError, match="operator name"):
        register_terminal(Terminal("mul", lambda w, s: w))
    with pytest.raises(ValueError, match="identifier"):
        register_terminal(Terminal("a b", lambda w, s: w))


def test_every_operator_is_finite_on_extreme_inputs():
    x = torch.tensor([[0.0, 1e-30, 1e30, -1e30, 5.0]])
    for name, op in OPS.items():
        args = (x,) if op.arity == 1 else (x, x)
        out = op.fn(*args)
        if name not in ("sqr", "mul"):  # 1e30^2 overflows float32: caught by score_layer
            assert torch.isfinite(out).all(), name
