"""Quantized models onto the quantized anchors: Q/DQ pairs, QOperator forms, requantization, epilogues.

A quantized ONNX model says where it is quantized in one of two ways, and a calibrated build says
it the first way too (passes/quantize.py inserts Q/DQ pairs):

- Q/DQ (QDQ format, TensorRT's explicit quantization): ``Conv(DQ(Q(x)), DQ(w_int8), bias)``, the
  output ``Q``-ed again before the next layer. The rules here fold the pair on the activation and
  the DQ on the weight into ``ember.QConv`` / ``ember.QGemm`` (per tensor on activations, per axis or
  per tensor on weights), a ``Q`` after an anchor into its epilogue (requantize: the next anchor then
  reads int8), and activations, bias and residual adds after an anchor into its epilogue;
- QOperator: ``QLinearConv``, ``QLinearMatMul``, and ``ConvInteger`` / ``MatMulInteger`` followed by
  their scale (``Mul(Cast(MatMulInteger(DynamicQuantizeLinear(x)..)), x_scale * w_scale)``, ONNX
  Runtime's dynamic quantization) fold into the same anchors.

Weights with zero points are centred at build time (``w - w_zp``) when that fits int8; uint8
activations keep their zero point (the kernels subtract it). What does not fit these forms keeps
the reference ops, which compute the model's exact numerics.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..ir.dtypes import DTYPE_TO_ONNX, DType
from ..ir.graph import Graph, Node, Value
from ..ops.fused import CONV_ATTRS
from ..ops.registry import epilogue_ops
from .noops import same_type
from .rewrite import Editor, Match, P, PassContext, Rule, apply_rules

QANCHORS = ("ember.QConv", "ember.QGemm")
INT_TYPES = (DType.INT8, DType.UINT8)
EPILOGUE_ATTRS = ("activation", "act_keys", "act_values", "act_after_residual")


def _const(v: Optional[Value]) -> Optional[np.ndarray]:
    return None if v is None or not v.is_const else np.asarray(v.data)


def _scalar(v: Optional[Value]) -> bool:
    return v is not None and v.shape is not None and all(d == 1 for d in v.shape)


def _same_const(a: Optional[Value], b: Optional[Value]) -> bool:
    if a is b:
        return True
    ca, cb = _const(a), _const(b)
    return ca is not None and cb is not None and ca.dtype == cb.dtype and np.array_equal(ca.reshape(-1),
                                                                                        cb.reshape(-1))


def _zero_point(zp: Optional[Value]) -> Optional[Value]:
    """A zero point the anchor needs: an int8 constant zero is none at all (the kernels then skip the
    correction); uint8's zero point stays (it sets the range, 0..255), as does any computed one."""
    c = _const(zp)
    if zp is not None and zp.dtype == DType.INT8 and c is not None and not np.any(c):
        return None
    return zp


def _float_code(v: Value) -> int:
    return DTYPE_TO_ONNX[v.dtype] if v.dtype is not None and v.dtype.is_float else DTYPE_TO_ONNX[DType.FLOAT32]


# -- the pieces of a Q/DQ anchor ------------------------------------------------------------------------
def activation_of(ed: Editor, dq: Value) -> "tuple[Value, Value, Optional[Value], Optional[Value], DType] | None":
    """(input, scale, zero point, smooth, quantized type) an anchor reads through ``dq = DequantizeLinear(...)``:
    the float input of a matching QuantizeLinear (quantized inside the anchor; a ``Mul`` by a constant
    vector before the Q is SmoothQuant's factor), or the integer / E4M3 tensor itself."""
    node = ed.producer(dq)
    if node is None or node.op != "DequantizeLinear" or node.attrs.get("block_size", 0):
        return None
    q, s = node.inputs[0], node.inputs[1]
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if not _scalar(s) or (zp is not None and not _scalar(zp)) or q.dtype not in (*INT_TYPES, DType.FLOAT8E4M3):
        return None
    qn = ed.producer(q)
    if qn is not None and qn.op == "QuantizeLinear" and not qn.attrs.get("block_size", 0) \
            and qn.attrs.get("saturate", 1) and _same_const(qn.inputs[1], s):
        qzp = qn.inputs[2] if len(qn.inputs) > 2 else None
        if (zp is None) != (qzp is None) or (zp is not None and not _same_const(zp, qzp)):
            return None
        x = qn.inputs[0]
        if zp is None and q.dtype == DType.UINT8:  # the type alone gives the range
            zp = ed.const(np.zeros((), dtype=np.uint8), "zero_point")
        smooth = None
        mul = ed.producer(x)
        if mul is not None and mul.op == "Mul" and len(ed.users(x)) == 1:
            for a, b in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
                if (b.is_const and b.shape is not None and len(b.shape) == 1 and b.dtype == a.dtype
                        and a.shape is not None and a.shape and b.shape[0] == a.shape[-1]):
                    x, smooth = a, b
                    break
        return x, s, _zero_point(zp), smooth, q.dtype
    return q, s, _zero_point(zp), None, q.dtype


