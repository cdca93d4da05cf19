"""Symbolic pruning metrics: expression trees over W, X, G and an allow-list of tensor ops.

A metric is a tree (:class:`Node`) whose leaves are *terminals* (statistics of one linear layer)
or constants and whose inner nodes are operators from :data:`OPS`. It is evaluated by a small
interpreter (:func:`evaluate`) that only ever calls the functions in that table: text is turned
into a tree by a recursive-descent parser (:func:`parse`), never by ``eval``.

Terminals (:data:`TERMINALS`; add more with :func:`register_terminal`):

* ``W``: ``|W|``, the weight magnitude ``(out, in)`` (Pruner-Zero uses ``|W|``).
* ``X``: Wanda's input-channel norm ``||X_j||_2``, ``(1, in)``; it broadcasts over rows.
* ``G``: the gradient magnitude ``||G_ij||_2`` over calibration sequences (GBLM, Pruner-Zero),
  ``(out, in)``; needs ``collect_stats(..., gradients=True)``.

Operators (exact definitions; ``EPS = 1e-12``):

========  =====  ========================================================================
name      arity  value
========  =====  ========================================================================
id        1      ``x``
abs       1      ``|x|``
neg       1      ``-x``
sqr       1      ``x^2``
sqrt      1      ``sqrt(|x|)``
log       1      ``log(|x| + EPS)``
exp       1      ``exp(min(x, 80))`` (clamped so that float32 cannot overflow)
tanh      1      ``tanh(x)``
mms       1      min-max normalisation over the whole tensor: ``(x - min) / (max - min + EPS)``
zscore    1      ``(x - mean) / (std + EPS)`` over the whole tensor
rown      1      row-relative: ``x / (sum_j |x_ij| + EPS)``, each entry over its row's l1 norm
coln      1      column-relative: ``x / (sum_i |x_ij| + EPS)``, over its column's l1 norm (RIA's
                 relative importance is ``rown(W) + coln(W)``); on a per-channel ``(1, in)``
                 tensor each column holds one value, so ``coln`` gives its sign
add       2      ``a + b``
sub       2      ``a - b``
mul       2      ``a * b``
div       2      ``a / (||b||_F + EPS)``: Pruner-Zero's division, by the Frobenius norm of the
                 right operand (a positive scalar), which can never divide by a tiny element
pdiv      2      ``a / (|b| + EPS)``, element-wise protected division
========  =====  ========================================================================

Canonical form (:func:`canonical`): the tree after algebraic simplification (Pruner-Zero's
opposing-operation simplification: ``neg(neg(x))``, ``sqr(sqrt(x))``, ``exp(log(x))``,
``log(exp(x))``, ...; idempotent ops; ``abs`` of non-negative values; sorted operands of ``add``
and ``mul``; constant folding) and, with ``ranking=True`` (the default), with the strictly
increasing transforms at the root stripped, since per-row ranking (and so the pruning mask) is
the same for a score and any strictly increasing function of it: ``sqrt``/``sqr``/``log``/``abs``
of a non-negative score, ``exp``, ``tanh``, ``mms``, ``zscore``, ``div`` (a positive scale),
``rown`` (a positive scale per row), a common positive factor of the terms of a sum,
multiplication by a positive constant and addition of a constant. The canonical string
identifies a metric for memoisation: equivalent trees are evaluated once.

Example:
    >>> tree = parse("mul(sqr(W), mms(G))")          # Pruner-Zero's published metric
    >>> to_string(canonical(parse("sqrt(mul(W, sqrt(X)))")))
    'mul(W, sqrt(X))'
    >>> to_math(tree)
    '|W|^2 · mms(|G|)'
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evosearch.errors import CandidateError
from evosearch.pruning import PRUNERS, LayerStats, Pruner, ScorePruner

__all__ = [
    "EPS",
    "KNOWN_METRICS",
    "OPS",
    "TERMINALS",
    "MetricError",
    "Node",
    "Op",
    "SymbolicScore",
    "Terminal",
    "canonical",
    "evaluate",
    "from_json",
    "get_pruner",
    "is_nonneg",
    "load_metric",
    "metric_pruner",
    "parse",
    "register_terminal",
    "save_metric",
    "score_layer",
    "terminal_values",
    "to_json",
    "to_math",
    "to_string",
]

EPS = 1e-12
EXP_CLAMP = 80.0
FORMAT = "evosearch-symbolic-metric/1"


class MetricError(CandidateError):
    """A metric that cannot be parsed or evaluated, or whose scores are unusable."""


# -- trees ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One node of an expression tree (immutable, hashable).

    Attributes:
        op: an operator of :data:`OPS`, a terminal name, or ``"const"``.
        children: operands, as many as the operator's arity (none for leaves).
        value: the number of a ``"const"`` leaf.
    """

    op: str
    children: tuple[Node, ...] = ()
    value: float | None = None

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def depth(self) -> int:
        """Nodes on the longest root-to-leaf path (a leaf has depth 1)."""
        return 1 + max((c.depth() for c in self.children), default=0)

    def size(self) -> int:
        """Number of nodes."""
        return 1 + sum(c.size() for c in self.children)

    def terminals(self) -> set[str]:
        """Names of the terminals the tree reads."""
        if self.op == "const":
            return set()
        if self.is_leaf:
            return {self.op}
        return set().union(*(c.terminals() for c in self.children))

    def __str__(self) -> str:
        return to_string(self)


