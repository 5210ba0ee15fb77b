"""Reduced precision: store activations and weights in fp16/bf16 where that is safe.

Each node gets a compute type: low (fp16/bf16) for ops whose kernels accumulate in fp32 anyway
(GEMM, conv, attention, norms, softmax, pointwise math, layout ops), fp32 for the rest (sums and
products that can overflow fp16, Pow, anything not listed). Float inputs are cast to the node's
compute type where they differ (constants are converted once at build time); engine inputs and
outputs keep the dtypes the model declares. Like autocast, but decided once, visible in the graph.
"""
from __future__ import annotations

import numpy as np

from ..ir.dtypes import DType, to_numpy
from ..ir.graph import Graph, Node, Value
from ..ops import get

ALL = None  # every float input is data
# op -> positions of float inputs computed in low precision (ALL: every input)
LOW_PRECISION_OPS: dict[str, "tuple[int, ...] | None"] = {
    "Conv": ALL, "ConvTranspose": ALL, "ember.Conv": ALL, "ember.Gemm": ALL, "MatMul": ALL, "Gemm": ALL,
    "Attention": (0, 1, 2, 3, 4, 5), "LayerNormalization": ALL, "RMSNormalization": ALL,
    "BatchNormalization": ALL, "InstanceNormalization": ALL, "GroupNormalization": ALL,
    "Softmax": ALL, "LogSoftmax": ALL, "MaxPool": (0,), "AveragePool": (0,), "GlobalAveragePool": ALL,
    "GlobalMaxPool": ALL, "Reshape": (0,), "Transpose": ALL, "Flatten": ALL, "Squeeze": (0,), "Unsqueeze": (0,),
    "Concat": ALL, "Split": (0,), "Slice": (0,), "Gather": (0,), "GatherElements": (0,), "Expand": (0,),
    "Tile": (0,), "Pad": (0, 2), "Identity": ALL, "Resize": (0,), "Where": (1, 2), "ReduceMean": (0,),
    "ReduceMax": (0,), "ReduceMin": (0,), "DepthToSpace": ALL, "SpaceToDepth": ALL, "RotaryEmbedding": (0, 1, 2),
    "ArgMax": ALL, "ArgMin": ALL, "TopK": (0,),
}
KEEP_FP32 = {"Pow", "ReduceSum", "ReduceSumSquare", "ReduceProd", "ReduceL2", "ReduceLogSumExp", "CumSum",
             "Exp"}  # overflow-prone: their inputs and outputs stay fp32


def _low_positions(node: Node) -> "set[int] | None":
    """Input positions computed in low precision, or None if the node stays fp32."""
    if node.op in KEEP_FP32:
        return None
    if node.op in LOW_PRECISION_OPS:
        pos = LOW_PRECISION_OPS[node.op]
        return set(range(len(node.inputs))) if pos is None else set(pos)
    if get(node.op).kind == "pointwise":
        return set(range(len(node.inputs)))
    return None


def convert_precision(graph: Graph, low: DType) -> list[str]:
    """Rewrite ``graph`` for ``low`` (FLOAT16 or BFLOAT16). Returns names of float nodes kept in fp32."""
    casts: dict[tuple[int, DType], Value] = {}
    new_nodes: list[Node] = []
    kept_fp32: list[str] = []
    counter = [0]

    def cast(v: Value, to: DType) -> Value:
        key = (id(v), to)
        if key in casts:
            return casts[key]
        if v.is_const:
            c = graph.add_const(f"{v.name}:{to.value}", np.asarray(v.data).astype(to_numpy(to)))
            casts[key] = c
            return c
        counter[0] += 1
        out = Value(f"{v.name}:{to.value}", to, v.shape)
        n = Node("Cast", [v], [out], {"to": _onnx_code(to)}, name=f"cast_{counter[0]}_{v.name}")
        out.producer = n
        new_nodes.append(n)
        casts[key] = out
        return out

    declared = {id(v): v.dtype for v in graph.outputs}
    for node in graph.nodes:
        if node.op in ("Cast", "CastLike", "Shape", "Size"):  # type-agnostic: leave as they are
            new_nodes.append(node)
            continue
        low_pos = _low_positions(node) if not any(node.subgraphs()) else None
        float_in = [i for i, v in enumerate(node.inputs) if v is not None and v.dtype is not None and v.dtype.is_float]
        if low_pos is None:
            # fp32 node: bring low-precision inputs back to fp32
            for i in float_in:
                v = node.inputs[i]
                if v.dtype == low:
                    node.inputs[i] = cast(v, DType.FLOAT32)
            if float_in:
                kept_fp32.append(f"{node.name} ({node.op})")
        else:
            for i in float_in:
                v = node.inputs[i]
                want = low if i in low_pos and v.dtype == DType.FLOAT32 else (
                    DType.FLOAT32 if i not in low_pos and v.dtype == low else v.dtype)
                if want != v.dtype:
                    node.inputs[i] = cast(v, want)
            if any(node.inputs[i] is not None and node.inputs[i].dtype == low for i in float_in):
                for o in node.outputs:
                    if o.dtype == DType.FLOAT32:
                        o.dtype = low
        new_nodes.append(node)
    # engine outputs keep their declared dtype
    outputs = []
    for v in graph.outputs:
        if v.dtype != declared[id(v)] and v.producer is not None:
            counter[0] += 1
            orig = Value(v.name, declared[id(v)], v.shape)
            v.name = f"{v.name}:{low.value}"
            n = Node("Cast", [v], [orig], {"to": _onnx_code(orig.dtype)}, name=f"cast_out_{counter[0]}")
            orig.producer = n
            new_nodes.append(n)
            outputs.append(orig)
        else:
            outputs.append(v)
    graph.nodes = new_nodes
    graph.outputs = outputs
    return kept_fp32


def _onnx_code(dt: DType) -> int:
    from ..ir.dtypes import DTYPE_TO_ONNX

    return DTYPE_TO_ONNX[dt]