def weight_of(ed: Editor, dq: Value, axis: int, rank: int) -> "tuple[Value, Value] | None":
    """(quantized weight constant, per-channel scale vector) a ``DequantizeLinear`` of a constant
    gives, its zero point centred away (None when the centred weight does not fit its type)."""
    node = ed.producer(dq)
    if node is None or node.op != "DequantizeLinear" or node.attrs.get("block_size", 0):
        return None
    wq, s = _const(node.inputs[0]), _const(node.inputs[1])
    zp = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if wq is None or s is None or (len(node.inputs) > 2 and node.inputs[2] is not None and zp is None):
        return None
    if wq.ndim != rank or s.ndim > 1:
        return None
    channels = wq.shape[axis]
    if s.size != 1 and (s.size != channels or node.attrs.get("axis", 1) % rank != axis % rank):
        return None
    dt = node.inputs[0].dtype
    if dt == DType.FLOAT8E4M3:
        if zp is not None and np.any(zp.astype(np.float32) != 0):
            return None
        w = ed.const(wq, hint=node.inputs[0].name)
    elif dt in INT_TYPES:
        centred = wq.astype(np.int32)
        if zp is not None:
            shape = [1] * rank
            shape[axis] = -1
            centred = centred - (zp.astype(np.int32).reshape(shape) if zp.size > 1 else int(zp.reshape(())))
        if centred.min(initial=0) < -128 or centred.max(initial=0) > 127:
            return None
        w = ed.const(centred.astype(np.int8), hint=node.inputs[0].name + ("" if dt == DType.INT8 else ".int8"))
    else:
        return None
    scale = np.broadcast_to(s.astype(np.float32).reshape(-1), (channels,)).copy()
    return w, ed.const(scale, hint=node.inputs[1].name)


def _float_bias(ed: Editor, v: Optional[Value]) -> "Value | None | bool":
    """A bias as a float value: itself, or a DequantizeLinear of constants computed now; False if neither."""
    if v is None:
        return None
    node = ed.producer(v)
    if node is None or node.op != "DequantizeLinear" or not all(x is None or x.is_const for x in node.inputs):
        return v if v.dtype is not None and v.dtype.is_float and v.dtype != DType.FLOAT8E4M3 else False
    from ..ops import OpContext, get
    from ..ops.torch_types import tensor_from_numpy, tensor_to_numpy

    out = get("DequantizeLinear").call([tensor_from_numpy(x.data) if x is not None else None for x in node.inputs],
                                       node.attrs, OpContext(num_outputs=1))
    return ed.const(tensor_to_numpy(out), hint=v.name)


# -- Q/DQ around GEMMs and convolutions --------------------------------------------------------------
def _qconv(ed: Editor, m: Match) -> Optional[Value]:
    conv, y = m.node("y"), m["y"]
    if y.dtype is None or not y.dtype.is_float or conv.attrs.get("group", 1) < 1:
        return None
    act = activation_of(ed, conv.inputs[0])
    w = conv.inputs[1]
    weight = weight_of(ed, w, 0, len(w.shape)) if w is not None and w.shape is not None else None
    if act is None or weight is None or act[3] is not None:
        return None
    x, xs, xzp, _, qtype = act
    wq, ws = weight
    if (qtype == DType.FLOAT8E4M3) != (wq.dtype == DType.FLOAT8E4M3):
        return None
    bias = _float_bias(ed, conv.inputs[2] if len(conv.inputs) > 2 else None)
    if bias is False:
        return None
    residual = conv.inputs[3] if conv.op == "ember.Conv" and len(conv.inputs) > 3 else None
    attrs = {k: v for k, v in conv.attrs.items() if k in CONV_ATTRS or k in EPILOGUE_ATTRS}
    attrs["output_dtype"] = _float_code(y)
    return ed.out("ember.QConv", [x, wq, xs, ws, bias, residual, xzp], attrs, name=y.name, like=y)


