"""Each fusible IR node as Triton expressions: the op's own lowering (its OpDef's ``triton``), checked.

An op states how it lowers where it is defined (ember.ops, with the vocabulary of ops/lowering.py:
a template over its operands, or a function of builder, node and operands). This module looks the
lowering up, and checks what the row kernels need of a reduction (one output, the last axis only).
"""
from __future__ import annotations

import numpy as np

from ..ir.graph import Node
from ..ops import get, known_ops
from ..ops.lowering import (CONST, ELEM, ROW, Builder, Operand, Prim, Unsupported, kind_of,  # noqa: F401  (re-exported)
                            literal, tl_type)


def _lowering(node: Node):
    return get(node.op).triton if node.op in known_ops() else None


def lower_pointwise(b: Builder, node: Node, args: "list[Operand | None]") -> Operand:
    """The primitives of one pointwise node; raises Unsupported for an op without a lowering."""
    lower = _lowering(node)
    if lower is None:
        raise Unsupported(f"node '{node.name}': op {node.op} has no fused-kernel template")
    return lower(b, node, args)


def lower_row_reduction(b: Builder, node: Node, args: "list[Operand | None]", n: str) -> Operand:
    """The primitives of a last-axis reduction; ``n`` is the source name of the row length."""
    b.row_length = n
    return lower_pointwise(b, node, args)


def check_row_reduction(node: Node) -> None:
    """Attributes and forms the row kernel computes exactly; raises Unsupported otherwise."""
    op = node.op
    if _lowering(node) is None:
        raise Unsupported(f"node '{node.name}': reduction {op} has no fused-kernel template")
    if len(node.outputs) != 1:
        raise Unsupported(f"node '{node.name}' ({op}): only the first output can be fused")
    x = node.inputs[0]
    rank = len(x.shape)
    if op.startswith("Reduce"):
        if node.attrs.get("noop_with_empty_axes", 0):
            raise Unsupported(f"node '{node.name}' ({op}): noop_with_empty_axes")
        axes_v = node.inputs[1] if len(node.inputs) > 1 else None
        if axes_v is None:
            axes = list(range(rank))
        elif axes_v.is_const:
            axes = sorted(int(a) % max(rank, 1) for a in np.asarray(axes_v.data).reshape(-1)) or list(range(rank))
        else:
            raise Unsupported(f"node '{node.name}' ({op}): axes computed at run time")
        if axes != [rank - 1]:
            raise Unsupported(f"node '{node.name}' ({op}): reduces axes {axes}, not the last one only")
    elif node.attrs.get("axis", -1) not in (-1, rank - 1):
        raise Unsupported(f"node '{node.name}' ({op}): axis {node.attrs.get('axis')} is not the last")


def param_inputs(node: Node) -> "frozenset[int]":
    """Input positions that are parameters, not data: the reduction axes, CastLike's target."""
    return get(node.op).param_inputs if node.op in known_ops() else frozenset()
