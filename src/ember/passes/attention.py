"""Scaled-dot-product attention recognition: softmax(Q·Kᵀ·scale + mask)·V -> one Attention op.

Exporters spell the scale three ways (scores / sqrt(d); scores * 1/sqrt(d); Q and Kᵀ each times
d**-0.25, as torch's SDPA decomposition does) and the mask two ways (an additive bias, BERT and
Llama; a Where against a large negative constant, GPT-2 eager). This pass peels those layers off
the softmax input in any order and emits the ONNX ``Attention`` op on 4-D (B, H, S, D) tensors.
Kᵀ is turned back into K by a transpose, which merges with the exporter's own head transposes.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ops import known_ops
from .patterns import _scalar, is_scalar
from .rewrite import Editor, Match, P, PassContext, Rule, apply_rules


def _softmax_last(v: Value, m: Match) -> bool:
    node = v.producer
    x = node.inputs[0] if node is not None else None
    return x is not None and x.shape is not None and node.attrs.get("axis", -1) in (-1, len(x.shape) - 1)


def _producer(ed: Editor, v: Value, ops: tuple[str, ...]) -> Optional[Node]:
    n = ed.producer(v)
    if n is None or n.op not in ops or not ed.single_use(v):
        return None
    return n


def _peel_masks(ed: Editor, v: Value, masks: list[Value]) -> Value:
    """Strip additive masks and Where(cond, s, -big) masks off the scores; collect them as biases."""
    while True:
        n = _producer(ed, v, ("Add", "Where"))
        if n is None:
            return v
        if n.op == "Add":
            a, b = n.inputs
            # the scores side is the one that leads to the Q·Kᵀ MatMul
            if _leads_to_matmul(b) and not _leads_to_matmul(a):
                a, b = b, a
            if not _leads_to_matmul(a):
                return v
            masks.append(b)
            v = a
        else:
            cond, s, fill = n.inputs
            c = _scalar(fill)
            if c is None or c > -1e4 or not _leads_to_matmul(s):
                return v
            masks.append(ed.out("Where", [cond, ed.const(np.zeros((), dtype=fill.data.dtype), "mask_zero"), fill],
                                name=n.name + "/bias"))
            v = s


def _leads_to_matmul(v: Optional[Value], depth: int = 4) -> bool:
    n = v.producer if v is not None else None
    if n is None or depth == 0:
        return False
    if n.op == "MatMul":
        return True
    return n.op in ("Mul", "Div", "Add", "Where") and any(_leads_to_matmul(i, depth - 1) for i in n.inputs)


def _peel_scale(ed: Editor, v: Value) -> tuple[Value, float]:
    scale = 1.0
    while True:
        n = _producer(ed, v, ("Mul", "Div"))
        if n is None:
            return v, scale
        s = _scalar(n.inputs[1])
        if s is None and n.op == "Mul":
            s, other = _scalar(n.inputs[0]), n.inputs[1]
        else:
            other = n.inputs[0]
        if s is None or s == 0:
            return v, scale
        scale *= s if n.op == "Mul" else 1.0 / s
        v = other


def _k_from_kt(ed: Editor, kt: Value) -> Value:
    """K (B, H, S, D) from Kᵀ (B, H, D, S): undo the exporter's transpose when it is one."""
    n = ed.producer(kt)
    if n is not None and n.op == "Transpose" and n.attrs.get("perm") is not None:
        p = list(n.attrs["perm"])
        perm = p[:-2] + [p[-1], p[-2]]
        src = n.inputs[0]
        if perm == list(range(len(perm))):
            return src
        return ed.out("Transpose", [src], {"perm": perm}, name=kt.name + "/untransposed")
    r = len(kt.shape)
    return ed.out("Transpose", [kt], {"perm": list(range(r - 2)) + [r - 1, r - 2]}, name=kt.name + "/untransposed")