def _qgemm(ed: Editor, m: Match) -> Optional[Value]:
    node, y = m.node("y"), m["y"]
    if y.dtype is None or not y.dtype.is_float:
        return None
    a_dq, b_dq = node.inputs[0], node.inputs[1]
    attrs: dict = {}
    bias, residual, alpha = None, None, 1.0
    if node.op == "MatMul":
        trans = 0
    elif node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        trans, alpha = int(node.attrs.get("transB", 0)), float(node.attrs.get("alpha", 1.0))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and node.attrs.get("beta", 1.0) != 1.0:
            return None
    else:  # ember.Gemm
        trans, alpha = int(node.attrs.get("trans_b", 0)), float(node.attrs.get("alpha", 1.0))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        residual = node.inputs[3] if len(node.inputs) > 3 else None
        attrs = {k: v for k, v in node.attrs.items() if k in EPILOGUE_ATTRS}
    act = activation_of(ed, a_dq)
    weight = weight_of(ed, b_dq, 0 if trans else 1, 2) if b_dq is not None else None
    if act is None or weight is None or act[0].shape is None or len(act[0].shape) < 2:
        return None
    x, xs, xzp, smooth, qtype = act
    wq, ws = weight
    if (qtype == DType.FLOAT8E4M3) != (wq.dtype == DType.FLOAT8E4M3):
        return None
    if bias is not None:
        bias = _float_bias(ed, bias)
        if bias is False or (bias is not None and (bias.shape is None or any(d != 1 for d in bias.shape[:-1]))):
            return None
    if alpha != 1.0:
        ws = ed.const((ws.data.astype(np.float64) * alpha).astype(np.float32), hint=ws.name)
    if trans:
        attrs["trans_b"] = 1
    attrs["output_dtype"] = _float_code(y)
    return ed.out("ember.QGemm", [x, wq, xs, ws, bias, residual, xzp, None, None, smooth], attrs, name=y.name,
                  like=y)


def _requantize(ed: Editor, m: Match) -> Optional[Value]:
    """Q(anchor(...)) -> the anchor with the Q in its epilogue: it writes the quantized tensor."""
    q, anchor = m.node("y"), m.node("a")
    ins = anchor.inputs + [None] * (10 - len(anchor.inputs))
    s = q.inputs[1]
    zp = q.inputs[2] if len(q.inputs) > 2 else None
    if ins[7] is not None or q.attrs.get("block_size", 0) or not q.attrs.get("saturate", 1) or not _scalar(s) \
            or (zp is not None and not _scalar(zp)) or m["y"].dtype is None:
        return None
    out_t = m["y"].dtype
    wtype = anchor.inputs[1].dtype
    if (out_t == DType.FLOAT8E4M3) != (wtype == DType.FLOAT8E4M3) or (out_t not in (*INT_TYPES, DType.FLOAT8E4M3)):
        return None
    if zp is None and out_t == DType.UINT8:
        zp = ed.const(np.zeros((), np.uint8), "zero_point")
    ins[7], ins[8] = s, _zero_point(zp)
    while ins and ins[-1] is None:
        ins.pop()
    return ed.out(anchor.op, ins, dict(anchor.attrs), name=m["y"].name, like=m["y"])


# -- epilogues of quantized anchors ---------------------------------------------------------------------
def _plain(anchor: Node) -> bool:
    ins = anchor.inputs + [None] * 8
    return not anchor.attrs.get("activation") and ins[5] is None and ins[7] is None


def _fuse_activation(ed: Editor, m: Match) -> Optional[Value]:
    anchor, act = m.node("a"), m.node("y")
    ins = anchor.inputs + [None] * 8
    if anchor.attrs.get("activation") or ins[7] is not None:
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
        keys, values = list(act.attrs), list(act.attrs.values())
    attrs = dict(anchor.attrs, activation=act.op, act_keys=keys, act_values=values)
    if ins[5] is not None:
        attrs["act_after_residual"] = 1
    return ed.out(anchor.op, list(anchor.inputs), attrs, name=m["y"].name, like=m["y"])


def _fuse_residual(ed: Editor, m: Match) -> Optional[Value]:
    anchor, r = m.node("a"), m["r"]
    ins = anchor.inputs + [None] * (10 - len(anchor.inputs))
    if ins[5] is not None or ins[7] is not None or r.is_const or not same_type(m["a"], m["y"]):
        return None
    if r.shape is None or tuple(r.shape) != tuple(m["y"].shape):
        return None
    ins[5] = r
    while ins and ins[-1] is None:
        ins.pop()
    return ed.out(anchor.op, ins, dict(anchor.attrs), name=m["y"].name, like=m["y"])


