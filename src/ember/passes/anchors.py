"""Anchor rewrites: fold BatchNormalization and constant scales into Conv/Gemm weights, turn
MatMul(+Add) into one GEMM with bias, and mark epilogues (bias, activation, residual add).

Weight folding is done in float64 and rounded once, so a folded model differs from the original
only by the reassociation of one multiply per weight.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from ..ir.graph import Graph, Value
from ..ops.fused import CONV_ATTRS
from ..ops.registry import epilogue_ops
from .noops import same_type
from .rewrite import Editor, Match, P, PassContext, Rule, apply_rules

CONV_OPS = ("Conv", "ember.Conv")


def _const(v: Optional[Value]) -> Optional[np.ndarray]:
    return None if v is None or not v.is_const else np.asarray(v.data)


def _plain_epilogue(node) -> bool:
    """An anchor whose output is still the bare product (+bias): more can be folded after it."""
    return not node.attrs.get("activation") and (len(node.inputs) < 4 or node.inputs[3] is None)


def _channel_vector(c: np.ndarray, channels: int, axis_from_end: int) -> Optional[np.ndarray]:
    """A constant that varies only along one axis (counted from the end) as a vector of ``channels``."""
    if c.size == 1:
        return np.full(channels, c.reshape(()), dtype=np.float64)
    if c.ndim < axis_from_end or c.shape[c.ndim - axis_from_end] != channels or c.size != channels:
        return None
    return c.reshape(-1).astype(np.float64)


def _conv_out_axis(node) -> int:
    """Axis (from the end) of a conv output's channels: rank - 1."""
    return len(node.outputs[0].shape) - 1 if node.outputs[0].shape is not None else -1


def _scaled_conv(ed: Editor, node, scale: np.ndarray, shift: np.ndarray, name: str) -> Optional[Value]:
    w, b = _const(node.inputs[1]), _const(node.inputs[2]) if len(node.inputs) > 2 else None
    if w is None or (len(node.inputs) > 2 and node.inputs[2] is not None and b is None):
        return None
    cout = w.shape[0] if node.op in CONV_OPS else w.shape[1] * node.attrs.get("group", 1)
    if node.op == "ConvTranspose" and node.attrs.get("group", 1) != 1:
        return None
    if scale.size != cout:
        return None
    if node.op in CONV_OPS:
        w2 = w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))
    else:  # ConvTranspose weight: (Cin, Cout, k...)
        w2 = w.astype(np.float64) * scale.reshape(1, -1, *([1] * (w.ndim - 2)))
    b0 = np.zeros(cout) if b is None else b.astype(np.float64)
    b2 = b0 * scale + shift
    inputs = [node.inputs[0], ed.const(w2.astype(w.dtype), name + "/weight"),
              ed.const(b2.astype(w.dtype), name + "/bias")] + list(node.inputs[3:])
    return ed.out(node.op, inputs, dict(node.attrs), name=name, like=node.outputs[0])


def _scaled_gemm(ed: Editor, node, scale: np.ndarray, shift: np.ndarray, name: str) -> Optional[Value]:
    """ember.Gemm with constant 2-D weights: scale its output columns, then add ``shift``."""
    w = _const(node.inputs[1])
    bias_in = node.inputs[2] if len(node.inputs) > 2 else None
    b = _const(bias_in)
    if w is None or w.ndim != 2 or (bias_in is not None and b is None) or node.attrs.get("alpha", 1.0) != 1.0:
        return None
    trans = node.attrs.get("trans_b", 0)
    n = w.shape[0] if trans else w.shape[1]
    if scale.size != n:
        return None
    w2 = w.astype(np.float64) * (scale.reshape(-1, 1) if trans else scale.reshape(1, -1))
    b0 = np.zeros(n) if b is None else np.broadcast_to(b.astype(np.float64), (n,))
    inputs = [node.inputs[0], ed.const(w2.astype(w.dtype), name + "/weight"),
              ed.const((b0 * scale + shift).astype(w.dtype), name + "/bias")] + list(node.inputs[3:])
    return ed.out("ember.Gemm", inputs, dict(node.attrs), name=name, like=node.outputs[0])


# -- BatchNormalization ------------------------------------------------------------------------------
def _fold_batchnorm(ed: Editor, m: Match) -> Optional[Value]:
    bn, anchor = m.node("y"), m.node("a")
    if bn.attrs.get("training_mode", 0) or len(bn.outputs) > 1:
        return None
    consts = [_const(v) for v in bn.inputs[1:5]]
    if any(c is None for c in consts):
        return None
    gamma, beta, mean, var = (c.astype(np.float64).reshape(-1) for c in consts)
    scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    shift = beta - mean * scale
    if anchor.op == "ember.Gemm":
        if not _plain_epilogue(anchor):
            return None
        return _scaled_gemm(ed, anchor, scale, shift, m["y"].name)
    if anchor.op == "ember.Conv" and not _plain_epilogue(anchor):
        return None
    return _scaled_conv(ed, anchor, scale, shift, m["y"].name)