def const(value: float) -> Node:
    return Node("const", value=float(value))


# -- terminals -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Terminal:
    """A statistic of one linear layer that metrics may read.

    Attributes:
        name: identifier in expressions (letters, digits, ``_``; not an operator name).
        fn: ``fn(weight (out, in) float32, stats) -> tensor`` broadcastable to ``(out, in)``:
            ``(out, in)`` per weight, ``(1, in)`` per input channel, ``(out, 1)`` per row.
        nonneg: the values are never negative (lets canonicalisation drop ``abs``).
        needs_gradients: reads ``stats.grad_sq``.
        math: how :func:`to_math` writes it.
    """

    name: str
    fn: Callable[[torch.Tensor, LayerStats], torch.Tensor]
    nonneg: bool = True
    needs_gradients: bool = False
    math: str = ""


def _w(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return weight.abs()


def _x(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return stats.x_norm.to(weight.device, torch.float32)[None, :]  # (1, in)


def _g(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    if stats.grad_sq is None:
        raise MetricError("terminal G needs gradients: collect_stats(..., gradients=True)")
    return stats.grad_sq.to(weight.device, torch.float32).sqrt()  # (out, in)


TERMINALS: dict[str, Terminal] = {
    "W": Terminal("W", _w, math="|W|"),
    "X": Terminal("X", _x, math="‖X‖"),
    "G": Terminal("G", _g, needs_gradients=True, math="|G|"),
}


def register_terminal(terminal: Terminal) -> None:
    """Add a terminal (e.g. a Hessian diagonal) that parsed and random trees may use."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", terminal.name):
        raise ValueError(f"terminal name must be an identifier, got {terminal.name!r}")
    if terminal.name in OPS or terminal.name == "const":
        raise ValueError(f"terminal name {terminal.name!r} is an operator name")
    TERMINALS[terminal.name] = terminal


def terminal_values(
    weight: torch.Tensor, stats: LayerStats, names: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """The terminals ``names`` (default: all whose statistics are present) of one layer."""
    w = weight.detach().float()
    if names is None:
        have_g = stats.grad_sq is not None
        names = {n for n, t in TERMINALS.items() if have_g or not t.needs_gradients}
    out = {}
    for name in names:
        if name not in TERMINALS:
            raise MetricError(f"unknown terminal {name!r}; known: {sorted(TERMINALS)}")
        out[name] = TERMINALS[name].fn(w, stats)
    return out


# -- operators -----------------------------------------------------------------------------------


def _mms(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + EPS)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
    return (x - x.mean()) / (std + EPS)


def _l1_relative(x: torch.Tensor, dim: int) -> torch.Tensor:
    x2 = x.reshape((1,) * (2 - x.dim()) + x.shape) if x.dim() < 2 else x  # scalars: one entry
    return (x2 / (x2.abs().sum(dim=dim, keepdim=True) + EPS)).reshape(x.shape)


@dataclass(frozen=True)
class Op:
    """An allowed operator.

    Attributes:
        name: identifier in expressions.
        arity: 1 or 2.
        fn: the tensor function.
        math: format string for :func:`to_math` (``{0}``, ``{1}`` are the operands).
        increasing: strictly increasing in its (only) operand on all reals (within each row,
            for per-row ops such as ``rown``).
        increasing_nonneg: strictly increasing on non-negative operands.
    """

    name: str
    arity: int
    fn: Callable[..., torch.Tensor]
    math: str
    increasing: bool = False
    increasing_nonneg: bool = False


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("id", 1, lambda x: x, "{0}", increasing=True),
        Op("abs", 1, torch.abs, "|{0}|", increasing_nonneg=True),
        Op("neg", 1, torch.neg, "-{0}"),
        Op("sqr", 1, torch.square, "{0}^2", increasing_nonneg=True),
        Op("sqrt", 1, lambda x: x.abs().sqrt(), "sqrt({0})", increasing_nonneg=True),
        Op("log", 1, lambda x: (x.abs() + EPS).log(), "log({0})", increasing_nonneg=True),
        Op("exp", 1, lambda x: x.clamp(max=EXP_CLAMP).exp(), "exp({0})", increasing=True),
        Op("tanh", 1, torch.tanh, "tanh({0})", increasing=True),
        Op("mms", 1, _mms, "mms({0})", increasing=True),
        Op("zscore", 1, _zscore, "zscore({0})", increasing=True),
        # rown scales each row by a positive number: increasing for per-row ranking
        Op("rown", 1, lambda x: _l1_relative(x, -1), "rown({0})", increasing=True),
        Op("coln", 1, lambda x: _l1_relative(x, -2), "coln({0})"),
        Op("add", 2, torch.add, "({0} + {1})"),
        Op("sub", 2, torch.sub, "({0} - {1})"),
        Op("mul", 2, torch.mul, "{0} · {1}"),
        Op("div", 2, lambda a, b: a / (torch.linalg.vector_norm(b) + EPS), "{0} / ‖{1}‖_F"),
        Op("pdiv", 2, lambda a, b: a / (b.abs() + EPS), "{0} / |{1}|"),
    )
}

UNARY = tuple(n for n, op in OPS.items() if op.arity == 1)
BINARY = tuple(n for n, op in OPS.items() if op.arity == 2)


# -- interpreter ---------------------------------------------------------------------------------


def evaluate(tree: Node, terminals: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Evaluate ``tree`` on the given terminal tensors (broadcasting as torch does).

    Only the functions of :data:`OPS` are called. The result may have fewer dimensions than
    ``(out, in)`` when the tree reads only per-channel terminals; :func:`score_layer` expands
    it. Raises :class:`MetricError` for an unknown operator or terminal.
    """
    if tree.op == "const":
        return torch.tensor(float(tree.value))
    if tree.is_leaf:
        try:
            return terminals[tree.op]
        except KeyError:
            raise MetricError(f"terminal {tree.op!r} is not available") from None
    op = OPS.get(tree.op)
    if op is None or op.arity != len(tree.children):
        raise MetricError(f"unknown operator {tree.op!r} with {len(tree.children)} operand(s)")
    return op.fn(*(evaluate(c, terminals) for c in tree.children))


def score_layer(tree: Node, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """The ``(out, in)`` float32 score of one layer; raises :class:`MetricError` when it has
    non-finite values or is constant within every row (it would rank nothing)."""
    values = terminal_values(weight, stats, tree.terminals())
    with torch.no_grad():
        score = evaluate(tree, values).float().expand(weight.shape)
    if not torch.isfinite(score).all():
        raise MetricError("non-finite scores (NaN or inf)")
    if weight.shape[1] > 1 and bool((score.amax(1) == score.amin(1)).all()):
        raise MetricError("scores are constant within every row")
    return score


@dataclass(frozen=True)
class SymbolicScore:
    """A metric as the ``score(weight, stats)`` callable of a :class:`ScorePruner`."""

    tree: Node

    def __call__(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return score_layer(self.tree, weight, stats)


def metric_pruner(tree: Node | str, *, name: str | None = None) -> ScorePruner:
    """A :class:`~evosearch.pruning.ScorePruner` that prunes by ``tree``'s scores."""
    tree = parse(tree) if isinstance(tree, str) else tree
    needs_g = any(TERMINALS[t].needs_gradients for t in tree.terminals() if t in TERMINALS)
    return ScorePruner(
        name or f"symbolic:{to_string(tree)}", SymbolicScore(tree), needs_gradients=needs_g
    )


# -- text ----------------------------------------------------------------------------------------


def _fmt_const(value: float) -> str:
    return repr(float(value)).removesuffix(".0") if float(value).is_integer() else repr(value)


def to_string(tree: Node) -> str:
    """Prefix form, e.g. ``mul(W, sqrt(X))``; :func:`parse` reads it back."""
    if tree.op == "const":
        return _fmt_const(tree.value)
    if tree.is_leaf:
        return tree.op
    return f"{tree.op}({', '.join(to_string(c) for c in tree.children)})"


def to_math(tree: Node) -> str:
    """Readable math, e.g. ``|W| · sqrt(‖X‖)``."""
    if tree.op == "const":
        return _fmt_const(tree.value)
    if tree.is_leaf:
        t = TERMINALS.get(tree.op)
        return (t.math or t.name) if t else tree.op
    parts = [to_math(c) for c in tree.children]
    if tree.op == "sqr" and tree.children[0].op in ("mul", "div", "pdiv", "neg"):
        parts[0] = f"({parts[0]})"
    return OPS[tree.op].math.format(*parts)


_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_]\w*)|(?P<p>[(),]))"
)


def parse(text: str) -> Node:
    """Parse the prefix form written by :func:`to_string` (recursive descent, no ``eval``).

    Names must be operators of :data:`OPS` (with their arity) or terminals of
    :data:`TERMINALS`; anything else raises :class:`MetricError`.
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise MetricError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    i = 0

    def expect(p: str) -> None:
        nonlocal i
        if i >= len(tokens) or tokens[i] != ("p", p):
            got = tokens[i][1] if i < len(tokens) else "end of text"
            raise MetricError(f"expected {p!r}, got {got!r} in {text!r}")
        i += 1

    def node() -> Node:
        nonlocal i
        if i >= len(tokens):
            raise MetricError(f"unexpected end of {text!r}")
        kind, tok = tokens[i]
        i += 1
        if kind == "num":
            return const(float(tok))
        if kind != "name":
            raise MetricError(f"unexpected {tok!r} in {text!r}")
        if tok in OPS:
            op = OPS[tok]
            expect("(")
            children = [node()]
            for _ in range(op.arity - 1):
                expect(",")
                children.append(node())
            expect(")")
            return Node(tok, tuple(children))
        if tok in TERMINALS:
            return Node(tok)
        raise MetricError(
            f"unknown name {tok!r} in {text!r}; operators: {sorted(OPS)}, "
            f"terminals: {sorted(TERMINALS)}"
        )

    tree = node()
    if i != len(tokens):
        raise MetricError(f"trailing text after position {i} in {text!r}")
    return tree


def to_json(tree: Node) -> dict[str, Any]:
    """Nested JSON form: ``{"op": ..., "children": [...]}`` (``"value"`` for constants)."""
    if tree.op == "const":
        return {"op": "const", "value": tree.value}
    out: dict[str, Any] = {"op": tree.op}
    if tree.children:
        out["children"] = [to_json(c) for c in tree.children]
    return out


def from_json(data: dict[str, Any]) -> Node:
    """Inverse of :func:`to_json`; checks operators and terminals against the allow-lists."""
    if not isinstance(data, dict) or "op" not in data:
        raise MetricError(f"a metric node must be an object with 'op', got {data!r}")
    if data["op"] == "const":
        return const(float(data["value"]))
    children = tuple(from_json(c) for c in data.get("children", ()))
    op = data["op"]
    if children:
        if op not in OPS or OPS[op].arity != len(children):
            raise MetricError(f"unknown operator {op!r} with {len(children)} operand(s)")
    elif op not in TERMINALS:
        raise MetricError(f"unknown terminal {op!r}; known: {sorted(TERMINALS)}")
    return Node(op, children)


def save_metric(tree: Node, path: str | Path, **extra: Any) -> Path:
    """Write a metric file that :func:`load_metric` and ``get_pruner("file.json")`` read."""
    path = Path(path)
    record = {
        "format": FORMAT,
        "expression": to_string(tree),
        "math": to_math(tree),
        "canonical": to_string(canonical(tree)),
        "tree": to_json(tree),
        "terminals": sorted(tree.terminals()),
        **extra,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load_metric(path: str | Path, *, name: str | None = None) -> ScorePruner:
    """A saved metric (``best_metric.json`` of a metric search) as a pruner."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metric file not found: {path}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MetricError(f"{path} is not JSON: {exc}") from None
    if not isinstance(record, dict) or ("tree" not in record and "expression" not in record):
        raise MetricError(f"{path} holds no metric ('tree' or 'expression')")
    try:
        tree = from_json(record["tree"]) if "tree" in record else parse(record["expression"])
    except RecursionError:
        raise MetricError(f"{path}: the metric is nested too deeply to read") from None
    return metric_pruner(tree, name=name or f"symbolic:{path.name}")


# -- canonical form ------------------------------------------------------------------------------


def is_nonneg(tree: Node) -> bool:
    """Whether ``tree``'s values are provably never negative."""
    op = tree.op
    if op == "const":
        return tree.value >= 0
    if tree.is_leaf:
        return op in TERMINALS and TERMINALS[op].nonneg
    kids = tree.children
    if op in ("abs", "sqr", "sqrt", "exp", "mms"):
        return True
    if op in ("id", "tanh", "rown", "coln"):
        return is_nonneg(kids[0])
    if op in ("add", "mul"):
        return is_nonneg(kids[0]) and is_nonneg(kids[1])
    if op in ("div", "pdiv"):
        return is_nonneg(kids[0])
    return False


def _fold(op: str, values: list[float]) -> float | None:
    with torch.no_grad():
        out = OPS[op].fn(*(torch.tensor(v, dtype=torch.float64) for v in values))
    v = float(out)
    return v if math.isfinite(v) else None


def _simplify_node(t: Node) -> Node:
    """One local rewrite of ``t`` whose children are already simplified."""
    op, kids = t.op, t.children
    if t.is_leaf:
        return t
    if all(c.op == "const" for c in kids):
        v = _fold(op, [c.value for c in kids])
        if v is not None:
            return const(v)
    if OPS[op].arity == 1:
        (a,) = kids
        inner = a.op
        if op == "id":
            return a
        if op == "neg" and inner == "neg":
            return a.children[0]
        if op == "abs":
            if inner in ("neg", "abs"):
                return _simplify_node(Node("abs", (a.children[0],)))
            if is_nonneg(a):
                return a
        if op in ("sqr", "sqrt") and inner in ("neg", "abs"):  # both read |x|
            return _simplify_node(Node(op, (a.children[0],)))
        if (op, inner) in (("sqrt", "sqr"), ("sqr", "sqrt"), ("exp", "log")):
            # sqrt(x^2) = |x|, sqrt(|x|)^2 = |x|, exp(log(|x| + eps)) = |x| (+ eps)
            return _simplify_node(Node("abs", (a.children[0],)))
        if op == "log" and inner == "exp":  # exact unless the clamp is hit
            return a.children[0]
        if op == "log" and inner in ("neg", "abs"):
            return _simplify_node(Node("log", (a.children[0],)))
        if op in ("mms", "zscore") and inner in ("mms", "zscore"):
            # both are positive affine maps of the whole tensor: the outer one decides
            return _simplify_node(Node(op, (a.children[0],)))
        if op in ("mms", "zscore"):  # invariant to positive scaling and to shifts
            if inner == "div" or (
                inner == "mul" and a.children[0].op == "const" and a.children[0].value > 0
            ):
                return _simplify_node(Node(op, (a.children[0 if inner == "div" else 1],)))
            if inner == "add" and a.children[0].op == "const":
                return _simplify_node(Node(op, (a.children[1],)))
        if op == "tanh" and inner == "neg":  # odd function
            return Node("neg", (Node("tanh", (a.children[0],)),))
        return t
    a, b = kids
    if op in ("add", "mul"):
        if op == "mul" and a.op == "neg" and b.op == "neg":
            return _simplify_node(Node("mul", (a.children[0], b.children[0])))
        if op == "mul" and (a == const(1.0) or b == const(1.0)):
            return b if a == const(1.0) else a
        if op == "add" and (a == const(0.0) or b == const(0.0)):
            return b if a == const(0.0) else a
        if op == "add" and a == b:
            return Node("mul", (const(2.0), a))
        return _sorted_chain(op, _chain(op, t))
    if op == "sub":
        if a == b:
            return const(0.0)
        if b.op == "neg":
            return _simplify_node(Node("add", (a, b.children[0])))
    if op in ("div", "pdiv") and b.op in ("neg", "abs"):  # both read |b|
        return _simplify_node(Node(op, (a, b.children[0])))
    return t


def _chain(op: str, t: Node) -> list[Node]:
    """Operands of a nested ``add`` (or ``mul``) chain: ``add(a, add(b, c))`` -> a, b, c."""
    if t.op != op:
        return [t]
    return [x for c in t.children for x in _chain(op, c)]


def _build(op: str, items: list[Node]) -> Node:
    return items[0] if len(items) == 1 else Node(op, (items[0], _build(op, items[1:])))


def _sorted_chain(op: str, items: list[Node]) -> Node:
    """One form of an associative, commutative chain: constants folded into one leading
    constant, the other operands sorted by their string, nested to the right."""
    unit = 0.0 if op == "add" else 1.0
    values = [c.value for c in items if c.op == "const"]
    rest = sorted((c for c in items if c.op != "const"), key=to_string)
    folded = math.fsum(values) if op == "add" else math.prod(values)
    if op == "mul" and values and folded == 0:
        return const(0.0)
    head = [const(folded)] if values and (folded != unit or not rest) else []
    return _build(op, head + rest)


def simplify(tree: Node) -> Node:
    """Algebraic simplification (bottom-up, to a fixed point); same scores up to ``EPS``."""
    while True:
        kids = tuple(simplify(c) for c in tree.children)
        new = _simplify_node(Node(tree.op, kids, tree.value) if kids else tree)
        if new == tree:
            return new
        tree = new


def _strip_root(tree: Node) -> Node:
    """Remove strictly increasing transforms at the root (the per-row ranking is unchanged)."""
    while not tree.is_leaf:
        op, kids = tree.op, tree.children
        spec = OPS[op]
        monotone = spec.increasing or (spec.increasing_nonneg and is_nonneg(kids[0]))
        if spec.arity == 1 and monotone:
            tree = kids[0]
        elif op == "div":  # a / ||b||_F: a positive scale
            tree = kids[0]
        elif op == "add" and kids[0].op == "const":
            tree = kids[1]
        elif op == "add" and (new := _unit_scaled_sum(tree)) != tree:
            tree = new
        elif op == "mul":
            # positive constants and div(a, b) = a / ||b||_F only scale the product
            items = [
                c.children[0] if c.op == "div" else c
                for c in _chain("mul", tree)
                if not (c.op == "const" and c.value > 0)
            ]
            new = _build("mul", items) if items else tree
            if new == tree:
                break
            tree = new
        else:
            break
    return tree


def _split_scale(term: Node) -> tuple[float, Node]:
    """``term`` as ``(c, rest)``, ``term = c * rest`` (``c = 1`` without a leading constant)."""
    if term.op == "mul" and term.children[0].op == "const":
        return term.children[0].value, term.children[1]
    return 1.0, term


def _unit_scaled_sum(tree: Node) -> Node:
    """A sum divided by a positive common factor so that its last term (by the string of its
    constant-free part) has scale 1: ``2·a + 96·b`` and ``a + 48·b`` rank alike."""
    parts = [_split_scale(t) for t in _chain("add", tree)]
    ref, _ = max(parts, key=lambda p: to_string(p[1]))
    if ref <= 0 or ref == 1.0:
        return tree
    terms = [rest if c == ref else Node("mul", (const(c / ref), rest)) for c, rest in parts]
    return simplify(_build("add", terms))


def canonical(tree: Node, *, ranking: bool = True) -> Node:
    """The canonical form of ``tree`` (see the module docstring).

    Args:
        ranking: also strip strictly increasing transforms at the root; the result is then
            equivalent only for per-row ranking (the mask), not for the score values.
    """
    tree = simplify(tree)
    while ranking:
        stripped = simplify(_strip_root(tree))
        if stripped == tree:
            break
        tree = stripped
    return tree


# -- known metrics -------------------------------------------------------------------------------

GBLM_ALPHA = 100.0

KNOWN_METRICS: dict[str, str] = {
    # |W|
    "magnitude": "W",
    # Wanda (Sun et al. 2023, Eq. 1): |W| * ||X||_2
    "wanda": "mul(W, X)",
    # Pruner-Zero's published metric (Dong et al. 2024): |W|^2 * mms(|G|)
    "pruner-zero": "mul(sqr(W), mms(G))",
    # GBLM-Pruner (Das et al. 2023): |W| * ||X||_2 + alpha * |W| * ||G||_2, alpha = 100
    "gblm": f"add(mul(W, X), mul({GBLM_ALPHA:g}, mul(W, G)))",
}


def get_pruner(name: str) -> Pruner:
    """A built-in pruner by name (``magnitude``, ``wanda``, ``sparsegpt``), or a symbolic
    metric saved as JSON (a name ending in ``.json``, e.g. a metric search's
    ``best_metric.json``; see :mod:`evosearch.symbolic`)."""
    if name.endswith(".json"):
        return load_metric(name)
    try:
        return PRUNERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown pruner {name!r}; choose from {sorted(PRUNERS)} or a saved metric .json"
        ) from None
