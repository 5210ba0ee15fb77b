"""Shape and dtype inference over a graph: symbolic rules first, meta-tensor execution otherwise."""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from ..ir.dtypes import DType
from ..ir.graph import Graph, Node, Value
from ..ir.shapes import Dim, Sym, broadcast_shapes, is_static
from .registry import OpContext, get, known_ops
from .torch_types import from_torch, tensor_from_numpy, to_torch

TypeInfo = tuple[Optional[DType], Optional[tuple[Dim, ...]]]
_unknown_ids = itertools.count()


def fresh_dim() -> Sym:
    return Sym.named(f"unk{next(_unknown_ids)}")


# -- helpers for shape rules ----------------------------------------------------------------------
def same_as_input(i: int = 0):
    def rule(node: Node) -> list[TypeInfo]:
        v = node.inputs[i]
        return [(v.dtype, v.shape)] if v is not None else [(None, None)]
    return rule


def broadcast_rule(out_dtype: Optional[DType] = None):
    def rule(node: Node) -> list[TypeInfo]:
        ins = [v for v in node.inputs if v is not None]
        if any(v.shape is None for v in ins):
            return [(out_dtype or ins[0].dtype, None)]
        return [(out_dtype or ins[0].dtype, broadcast_shapes(*(v.shape for v in ins)))]
    return rule


# -- driver --------------------------------------------------------------------------------------
def _meta_args(node: Node, keep_int_consts: bool) -> list:
    args = []
    for v in node.inputs:
        if v is None:
            args.append(None)
        elif v.kind != "tensor":
            raise TypeError("non-tensor input")
        elif v.is_const and (keep_int_consts and v.data.dtype.kind in "iub" and v.data.size <= 64):
            args.append(tensor_from_numpy(v.data))
        else:
            if v.dtype is None or not is_static(v.shape):
                raise TypeError("input without static shape")
            args.append(torch.empty(tuple(v.shape), dtype=to_torch(v.dtype), device="meta"))
    return args


def infer_by_meta(node: Node) -> Optional[list[TypeInfo]]:
    opdef = get(node.op)
    ctx = OpContext(num_outputs=len(node.outputs), node_name=node.name,
                    output_dtypes=[o.dtype for o in node.outputs])
    for keep in (True, False):
        try:
            out = opdef.call(_meta_args(node, keep), node.attrs, ctx)
        except Exception:
            continue
        outs = list(out) if isinstance(out, tuple) else [out]
        if not all(isinstance(t, torch.Tensor) for t in outs[: len(node.outputs)]):
            return None
        return [(from_torch(t.dtype), tuple(int(d) for d in t.shape)) for t in outs[: len(node.outputs)]]
    return None


def infer_node(node: Node) -> None:
    """Fill dtype/shape of node outputs that are still unknown."""
    if node.op not in known_ops():
        return
    opdef = get(node.op)
    result: Optional[list[TypeInfo]] = None
    if opdef.shape_rule is not None:
        try:
            result = opdef.shape_rule(node)
        except Exception:
            result = None
    if result is None or any(s is None or d is None for d, s in result):
        meta = infer_by_meta(node) if opdef.kind != "control" else None
        if meta is not None:
            result = meta
    if not result:
        return
    for out, (dt, shape) in zip(node.outputs, result):
        if out.dtype is None and dt is not None:
            out.dtype = dt
        if out.shape is None and shape is not None:
            out.shape = tuple(shape)


def infer_shapes(graph: Graph) -> None:
    for node in graph.nodes:
        for sg in node.subgraphs():
            infer_shapes(sg)
        infer_node(node)