def _fuse_bias(ed: Editor, m: Match) -> Optional[Value]:
    anchor, c = m.node("a"), _const(m["c"])
    if not _plain(anchor) or c is None or c.dtype.kind != "f" or not same_type(m["a"], m["y"]):
        return None
    n = anchor.inputs[1].shape[0] if anchor.op == "ember.QConv" or anchor.attrs.get("trans_b") else \
        anchor.inputs[1].shape[1]
    axis_from_end = len(m["y"].shape) - 1 if anchor.op == "ember.QConv" else 1
    if c.size == 1:
        vec = np.full(n, float(c.reshape(())))
    elif c.ndim >= axis_from_end and c.shape[c.ndim - axis_from_end] == n and c.size == n:
        vec = c.reshape(-1).astype(np.float64)
    else:
        return None
    old = _const(anchor.inputs[4]) if len(anchor.inputs) > 4 and anchor.inputs[4] is not None else None
    if len(anchor.inputs) > 4 and anchor.inputs[4] is not None and old is None:
        return None
    bias = vec + (0.0 if old is None else old.astype(np.float64).reshape(-1))
    ins = list(anchor.inputs) + [None] * (5 - len(anchor.inputs))
    ins[4] = ed.const(bias.astype(c.dtype), hint=m["y"].name + "/bias")
    return ed.out(anchor.op, ins, dict(anchor.attrs), name=m["y"].name, like=m["y"])


# -- QOperator forms ----------------------------------------------------------------------------------
def _qlinear_conv(ed: Editor, m: Match) -> Optional[Value]:
    node = m.node("y")
    x, xs, xzp, w, ws, wzp, ys, yzp = (node.inputs + [None] * 9)[:8]
    b = node.inputs[8] if len(node.inputs) > 8 else None
    wq = _centred_weight(ed, w, ws, wzp, 0)
    if wq is None or not all(_scalar(v) for v in (xs, xzp, ys, yzp)) or (b is not None and _const(b) is None):
        return None
    bias = None
    if b is not None:  # int32 accumulator units: x_scale * w_scale each
        bias = ed.const((_const(b).astype(np.float64) * float(_const(xs).reshape(())) *
                         wq[1].data.astype(np.float64)).astype(np.float32), hint=b.name)
    attrs = {k: v for k, v in node.attrs.items() if k in CONV_ATTRS}
    return ed.out("ember.QConv", [x, wq[0], xs, wq[1], bias, None, _zero_point(xzp), ys, _zero_point(yzp)], attrs,
                  name=m["y"].name, like=m["y"])


def _qlinear_matmul(ed: Editor, m: Match) -> Optional[Value]:
    node = m.node("y")
    a, as_, azp, b, bs, bzp, ys, yzp = node.inputs[:8]
    wq = _centred_weight(ed, b, bs, bzp, 1)
    if wq is None or a.shape is None or len(a.shape) < 2 or not all(_scalar(v) for v in (as_, azp, ys, yzp)):
        return None
    return ed.out("ember.QGemm", [a, wq[0], as_, wq[1], None, None, _zero_point(azp), ys, _zero_point(yzp)], {},
                  name=m["y"].name, like=m["y"])


def _centred_weight(ed: Editor, w: Value, s: Value, zp: Optional[Value], axis: int) -> "tuple[Value, Value] | None":
    """A QOperator weight (constant, its scale and zero point) as int8 centred weights and a scale vector."""
    wq, sc = _const(w), _const(s)
    z = _const(zp) if zp is not None else np.zeros((), np.int8)
    if wq is None or sc is None or z is None or w.dtype not in INT_TYPES or wq.ndim < 2:
        return None
    channels = wq.shape[axis]
    if sc.size not in (1, channels) or z.size not in (1, channels):
        return None
    shape = [1] * wq.ndim
    shape[axis] = -1
    centred = wq.astype(np.int32) - (z.astype(np.int32).reshape(shape) if z.size > 1 else int(z.reshape(())))
    if centred.min(initial=0) < -128 or centred.max(initial=0) > 127:
        return None
    scale = np.broadcast_to(sc.astype(np.float32).reshape(-1), (channels,)).copy()
    return ed.const(centred.astype(np.int8), hint=w.name + ".int8"), ed.const(scale, hint=s.name)