def _attention(ed: Editor, m: Match) -> Optional[Value]:
    if "Attention" not in known_ops():
        return None
    masks: list[Value] = []
    s = _peel_masks(ed, m["s"], masks)
    s, scale = _peel_scale(ed, s)
    masks2: list[Value] = []
    s = _peel_masks(ed, s, masks2)  # the mask may come before or after the scale
    masks += masks2
    mm = _producer(ed, s, ("MatMul",))
    if mm is None:
        ed._pending = []
        return None
    q, q_scale = _peel_scale(ed, mm.inputs[0])
    kt, k_scale = _peel_scale(ed, mm.inputs[1])
    v = m["v"]
    if any(t.shape is None or len(t.shape) != 4 for t in (q, kt, v)) or q.dtype is None or not q.dtype.is_float:
        ed._pending = []
        return None
    if masks2 and scale != 1.0:  # scale applied after a mask would scale the mask too
        ed._pending = []
        return None
    total = scale * q_scale * k_scale
    k = _k_from_kt(ed, kt)
    bias: Optional[Value] = None
    for mask in masks:
        bias = mask if bias is None else ed.out("Add", [bias, mask], name=mask.name + "/sum")
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    head = q.shape[-1]
    attrs: dict = {"scale": float(total)}
    if isinstance(head, int) and math.isclose(total, 1.0 / math.sqrt(head), rel_tol=1e-6):
        attrs = {}
    return ed.out("Attention", inputs, attrs, name=m["y"].name, like=m["y"])


_softmax = P("Softmax", P.any("s"), name="p", where=_softmax_last)
# torch's SDPA decomposition zeroes the NaN rows a fully masked softmax gives; Attention does that itself
_nan_zeroed = P("Where", P("IsNaN", _softmax), P.const(where=is_scalar(0.0)), P.any("p"))
ATTENTION_RULES = [
    Rule("recognize_attention", P("MatMul", P.one_of(_softmax, _nan_zeroed), P.any("v"), name="y"), _attention),
]


def _heads_3d(m: Match, which: str) -> Optional[tuple]:
    """(B, S, H*D) source and H of a Transpose(Reshape(x, [B, S, H, D]), [0, 2, 1, 3]) operand."""
    src, split = m[which + "3"], m[which + "4"]
    if src.shape is None or split.shape is None or len(src.shape) != 3 or len(split.shape) != 4:
        return None
    if m.node(which).attrs.get("perm") != [0, 2, 1, 3] or tuple(split.shape[:2]) != tuple(src.shape[:2]):
        return None
    heads, size = split.shape[2], split.shape[3]
    if not isinstance(heads, int) or not isinstance(size, int) or src.shape[2] != heads * size:
        return None
    return src, heads


def _attention_3d(ed: Editor, m: Match) -> Optional[Value]:
    """Head split and merge around a 4-D Attention -> the 3-D form (q_num_heads/kv_num_heads), which
    reads and writes (B, S, hidden) directly: four layout ops per attention block fewer."""
    att = m.node("att")
    if m.node("o").attrs.get("perm") != [0, 2, 1, 3] or len(att.outputs) > 1 and any(
            ed.users(o) for o in att.outputs[1:]):
        return None
    parts = [_heads_3d(m, w) for w in ("q", "k", "v")]
    if any(p is None for p in parts):
        return None
    (q, hq), (k, hk), (v, hv) = parts
    if hk != hv or m["y"].shape is None or tuple(m["y"].shape) != tuple(q.shape[:2]) + (hq * m["att"].shape[-1],):
        return None
    attrs = dict(att.attrs, q_num_heads=hq, kv_num_heads=hk)
    return ed.out("Attention", [q, k, v] + list(att.inputs[3:]), attrs, name=m["y"].name, like=m["y"])


def _split_heads(w: str) -> P:
    return P("Transpose", P("Reshape", P.any(w + "3"), P.any(), name=w + "4"), name=w)


ATTENTION_3D_RULES = [
    Rule("attention_on_hidden_layout", P("Reshape", P("Transpose", P(
        "Attention", _split_heads("q"), _split_heads("k"), _split_heads("v"), name="att", open_inputs=True), name="o"),
        P.any(), name="y"), _attention_3d),
]


def absorb_head_layout(graph: Graph, ctx: PassContext) -> bool:
    """Attention between head-split and head-merge transposes works on (B, S, hidden) directly."""
    return apply_rules(graph, ATTENTION_3D_RULES, ctx.log)


def recognize_attention(graph: Graph, ctx: PassContext) -> bool:
    """softmax(Q·Kᵀ·scale + mask)·V in BERT, GPT-2 and Llama exports -> Attention."""
    return apply_rules(graph, ATTENTION_RULES, ctx.log)
