"""Horizontal GEMM merging: GEMMs that read the same input with constant weights run as one.

Q, K and V projections of an attention block are three GEMMs over the same activations; one GEMM
with the weights concatenated along N, followed by a Split, reads the activations once and gives
the GPU one large problem instead of three small ones.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..ir.graph import Graph, Node, Value
from .rewrite import Editor, Match, P, PassContext, Rule, apply_rules


def _mergeable(ed: Editor, n: Node) -> Optional[tuple]:
    """The signature siblings must share, or None if ``n`` cannot be merged."""
    if n.op != "ember.Gemm" or (len(n.inputs) > 3 and n.inputs[3] is not None):
        return None
    w = n.inputs[1]
    bias = n.inputs[2] if len(n.inputs) > 2 else None
    if not w.is_const or w.data.ndim != 2 or (bias is not None and not bias.is_const):
        return None
    if ed.position.get(id(n)) is None:
        return None
    trans = n.attrs.get("trans_b", 0)
    k = w.data.shape[1] if trans else w.data.shape[0]
    return (n.inputs[0].name, k, trans, w.data.dtype.str, n.attrs.get("alpha", 1.0), n.attrs.get("activation", ""),
            tuple(n.attrs.get("act_keys") or []), tuple(map(str, n.attrs.get("act_values") or [])))


def _merge(ed: Editor, m: Match) -> Optional[Value]:
    root = m.node("y")
    sig = _mergeable(ed, root)
    if sig is None:
        return None
    pos = ed.position[id(root)]
    group = [root] + [u for u in ed.users(m["a"]) if u is not root and id(u) not in ed.removed
                      and _mergeable(ed, u) == sig and ed.position[id(u)] > pos]
    if len(group) < 2:
        return None
    trans = sig[2]
    weights, biases, sizes = [], [], []
    for n in group:
        w = n.inputs[1].data
        sizes.append(w.shape[0] if trans else w.shape[1])
        weights.append(w)
        b = n.inputs[2].data if len(n.inputs) > 2 and n.inputs[2] is not None else None
        biases.append(np.zeros(sizes[-1], dtype=w.dtype) if b is None else np.broadcast_to(b.reshape(-1), (sizes[-1],)))
    w_all = ed.const(np.concatenate(weights, axis=0 if trans else 1), root.name + "/merged_weight")
    b_all = ed.const(np.concatenate(biases).astype(weights[0].dtype), root.name + "/merged_bias")
    attrs = dict(root.attrs)
    merged = ed.out("ember.Gemm", [m["a"], w_all, b_all], attrs, name=root.name + "/merged")
    split = ed.emit("Split", [merged, ed.const(np.asarray(sizes, dtype=np.int64), root.name + "/split_sizes")],
                    {"axis": -1}, name=root.name + "/split", num_outputs=len(group))
    for n, out in zip(group[1:], split.outputs[1:]):
        old = n.outputs[0]
        if ed.is_output(old):
            return None
        ed.replace(old, out)
        out.name, old.name = old.name, ed.fresh_name(old.name + ".merged")
    return split.outputs[0]


MERGE_RULES = [Rule("merge_parallel_gemms", P("ember.Gemm", P.any("a"), P.const(), name="y", open_inputs=True),
                    _merge, exclusive=False)]


def merge_parallel_gemms(graph: Graph, ctx: PassContext) -> bool:
    """ember.Gemm nodes sharing their input and epilogue, with constant weights -> one GEMM + Split."""
    return apply_rules(graph, MERGE_RULES, ctx.log)
