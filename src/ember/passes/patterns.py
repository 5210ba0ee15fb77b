"""Pattern recognition: decomposed norms, activations and softmax become single IR ops.

The forms matched are the ones exporters emit (torch.onnx TorchScript and dynamo, tf2onnx):
LayerNorm as mean/sub/pow/mean/add/sqrt/div, RMSNorm as pow/mean/add/sqrt/reciprocal/mul, GELU in
its erf and tanh forms with the 0.5 and x factors in any association, SiLU as x*sigmoid(x),
HardSigmoid/HardSwish as relu6(x+3)/6 forms, softmax as exp(x-max)/sum. A few canonical
rewrites first (1/x -> Reciprocal, x**0.5 -> Sqrt) shrink the number of forms to match.
Affine Mul/Add after a recognized norm fold into its scale and bias.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ops import known_ops
from .noops import same_type
from .rewrite import Editor, Match, P, PassContext, Rule, apply_rules


def _scalar(v: Optional[Value]) -> Optional[float]:
    if v is None or not v.is_const or v.data.size != 1 or v.data.dtype.kind not in "fiu":
        return None
    return float(np.asarray(v.data).reshape(()))


def is_scalar(value: float, rtol: float = 1e-3):
    return lambda v, m: (s := _scalar(v)) is not None and abs(s - value) <= rtol * max(1.0, abs(value))


def _reduce_axes(node: Node) -> Optional[list[int]]:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        if not node.inputs[1].is_const:
            return None
        axes = [int(a) for a in np.asarray(node.inputs[1].data).reshape(-1)]
    else:
        axes = node.attrs.get("axes")
        if axes is None:
            return None
    r = len(x.shape)
    return sorted(a + r if a < 0 else a for a in axes)


def reduces_last_axis(v: Value, m: Match) -> bool:
    node = v.producer
    if node is None or node.attrs.get("keepdims", 1) != 1:
        return False
    axes = _reduce_axes(node)
    return axes is not None and axes == [len(node.inputs[0].shape) - 1]


def _softmax_axis_last(v: Value, m: Match) -> bool:
    node = v.producer
    x = node.inputs[0] if node is not None else None
    if x is None or x.shape is None:
        return False
    ax = node.attrs.get("axis", -1)
    return ax in (-1, len(x.shape) - 1)


def _has(op: str) -> bool:
    return op in known_ops()


# -- canonical forms ---------------------------------------------------------------------------------
def _to_reciprocal(ed: Editor, m: Match) -> Optional[Value]:
    return ed.out("Reciprocal", [m["x"]], name=m["y"].name, like=m["y"]) if same_type(m["x"], m["y"]) else None


def _to_sqrt(ed: Editor, m: Match) -> Optional[Value]:
    return ed.out("Sqrt", [m["x"]], name=m["y"].name, like=m["y"]) if same_type(m["x"], m["y"]) else None


# -- norms --------------------------------------------------------------------------------------------
x = P.any("x")
square = lambda v: P.one_of(P("Pow", v, P.const(where=is_scalar(2.0))), P("Mul", v, v))  # noqa: E731
mean_last = lambda v, name=None: P("ReduceMean", v, name=name, where=reduces_last_axis, open_inputs=True)  # noqa: E731
rstd_of = lambda var: P("Sqrt", P("Add", var, P.const("eps")), name="std")  # noqa: E731


def _norm_node(ed: Editor, m: Match, op: str) -> Optional[Value]:
    xv = m["x"]
    eps = _scalar(m["eps"])
    if not _has(op) or eps is None or xv.shape is None or not isinstance(xv.shape[-1], int) \
            or xv.dtype is None or not xv.dtype.is_float:
        return None
    from ..ir.dtypes import to_numpy

    ones = ed.const(np.ones(xv.shape[-1], dtype=to_numpy(xv.dtype)), m["y"].name + "/scale")
    ins = [xv, ones]
    if op == "LayerNormalization":
        ins.append(ed.const(np.zeros(xv.shape[-1], dtype=to_numpy(xv.dtype)), m["y"].name + "/bias"))
    out = ed.out(op, ins, {"axis": -1, "epsilon": eps}, name=m["y"].name, like=m["y"])
    return out if same_type(out, m["y"]) else None


def _layer_norm(ed: Editor, m: Match) -> Optional[Value]:
    return _norm_node(ed, m, "LayerNormalization")


def _rms_norm(ed: Editor, m: Match) -> Optional[Value]:
    return _norm_node(ed, m, "RMSNormalization")


def _norm_affine(ed: Editor, m: Match) -> Optional[Value]:
    """Mul by gamma / Add of beta after a norm fold into its scale / bias."""
    norm, c = m.node("n"), m["c"]
    if not same_type(m["n"], m["y"]) or c.data.dtype.kind != "f" or m["n"].shape is None:
        return None
    h = m["n"].shape[-1]
    if c.data.size not in (1, h) or (c.data.size == h and c.data.shape[-1] != h):
        return None
    vec = np.broadcast_to(c.data.reshape(-1), (h,)).astype(np.float64)
    scale = norm.inputs[1].data.astype(np.float64) if norm.inputs[1].is_const else None
    if scale is None:
        return None
    bias_v = norm.inputs[2] if len(norm.inputs) > 2 else None
    bias = None if bias_v is None else (bias_v.data.astype(np.float64) if bias_v.is_const else False)
    if bias is False:
        return None
    dt = c.data.dtype
    ins = [norm.inputs[0]]
    if m.node("y").op == "Mul":
        ins.append(ed.const((scale * vec).astype(dt), m["y"].name + "/scale"))
        if bias is not None:
            ins.append(ed.const((bias * vec).astype(dt), m["y"].name + "/bias"))
    else:
        if norm.op != "LayerNormalization":
            return None
        ins.append(norm.inputs[1])
        ins.append(ed.const(((0 if bias is None else bias) + vec).astype(dt), m["y"].name + "/bias"))
    return ed.out(norm.op, ins, dict(norm.attrs), name=m["y"].name, like=m["y"])


# -- activations -----------------------------------------------------------------------------------
def mul_factors(ed: Editor, v: Value, root: Node, depth: int = 4) -> tuple[list[Value], list[Node]]:
    """The factors of a tree of Muls (inner Muls must be used only inside the tree)."""
    node = ed.producer(v)
    if node is None or node.op != "Mul" or depth == 0 or (node is not root and not ed.single_use(v)):
        return [v], []
    factors, nodes = [], [node]
    for inp in node.inputs:
        f, n = mul_factors(ed, inp, root, depth - 1)
        factors += f
        nodes += n
    return factors, nodes


def _split_factors(factors: list[Value]) -> tuple[float, list[Value]]:
    c, rest = 1.0, []
    for f in factors:
        s = _scalar(f)
        if s is not None:
            c *= s
        else:
            rest.append(f)
    return c, rest


def _matches(ed: Editor, p: P, v: Value) -> Optional[Match]:
    return next(iter(p.match(v, ed.match())), None)


ERF_ARG = P.one_of(P("Div", x, P.const(where=is_scalar(2 ** 0.5))), P("Mul", x, P.const(where=is_scalar(2 ** -0.5))))
ERF_TERM = P("Add", P("Erf", ERF_ARG), P.const(where=is_scalar(1.0)))
TANH_TERM = P("Add", P("Tanh", P("Mul", P.any("inner"), P.const(where=is_scalar((2 / np.pi) ** 0.5)))),
              P.const(where=is_scalar(1.0)))


def _gelu_cubic(ed: Editor, inner: Value, xv: Value, root: Node) -> bool:
    """inner == x + 0.044715 * x**3 (the cube as Pow(x, 3) or x*x*x)."""
    node = ed.producer(inner)
    if node is None or node.op != "Add" or xv not in node.inputs:
        return False
    other = node.inputs[1] if node.inputs[0] is xv else node.inputs[0]
    factors, _ = mul_factors(ed, other, ed.producer(other), 4) if ed.producer(other) is not None else ([other], [])
    c, rest = _split_factors(factors)
    p = ed.producer(rest[0]) if len(rest) == 1 else None
    if p is not None and p.op == "Pow":
        if p.inputs[0] is xv and _scalar(p.inputs[1]) == 3.0:
            rest = [xv, xv, xv]
    return abs(c - 0.044715) < 1e-5 and len(rest) == 3 and all(r is xv for r in rest)


def _gelu(ed: Editor, m: Match) -> Optional[Value]:
    root = m.node("y")
    factors, nodes = mul_factors(ed, m["y"], root)
    c, rest = _split_factors(factors)
    if abs(c - 0.5) > 1e-4 or len(rest) != 2 or not _has("Gelu"):
        return None
    for xv, term in ((rest[0], rest[1]), (rest[1], rest[0])):
        mt = _matches(ed, ERF_TERM, term)
        approx = "none"
        if mt is None or mt["x"] is not xv:
            mt = _matches(ed, TANH_TERM, term)
            if mt is None or not _gelu_cubic(ed, mt["inner"], xv, root):
                continue
            approx = "tanh"
        if not same_type(xv, m["y"]):
            return None
        attrs = {} if approx == "none" else {"approximate": "tanh"}
        return ed.out("Gelu", [xv], attrs, name=m["y"].name, like=m["y"])
    return None


def _silu(ed: Editor, m: Match) -> Optional[Value]:
    if not _has("Swish") or not same_type(m["x"], m["y"]):
        return None
    return ed.out("Swish", [m["x"]], {}, name=m["y"].name, like=m["y"])


def _silu_alpha(ed: Editor, m: Match) -> Optional[Value]:
    alpha = _scalar(m["a"])
    if not _has("Swish") or alpha is None or not same_type(m["x"], m["y"]):
        return None
    return ed.out("Swish", [m["x"]], {"alpha": alpha}, name=m["y"].name, like=m["y"])


relu6_plus3 = P("Clip", P("Add", x, P.const(where=is_scalar(3.0))), P.const(where=is_scalar(0.0)),
                P.const(where=is_scalar(6.0)))
div6 = lambda v, name: P.one_of(P("Div", v, P.const(where=is_scalar(6.0))),  # noqa: E731
                                P("Mul", v, P.const(where=is_scalar(1 / 6))), name=name)


def _hard_sigmoid(ed: Editor, m: Match) -> Optional[Value]:
    if not same_type(m["x"], m["y"]):
        return None
    return ed.out("HardSigmoid", [m["x"]], {"alpha": 1 / 6, "beta": 0.5}, name=m["y"].name, like=m["y"])


def _hard_swish(ed: Editor, m: Match) -> Optional[Value]:
    hs = m.node("h") if "h" in m else None
    if hs is not None and (abs(hs.attrs.get("alpha", 0.2) - 1 / 6) > 1e-6 or abs(hs.attrs.get("beta", 0.5) - 0.5) > 1e-6):
        return None
    if not same_type(m["x"], m["y"]):
        return None
    return ed.out("HardSwish", [m["x"]], {}, name=m["y"].name, like=m["y"])


def _softmax(ed: Editor, m: Match) -> Optional[Value]:
    if not same_type(m["x"], m["y"]):
        return None
    return ed.out("Softmax", [m["x"]], {"axis": -1}, name=m["y"].name, like=m["y"])


d = P("Sub", x, mean_last(x), name="d")
exp_shifted = P("Exp", P("Sub", x, P("ReduceMax", x, where=reduces_last_axis, open_inputs=True)), name="e")
exp_plain = P("Exp", x, name="e")
CANONICAL_RULES = [
    Rule("div_one_to_reciprocal", P("Div", P.const(where=is_scalar(1.0)), x, name="y"), _to_reciprocal),
    Rule("pow_half_to_sqrt", P("Pow", x, P.const(where=is_scalar(0.5)), name="y"), _to_sqrt),
]
PATTERN_RULES = [
    Rule("recognize_layer_norm",
         P.one_of(P("Div", d, rstd_of(mean_last(square(P.any("d"))))),
                  P("Mul", d, P("Reciprocal", rstd_of(mean_last(square(P.any("d")))))), name="y"), _layer_norm),
    Rule("recognize_rms_norm",
         P.one_of(P("Div", x, rstd_of(mean_last(square(x)))),
                  P("Mul", x, P("Reciprocal", rstd_of(mean_last(square(x))))), name="y"), _rms_norm),
    Rule("fold_norm_affine", P(("Mul", "Add"), P(("LayerNormalization", "RMSNormalization"), name="n",
                                                open_inputs=True), P.const("c"), name="y"), _norm_affine),
    Rule("recognize_gelu", P("Mul", P.any(), P.any(), name="y"), _gelu, exclusive=False),
    Rule("recognize_silu", P("Mul", x, P("Sigmoid", x), name="y"), _silu),
    Rule("recognize_swish", P("Mul", x, P("Sigmoid", P("Mul", x, P.const("a"))), name="y"), _silu_alpha),
    Rule("recognize_hard_sigmoid", div6(relu6_plus3, "y"), _hard_sigmoid),
    Rule("recognize_hard_swish", P("Mul", x, P("HardSigmoid", x, name="h"), name="y"), _hard_swish),
    Rule("recognize_hard_swish", div6(P("Mul", x, relu6_plus3), "y"), _hard_swish),
    Rule("recognize_softmax", P("Div", exp_shifted, P("ReduceSum", P.any("e"), where=reduces_last_axis,
                                                     open_inputs=True), name="y"), _softmax),
    Rule("recognize_softmax", P("Div", exp_plain, P("ReduceSum", P.any("e"), where=reduces_last_axis,
                                                   open_inputs=True), name="y"), _softmax),
]


def recognize_patterns(graph: Graph, ctx: PassContext) -> bool:
    """Decomposed LayerNorm, RMSNorm, GELU, SiLU, HardSigmoid/HardSwish and softmax -> single ops."""
    a = apply_rules(graph, CANONICAL_RULES, ctx.log)
    b = apply_rules(graph, PATTERN_RULES, ctx.log)
    return a or b