def _scaled_integer_product(ed: Editor, m: Match) -> Optional[Value]:
    """Mul(Cast(MatMulInteger|ConvInteger(a, w, a_zp, w_zp), float), scale): ONNX Runtime's dynamic
    quantization. ``scale`` is a constant or a_scale * w_scale (a_scale from DynamicQuantizeLinear)."""
    mi, cast, y = m.node("mi"), m.node("c"), m["y"]
    if y.dtype != DType.FLOAT32 or cast.attrs.get("to") != DTYPE_TO_ONNX[DType.FLOAT32]:
        return None
    a, w = mi.inputs[0], mi.inputs[1]
    azp = mi.inputs[2] if len(mi.inputs) > 2 else None
    wzp = mi.inputs[3] if len(mi.inputs) > 3 else None
    conv = mi.op == "ConvInteger"
    if azp is not None and not _scalar(azp):
        return None
    a_scale, w_scale = _split_scale(ed, m["s"])
    if a_scale is None:
        return None
    wq = _centred_weight(ed, w, w_scale, wzp, 0 if conv else 1)
    if wq is None or a.dtype not in INT_TYPES:
        return None
    if azp is None and a.dtype == DType.UINT8:
        azp = ed.const(np.zeros((), np.uint8), "zero_point")
    azp = _zero_point(azp)
    if conv:
        attrs = {k: v for k, v in mi.attrs.items() if k in CONV_ATTRS}
        attrs["output_dtype"] = DTYPE_TO_ONNX[DType.FLOAT32]
        return ed.out("ember.QConv", [a, wq[0], a_scale, wq[1], None, None, azp], attrs, name=y.name, like=y)
    if a.shape is None or len(a.shape) < 2:
        return None
    return ed.out("ember.QGemm", [a, wq[0], a_scale, wq[1], None, None, azp], {"output_dtype": 1}, name=y.name,
                  like=y)


def _split_scale(ed: Editor, s: Value) -> "tuple[Optional[Value], Optional[Value]]":
    """(activation scale, weight scale) of a combined scale: Mul(a_scale, w_scale const) or a constant."""
    node = ed.producer(s)
    if node is not None and node.op == "Mul":
        for a, w in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            if w.is_const and _scalar(a) and a.dtype == DType.FLOAT32 and w.dtype == DType.FLOAT32:
                return a, w
    if s.is_const and _scalar(s) and s.dtype == DType.FLOAT32:
        return s, ed.const(np.ones((), np.float32), "one")
    return None, None


DQ = P("DequantizeLinear", name="dq_in", open_inputs=True)
DQW = P("DequantizeLinear", name="dq_w", open_inputs=True)
q_anchor = P(QANCHORS, open_inputs=True, name="a")


def fold_rules() -> list[Rule]:
    return [
        Rule("qdq_into_conv", P(("Conv", "ember.Conv"), DQ, DQW, open_inputs=True, name="y"), _qconv, exclusive=False),
        Rule("qdq_into_gemm", P(("MatMul", "Gemm", "ember.Gemm"), DQ, DQW, open_inputs=True, name="y"), _qgemm,
             exclusive=False),
        Rule("qlinear_conv", P("QLinearConv", open_inputs=True, name="y"), _qlinear_conv),
        Rule("qlinear_matmul", P("QLinearMatMul", open_inputs=True, name="y"), _qlinear_matmul),
        Rule("scaled_integer_product", P("Mul", P("Cast", P(("MatMulInteger", "ConvInteger"), open_inputs=True,
                                                            name="mi"), name="c"), P.any("s"), name="y"),
             _scaled_integer_product),
        Rule("requantize_in_epilogue", P("QuantizeLinear", q_anchor, P.any(), open_inputs=True, name="y"),
             _requantize),
        Rule("activation_into_quantized_anchor", P(epilogue_ops(), q_anchor, name="y", open_inputs=True),
             _fuse_activation),
        Rule("residual_into_quantized_anchor", P("Add", q_anchor, P.any("r"), name="y"), _fuse_residual),
        Rule("bias_into_quantized_anchor", P("Add", q_anchor, P.const("c"), name="y"), _fuse_bias),
    ]


def fold_quantization(graph: Graph, ctx: PassContext) -> bool:
    """Q/DQ pairs, QOperator forms, requantization and epilogues onto ember.QConv / ember.QGemm."""
    return apply_rules(graph, fold_rules(), ctx.log)