# -- constant Mul / Add after an anchor --------------------------------------------------------------
def _fold_mul(ed: Editor, m: Match) -> Optional[Value]:
    anchor, c = m.node("a"), _const(m["c"])
    if not _plain_epilogue(anchor) or c is None or not same_type(m["a"], m["y"]) or c.dtype.kind != "f":
        return None
    if anchor.op == "ember.Gemm":
        w = _const(anchor.inputs[1])
        if w is None or w.ndim != 2:
            return None
        n = w.shape[0] if anchor.attrs.get("trans_b") else w.shape[1]
        vec = _channel_vector(c, n, 1)
        return None if vec is None else _scaled_gemm(ed, anchor, vec, np.zeros(n), m["y"].name)
    w = _const(anchor.inputs[1])
    if w is None or m["a"].shape is None:
        return None
    cout = w.shape[0] if anchor.op in CONV_OPS else w.shape[1] * anchor.attrs.get("group", 1)
    vec = _channel_vector(c, cout, len(m["a"].shape) - 1)
    return None if vec is None else _scaled_conv(ed, anchor, vec, np.zeros(cout), m["y"].name)


def _fold_add(ed: Editor, m: Match) -> Optional[Value]:
    anchor, c = m.node("a"), _const(m["c"])
    if not _plain_epilogue(anchor) or c is None or not same_type(m["a"], m["y"]) or c.dtype.kind != "f":
        return None
    if anchor.op == "ember.Gemm":
        n = m["a"].shape[-1] if m["a"].shape else None
        if not isinstance(n, int):
            return None
        vec = _channel_vector(c, n, 1)
        if vec is None:
            return None
        bias = _const(anchor.inputs[2]) if len(anchor.inputs) > 2 and anchor.inputs[2] is not None else None
        if len(anchor.inputs) > 2 and anchor.inputs[2] is not None and bias is None:
            return None
        new_bias = vec + (0 if bias is None else np.broadcast_to(bias.astype(np.float64), (n,)))
        inputs = [anchor.inputs[0], anchor.inputs[1], ed.const(new_bias.astype(c.dtype), m["y"].name + "/bias")]
        return ed.out("ember.Gemm", inputs, dict(anchor.attrs), name=m["y"].name, like=m["y"])
    w = _const(anchor.inputs[1])
    if w is None or m["a"].shape is None:
        return None
    cout = w.shape[0] if anchor.op in CONV_OPS else w.shape[1] * anchor.attrs.get("group", 1)
    vec = _channel_vector(c, cout, len(m["a"].shape) - 1)
    return None if vec is None else _scaled_conv(ed, anchor, np.ones(cout), vec, m["y"].name)


# -- GEMM canonical form -------------------------------------------------------------------------
def _matmul_to_gemm(ed: Editor, m: Match) -> Optional[Value]:
    """MatMul with a constant 2-D weight (a linear layer) becomes ember.Gemm."""
    w, a = m["w"], m["x"]
    if w.data.ndim != 2 or w.data.dtype.kind != "f" or a.shape is None or len(a.shape) < 2:
        return None
    return ed.out("ember.Gemm", [a, w], {}, name=m["y"].name, like=m["y"])


def _onnx_gemm_to_gemm(ed: Editor, m: Match) -> Optional[Value]:
    node = m.node("y")
    if node.attrs.get("transA", 0):
        return None
    c = node.inputs[2] if len(node.inputs) > 2 else None
    beta = node.attrs.get("beta", 1.0)
    inputs = [node.inputs[0], node.inputs[1]]
    if c is not None:
        if beta != 1.0:
            if not c.is_const:
                return None
            c = ed.const((c.data.astype(np.float64) * beta).astype(c.data.dtype), m["y"].name + "/bias")
        inputs.append(c)
    attrs = {"trans_b": int(node.attrs.get("transB", 0)), "alpha": float(node.attrs.get("alpha", 1.0))}
    if attrs["alpha"] == 1.0:
        del attrs["alpha"]
    if not attrs["trans_b"]:
        del attrs["trans_b"]
    return ed.out("ember.Gemm", inputs, attrs, name=m["y"].name, like=m["y"])


def _unflatten_gemm(ed: Editor, m: Match) -> Optional[Value]:
    """Reshape(Gemm(Reshape(x, [-1, K]), W), [..., N]) -> one ember.Gemm over x's batch dims: exporters
    flatten a linear layer's input to 2-D for ONNX Gemm, which hides its epilogue behind a Reshape."""
    xv, yv, gemm = m["x"], m["y"], m.node("g")
    if xv.shape is None or yv.shape is None or m["g"].shape is None or len(xv.shape) < 2 or len(m["g"].shape) != 2:
        return None
    if len(gemm.inputs) > 3 and gemm.inputs[3] is not None:
        return None
    if xv.shape[-1] != gemm.inputs[0].shape[-1] or tuple(yv.shape) != tuple(xv.shape[:-1]) + (m["g"].shape[-1],):
        return None
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    if bias is not None and (bias.shape is None or len(bias.shape) > 1 and any(d != 1 for d in bias.shape[:-1])):
        return None
    return ed.out("ember.Gemm", [xv] + list(gemm.inputs[1:]), dict(gemm.attrs), name=yv.name, like=yv)


