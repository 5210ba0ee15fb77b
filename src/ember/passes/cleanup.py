"""Graph cleanup: constant folding (shape arithmetic included), dead code, duplicate work.

Constant folding runs a node's reference function on CPU when every input is a constant, and
stops where it would create a large tensor (an Expand of a scalar to an activation-sized
block), so folding never multiplies the weights' size. Every rule here also works inside
If/Loop/Scan bodies (rewrite.apply_rules visits them): a body folds with the constants of its
enclosing graphs. (An If whose condition folded to a constant: control.py.)
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..ir.graph import Graph, Node, Value
from ..ir.shapes import is_static
from ..ops import OpContext, get, known_ops
from ..ops.torch_types import tensor_from_numpy, tensor_to_numpy
from .rewrite import Editor, Match, P, PassContext, Rule, apply_rules
from .scope import eliminate_dead_nodes, remove_unused_initializers

SMALL_FOLD_BYTES = 1 << 16  # any folded result up to this size is fine, whatever the inputs' size


def _array_of(x) -> Optional[np.ndarray]:
    if isinstance(x, torch.Tensor):
        return tensor_to_numpy(x)
    return None


def _fold_constant(ctx: PassContext):
    def build(ed: Editor, m: Match) -> Optional[Value]:
        node = m["y"].producer
        assert node is not None
        # (OpDef.foldable: not random draws, nor control flow, whose bodies only make sense at run time)
        if node.op not in known_ops() or not get(node.op).foldable or any(True for _ in node.subgraphs()):
            return None
        ins = [v for v in node.inputs if v is not None]
        if not all(v.is_const and v.kind == "tensor" for v in ins):
            return None
        if any(o.kind != "tensor" for o in node.outputs):
            return None
        in_bytes = sum(v.data.nbytes for v in ins)
        # predict the output size from the inferred shape before running anything big
        predicted = 0
        for o in node.outputs:
            if o.dtype is not None and is_static(o.shape):
                predicted += int(np.prod(o.shape, dtype=np.int64)) * o.dtype.itemsize
        if predicted > max(in_bytes, SMALL_FOLD_BYTES):
            return None
        try:
            opctx = OpContext(num_outputs=len(node.outputs), node_name=node.name,
                              output_dtypes=[o.dtype for o in node.outputs])
            with torch.inference_mode():
                result = get(node.op).call(
                    [tensor_from_numpy(v.data) if v is not None else None for v in node.inputs], node.attrs, opctx)
        except Exception:  # a node that cannot run on constants is left for run time to report
            return None
        results = list(result) if isinstance(result, tuple) else [result]
        arrays = [_array_of(r) for r in results[: len(node.outputs)]]
        if any(a is None for a in arrays) or len(arrays) < len(node.outputs):
            return None
        out_bytes = sum(a.nbytes for a in arrays)
        if out_bytes > max(in_bytes, SMALL_FOLD_BYTES) or out_bytes > ctx.max_fold_bytes:
            return None
        consts = [ed.const(a, hint=o.name) for a, o in zip(arrays, node.outputs)]
        for o, c in zip(node.outputs[1:], consts[1:]):
            if not ed.is_output(o):
                ed.replace(o, c)
        return consts[0]

    return Rule("fold_constant", P.any("y", where=lambda v, m: v.producer is not None), build)


def fold_constants(graph: Graph, ctx: PassContext) -> bool:
    """Evaluate nodes whose inputs are all constants."""
    return apply_rules(graph, [_fold_constant(ctx)], ctx.log)


# -- shapes ------------------------------------------------------------------------------------------
def _shape_slice(node: Node) -> Optional[tuple]:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    r = len(x.shape)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end")
    lo = max(0, min(r, start + r if start < 0 else start))
    hi = r if end is None else max(0, min(r, end + r if end < 0 else end))
    return tuple(x.shape[lo:hi])


def _static_shape(ed: Editor, m: Match) -> Optional[Value]:
    dims = _shape_slice(m.node("s"))
    if dims is None or not is_static(dims):
        return None
    return ed.const(np.asarray(dims, dtype=np.int64), hint=m["s"].name)


def _static_size(ed: Editor, m: Match) -> Optional[Value]:
    x = m["x"]
    if not is_static(x.shape):
        return None
    return ed.const(np.asarray(int(np.prod(x.shape, dtype=np.int64)), dtype=np.int64), hint=m["y"].name)


def _gather_static_dims(ed: Editor, m: Match) -> Optional[Value]:
    """Shape(x)[i] with dim i static, while other dims of x stay symbolic."""
    dims = _shape_slice(m.node("s"))
    g = m.node("y")
    if dims is None or g.attrs.get("axis", 0) != 0:
        return None
    idx = np.asarray(m.const("i"))
    if idx.dtype.kind not in "iu":
        return None
    picked = [dims[int(i)] for i in idx.reshape(-1)]
    if not all(isinstance(d, int) for d in picked):
        return None
    return ed.const(np.asarray(picked, dtype=np.int64).reshape(idx.shape), hint=m["y"].name)


SHAPE_RULES = [
    Rule("fold_static_shape", P("Shape", P.any("x"), name="s"), _static_shape, exclusive=False),
    Rule("fold_static_size", P("Size", P.any("x"), name="y"), _static_size, exclusive=False),
    Rule("fold_static_dims", P("Gather", P("Shape", P.any("x"), name="s"), P.const("i"), name="y"),
         _gather_static_dims, exclusive=False),
]


def fold_shapes(graph: Graph, ctx: PassContext) -> bool:
    """Shape/Size of values whose dims are static become constants (so shape subgraphs fold)."""
    return apply_rules(graph, SHAPE_RULES, ctx.log)


# -- duplicates ------------------------------------------------------------------------------------
def _attr_key(v) -> object:
    if isinstance(v, np.ndarray):
        return ("nd", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (list, tuple)):
        return tuple(_attr_key(x) for x in v)
    if isinstance(v, Graph):
        return ("graph", id(v))
    return (type(v).__name__, v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))


def _node_key(n: Node) -> tuple:
    return (n.op, tuple(id(v) if v is not None else None for v in n.inputs), len(n.outputs),
            tuple(sorted((k, _attr_key(v)) for k, v in n.attrs.items())))


def _same_as_earlier(ed: Editor, m: Match) -> Optional[Value]:
    node = m["y"].producer
    assert node is not None
    if (node.op in known_ops() and not get(node.op).foldable) or any(True for _ in node.subgraphs()) or not node.inputs \
            or node.inputs[0] is None:
        return None
    pos = ed.position.get(id(node))
    if pos is None:
        return None
    key = _node_key(node)
    for other in ed.users(node.inputs[0]):
        if other is node or id(other) in ed.removed:
            continue
        other_pos = ed.position.get(id(other))
        if other_pos is None or other_pos > pos or _node_key(other) != key:
            continue
        for o, keep in zip(node.outputs[1:], other.outputs[1:]):
            if not ed.is_output(o):
                ed.replace(o, keep)
        return other.outputs[0]
    return None


CSE_RULE = Rule("common_subexpression", P.any("y", where=lambda v, m: v.producer is not None),
                _same_as_earlier, exclusive=False)


def eliminate_common_subexpressions(graph: Graph, ctx: PassContext) -> bool:
    """Nodes with the same op, inputs and attributes compute once. (Equal small constants are one
    value already: every sweep of the rewrite engine reads them through the first one in scope.)"""
    return apply_rules(graph, [CSE_RULE], ctx.log)


def remove_dead_code(graph: Graph, ctx: PassContext) -> bool:
    """Nodes whose results nobody reads, and initializers nobody reads, in the graph and every body
    (a value or constant that only a body reads is in use)."""
    a = eliminate_dead_nodes(graph)
    b = remove_unused_initializers(graph)
    return a or b
