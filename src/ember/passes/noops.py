"""No-op removal: nodes that return their input unchanged, and chains of layout ops that collapse.

Each rule checks that the value it forwards has the node's exact dtype and shape, so removing
a node never changes what its users see (a Mul by a ones tensor that broadcasts is kept).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..ir.dtypes import DType
from ..ir.graph import Graph, Value
from ..ir.shapes import is_static
from .rewrite import Editor, Match, P, PassContext, Rule, apply_rules


def same_type(a: Optional[Value], b: Optional[Value]) -> bool:
    return (a is not None and b is not None and a.dtype is not None and a.dtype == b.dtype
            and a.shape is not None and b.shape is not None and tuple(a.shape) == tuple(b.shape))


def const_all(v: Value, x: float) -> bool:
    return v.is_const and v.data.size > 0 and bool(np.all(v.data == x))


def _forward(name: str = "x"):
    def build(ed: Editor, m: Match) -> Optional[Value]:
        return m[name] if same_type(m[name], m["y"]) else None
    return build


def _dropout(ed: Editor, m: Match) -> Optional[Value]:
    node = m.node("y")
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None and not (training.is_const and not bool(np.asarray(training.data).any())):
        return None
    if len(node.outputs) > 1 and (ed.users(node.outputs[1]) or ed.is_output(node.outputs[1])):
        return None
    return m["x"] if same_type(m["x"], m["y"]) else None


def _cast_same(ed: Editor, m: Match) -> Optional[Value]:
    from ..ops.quant import dtype_of_attr  # the Cast op's reading of its 'to' attribute

    try:
        to = dtype_of_attr(m.node("y").attrs["to"])
    except Exception:
        return None
    if m["x"].dtype is None or DType.parse(str(to)) != m["x"].dtype:
        return None
    return m["x"] if same_type(m["x"], m["y"]) else None


def _transpose_identity(ed: Editor, m: Match) -> Optional[Value]:
    perm = m.node("y").attrs.get("perm")
    if perm is None or list(perm) != list(range(len(perm))):
        return None
    return m["x"] if same_type(m["x"], m["y"]) else None


def _transpose_pair(ed: Editor, m: Match) -> Optional[Value]:
    p1, p2 = m.node("t").attrs.get("perm"), m.node("y").attrs.get("perm")
    if p1 is None or p2 is None:
        return None
    perm = [p1[i] for i in p2]
    if perm == list(range(len(perm))):
        return m["x"] if same_type(m["x"], m["y"]) else None
    return ed.out("Transpose", [m["x"]], {"perm": perm}, name=m["y"].name, like=m["y"])


def _reshape_pair(ed: Editor, m: Match) -> Optional[Value]:
    """Reshape(Reshape(x, a), b) -> Reshape(x, b) when b has no 0 (copy-the-input-dim) entry."""
    shape = m["s"]
    if shape.data is None or (np.asarray(shape.data) == 0).any() and not m.node("y").attrs.get("allowzero"):
        return None
    if same_type(m["x"], m["y"]):
        return m["x"]
    return ed.out("Reshape", [m["x"], shape], dict(m.node("y").attrs), name=m["y"].name, like=m["y"])


def _squeeze_unsqueeze(ed: Editor, m: Match) -> Optional[Value]:
    return m["x"] if same_type(m["x"], m["y"]) else None


def _pad_zero(ed: Editor, m: Match) -> Optional[Value]:
    return m["x"] if const_all(m["p"], 0) and same_type(m["x"], m["y"]) else None


def _slice_whole(ed: Editor, m: Match) -> Optional[Value]:
    node = m.node("y")
    if not all(v is None or v.is_const for v in node.inputs[1:]):
        return None
    x = m["x"]
    if not is_static(x.shape):
        return None
    starts, ends = node.inputs[1].data.reshape(-1), node.inputs[2].data.reshape(-1)
    axes = node.inputs[3].data.reshape(-1) if len(node.inputs) > 3 and node.inputs[3] is not None \
        else np.arange(len(starts))
    steps = node.inputs[4].data.reshape(-1) if len(node.inputs) > 4 and node.inputs[4] is not None \
        else np.ones(len(starts), dtype=np.int64)
    for s, e, a, st in zip(starts, ends, axes, steps):
        dim = x.shape[int(a)]
        lo = min(max(int(s) + dim if s < 0 else int(s), 0), dim)
        hi = min(max(int(e) + dim if e < 0 else int(e), 0), dim)
        if st != 1 or lo != 0 or hi != dim:
            return None
    return x if same_type(x, m["y"]) else None


def _binary_identity(value: float):
    def build(ed: Editor, m: Match) -> Optional[Value]:
        return m["x"] if const_all(m["c"], value) and same_type(m["x"], m["y"]) else None
    return build


def _one_input(ed: Editor, m: Match) -> Optional[Value]:
    node = m.node("y")
    if len(node.inputs) != 1:
        return None
    return m["x"] if same_type(m["x"], m["y"]) else None


def _flat_transpose(ed: Editor, m: Match) -> Optional[Value]:
    """Reshape(Transpose(Reshape(x, [-1, a, b]), [0, 2, 1]), [..., b, a]) is a transpose of x's last two dims:
    exporters flatten to 3-D to swap the last two axes of a 4-D tensor."""
    xv, mid, yv = m["x"], m["t"], m["y"]
    perm = m.node("t").attrs.get("perm")
    if xv.shape is None or mid.shape is None or yv.shape is None or perm is None or len(xv.shape) < 3:
        return None
    r = len(mid.shape)
    if list(perm) != list(range(r - 2)) + [r - 1, r - 2] or tuple(mid.shape[-2:]) != (xv.shape[-1], xv.shape[-2]):
        return None
    want = tuple(xv.shape[:-2]) + (xv.shape[-1], xv.shape[-2])
    if tuple(yv.shape) != want:
        return None
    n = len(xv.shape)
    return ed.out("Transpose", [xv], {"perm": list(range(n - 2)) + [n - 1, n - 2]}, name=yv.name, like=yv)


def _castlike_to_cast(ed: Editor, m: Match) -> Optional[Value]:
    """CastLike(x, like) only reads like's dtype, which is known here: a Cast (foldable when x is constant)."""
    from ..ir.dtypes import DTYPE_TO_ONNX

    dt = m["like"].dtype
    if dt is None or dt not in DTYPE_TO_ONNX:
        return None
    if m["x"].dtype == dt and same_type(m["x"], m["y"]):
        return m["x"]
    return ed.out("Cast", [m["x"]], {"to": DTYPE_TO_ONNX[dt]}, name=m["y"].name, like=m["y"])