def _conv_to_fused(node, ed: Editor) -> tuple[list, dict]:
    ins = list(node.inputs[:3]) + [None] * (3 - min(3, len(node.inputs)))
    if node.op == "ember.Conv" and len(node.inputs) > 3 and node.inputs[3] is not None:
        ins.append(node.inputs[3])
    attrs = {k: v for k, v in node.attrs.items()
             if k in CONV_ATTRS or k in ("activation", "act_keys", "act_values", "act_after_residual")}
    return ins, attrs


def _fuse_activation(ed: Editor, m: Match) -> Optional[Value]:
    anchor, act = m.node("a"), m.node("y")
    after_residual = len(anchor.inputs) > 3 and anchor.inputs[3] is not None
    if anchor.attrs.get("activation"):
        return None
    keys, values = [], []
    if act.op == "Clip":
        for i, k in ((1, "min"), (2, "max")):
            v = act.inputs[i] if len(act.inputs) > i else None
            if v is None:
                continue
            c = _const(v)
            if c is None or c.size != 1:
                return None
            keys.append(k)
            values.append(float(c.reshape(())))
    else:
        if len([v for v in act.inputs if v is not None]) != 1:
            return None
        for k, v in act.attrs.items():
            keys.append(k)
            values.append(v)
    if anchor.op in ("ember.Gemm",):
        ins, attrs = list(anchor.inputs), dict(anchor.attrs)
    else:
        ins, attrs = _conv_to_fused(anchor, ed)
    attrs.update(activation=act.op, act_keys=keys, act_values=values)
    if after_residual:
        attrs["act_after_residual"] = 1
    op = "ember.Gemm" if anchor.op == "ember.Gemm" else "ember.Conv"
    return ed.out(op, ins, attrs, name=m["y"].name, like=m["y"])


def _fuse_residual(ed: Editor, m: Match) -> Optional[Value]:
    anchor, r = m.node("a"), m["r"]
    if r.is_const or not same_type(m["a"], m["y"]):
        return None
    if len(anchor.inputs) > 3 and anchor.inputs[3] is not None:
        return None
    if r.shape is None or tuple(r.shape) != tuple(m["y"].shape) or r.dtype != m["y"].dtype:
        return None
    if anchor.op == "ember.Gemm":
        ins, attrs = list(anchor.inputs), dict(anchor.attrs)
    else:
        ins, attrs = _conv_to_fused(anchor, ed)
    ins = ins + [None] * (3 - len(ins)) + [r]
    op = "ember.Gemm" if anchor.op == "ember.Gemm" else "ember.Conv"
    return ed.out(op, ins, attrs, name=m["y"].name, like=m["y"])


a_conv = P(("Conv", "ConvTranspose", "ember.Conv", "ember.Gemm"), open_inputs=True, name="a")
a_fused = P(("Conv", "ember.Conv", "ember.Gemm"), open_inputs=True, name="a")
FOLD_RULES = [
    Rule("fold_batchnorm_into_anchor", P("BatchNormalization", a_conv, P.any(), P.any(), P.any(), P.any(), name="y"),
         _fold_batchnorm),
    Rule("fold_mul_into_anchor", P("Mul", a_conv, P.const("c"), name="y"), _fold_mul),
    Rule("fold_add_into_anchor", P("Add", a_conv, P.const("c"), name="y"), _fold_add),
]
GEMM_RULES = [
    Rule("matmul_to_gemm", P("MatMul", P.any("x"), P.const("w"), name="y"), _matmul_to_gemm),
    Rule("onnx_gemm_to_gemm", P("Gemm", P.any(), P.any(), name="y", open_inputs=True), _onnx_gemm_to_gemm),
    Rule("unflatten_gemm", P("Reshape", P("ember.Gemm", P("Reshape", P.any("x"), P.any()), name="g", open_inputs=True),
                             P.any(), name="y"), _unflatten_gemm),
]
@functools.cache
def epilogue_rules() -> list[Rule]:
    """The activations an epilogue takes are those whose op says how (OpDef.epilogue)."""
    return [
        Rule("fuse_activation_into_anchor", P(epilogue_ops(), a_fused, name="y", open_inputs=True),
             _fuse_activation),
        Rule("fuse_residual_into_anchor", P("Add", a_fused, P.any("r"), name="y"), _fuse_residual),
    ]


def fold_into_anchors(graph: Graph, ctx: PassContext) -> bool:
    """BatchNormalization and constant per-channel Mul/Add folded into Conv/ConvTranspose/Gemm weights."""
    return apply_rules(graph, GEMM_RULES + FOLD_RULES, ctx.log)


def fuse_epilogues(graph: Graph, ctx: PassContext) -> bool:
    """Activation and residual add after a GEMM/Conv become that anchor's epilogue."""
    return apply_rules(graph, epilogue_rules(), ctx.log)