x, y = P.any("x"), "y"
NOOP_RULES = [
    Rule("remove_identity", P("Identity", x, name=y), _forward()),
    Rule("remove_dropout", P("Dropout", x, name=y, open_inputs=True), _dropout),
    Rule("remove_cast_to_same_type", P("Cast", x, name=y), _cast_same),
    Rule("castlike_to_cast", P("CastLike", x, P.any("like"), name=y, open_inputs=True), _castlike_to_cast),
    Rule("remove_reshape_to_same_shape", P("Reshape", x, P.any(), name=y), _forward()),
    Rule("merge_reshapes", P("Reshape", P("Reshape", x, P.any()), P.const("s"), name=y), _reshape_pair),
    Rule("unflatten_transpose", P("Reshape", P("Transpose", P("Reshape", x, P.any()), name="t"), P.any(), name=y),
         _flat_transpose),
    Rule("remove_identity_transpose", P("Transpose", x, name=y), _transpose_identity),
    Rule("merge_transposes", P("Transpose", P("Transpose", x, name="t"), name=y), _transpose_pair),
    Rule("remove_expand_to_same_shape", P("Expand", x, P.any(), name=y), _forward()),
    Rule("remove_squeeze_of_unsqueeze", P("Squeeze", P("Unsqueeze", x, P.any("a")), P.any("a"), name=y),
         _squeeze_unsqueeze),
    Rule("remove_zero_pad", P("Pad", x, P.const("p"), name=y, open_inputs=True), _pad_zero),
    Rule("remove_whole_slice", P("Slice", x, P.any(), P.any(), name=y, open_inputs=True), _slice_whole),
    Rule("remove_mul_by_one", P("Mul", x, P.const("c"), name=y), _binary_identity(1)),
    Rule("remove_div_by_one", P("Div", x, P.const("c"), name=y), _binary_identity(1)),
    Rule("remove_add_zero", P("Add", x, P.const("c"), name=y), _binary_identity(0)),
    Rule("remove_sub_zero", P("Sub", x, P.const("c"), name=y), _binary_identity(0)),
    Rule("remove_single_concat", P(("Concat", "Sum", "Max", "Min", "Mean"), x, name=y), _one_input),
]


def remove_noops(graph: Graph, ctx: PassContext) -> bool:
    """Identity, inference-mode Dropout, same-type Cast, and layout ops that change nothing."""
    return apply_rules(graph, NOOP_RULES, ctx.log)
