"""Reduced precision: store activations and weights in fp16/bf16 where that is safe.

Each node gets a compute type: low (fp16/bf16) for ops whose kernels accumulate in fp32 anyway
(GEMM, conv, attention, norms, softmax, pointwise math, layout ops), fp32 for the rest (sums and
products that can overflow fp16, Pow, anything not listed). Float inputs are cast to the node's
compute type where they differ (constants are converted once at build time); engine inputs and
outputs keep the dtypes the model declares. Like autocast, but decided once, visible in the graph.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class KeptLayer:
    """A float node that computes in fp32 in a reduced-precision engine, and why."""

    node: str
    op: str
    reason: str  # "accuracy" | "speed" | "op" | "control flow"
    detail: str = ""  # what was measured or which rule applied

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}" + (f", {self.detail}" if self.detail else "")


OP_REASONS = {"op": "its op stays fp32 (overflow-prone or no low-precision rule)",
              "control flow": "If/Loop/Scan bodies stay fp32"}


def convert_precision(graph: Graph, low: DType, keep: "dict[str, tuple[str, str]] | None" = None) -> list[KeptLayer]:
    """Rewrite ``graph`` for ``low`` (FLOAT16 or BFLOAT16). ``keep``: node name -> (reason, detail)
    for nodes to compute in fp32 although their op could run in ``low`` (the fidelity check's and
    the tuner's choices). Returns every float node that stays fp32. Casts it inserts carry
    ``meta["precision_cast"]`` (the tuner and the fidelity check see through them)."""
    keep = keep or {}
    casts: dict[tuple[int, DType], Value] = {}
    new_nodes: list[Node] = []
    kept_fp32: list[KeptLayer] = []
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
        n = Node("Cast", [v], [out], {"to": _onnx_code(to)}, name=f"cast_{counter[0]}_{v.name}",
                 meta={"precision_cast": True})
        out.producer = n
        new_nodes.append(n)
        casts[key] = out
        return out

    declared = {id(v): v.dtype for v in graph.outputs}
    for node in graph.nodes:
        if node.op in ("Cast", "CastLike", "Shape", "Size"):  # type-agnostic: leave as they are
            new_nodes.append(node)
            continue
        nested = any(node.subgraphs())
        low_pos = _low_positions(node) if not nested and node.name not in keep else None
        float_in = [i for i, v in enumerate(node.inputs) if v is not None and v.dtype is not None and v.dtype.is_float]
        if low_pos is None:
            # fp32 node: bring low-precision inputs back to fp32
            for i in float_in:
                v = node.inputs[i]
                if v.dtype == low:
                    node.inputs[i] = cast(v, DType.FLOAT32)
            if float_in:
                reason, detail = keep.get(node.name) or (("control flow", "") if nested else ("op", ""))
                kept_fp32.append(KeptLayer(node.name, node.op, reason, detail))
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
            n = Node("Cast", [v], [orig], {"to": _onnx_code(orig.dtype)}, name=f"cast_out_{counter[0]}",
                     meta={"precision_cast": True})
            orig.producer = n
            new_nodes.append(n)
            outputs.append(orig)
        else:
            outputs.append(v)
    graph.nodes = new_nodes
    graph.outputs = outputs
    return kept_fp32


def lowerable(graph: Graph) -> list[str]:
    """Names of the nodes convert_precision would compute in low precision, in graph order: the
    ones a fidelity or speed choice may keep in fp32."""
    out = []
    for node in graph.nodes:
        if node.op in ("Cast", "CastLike", "Shape", "Size") or any(node.subgraphs()):
            continue
        if _low_positions(node) is not None and any(
                v is not None and v.dtype is not None and v.dtype.is_float for v in node.inputs):
            out.append(node.name)
    return out


# fp32 must be this much faster than the node as built (casts included) to be chosen: timings of
# microsecond kernels move by a few percent between runs, and a switch costs casts elsewhere
SPEED_MARGIN = 1.1


def choose_fp32_for_speed(graph: Graph, node_ms: dict[str, tuple[float, float]],
                          cast_ms: dict[str, float], margin: float = SPEED_MARGIN) -> dict[str, str]:
    """Nodes of a low-precision ``graph`` that make the engine faster if computed in fp32, with the
    times that say so: node -> detail.

    Each node runs at one precision; a value crossing between precisions costs a cast (one kernel
    over the tensor); engine inputs and outputs are fp32. Minimizing the sum of node times (as
    timed by the tuner at each precision) plus casts is a minimum s-t cut (each node on the fp32
    or the low side; an edge's capacity is what it costs when cut), solved exactly. Nodes without
    both timings stay as they are; a cast next to a fusion group is free (it fuses into the group).
    """
    import networkx as nx

    F, L = "@fp32", "@low"
    g = nx.DiGraph()

    def add(u: str, v: str, c: float) -> None:
        if c > 0:
            g.add_edge(u, v, capacity=c + (g[u][v]["capacity"] if g.has_edge(u, v) else 0.0))

    timed = {n for n, (lo, hi) in node_ms.items() if lo >= 0 and hi >= 0}
    for n in timed:
        lo, hi = node_ms[n]
        add(F, n, lo)  # paid if n computes low
        add(n, L, hi * margin)  # paid if n computes in fp32
    fixed32 = {n.name for n in graph.nodes if _is_fp32_compute(n)}

    def source(v: Value) -> Value:  # see through the casts convert_precision made
        while v.producer is not None and v.producer.meta.get("precision_cast"):
            v = v.producer.inputs[0]
        return v

    def side(v: Value) -> "str | None":  # the producer as a labeling node, F if fp32-fixed, None if free
        p = v.producer
        if p is None:
            return F if not v.is_const else None
        if p.name in timed:
            return p.name
        return F if p.name in fixed32 else None

    for node in graph.nodes:
        if node.meta.get("precision_cast"):
            continue
        for v in node.inputs:
            if v is None or v.dtype is None or not v.dtype.is_float:
                continue
            src = source(v)
            cost = cast_ms.get(source_name(src.name), 0.0)
            a, b = side(src), (node.name if node.name in timed else F if node.name in fixed32 else None)
            if a is None or b is None or a == b:
                continue
            if a != F:
                add(b, a, cost)  # a low, b fp32 (or b is F): a cast
            if b != F:
                add(a, b, cost)
    for v in graph.outputs:
        a = side(source(v))
        if a is not None and a != F:
            add(F, a, cast_ms.get(source_name(source(v).name), 0.0))
    if F not in g or L not in g:
        return {}
    all_low = sum(d["capacity"] for _, _, d in g.out_edges(F, data=True))  # the cut with every node low
    cut, (fp32_side, _) = nx.minimum_cut(g, F, L)
    chosen = {n for n in fp32_side if n in timed}
    if not chosen or cut >= all_low:
        return {}
    return {n: f"fp32 {node_ms[n][1] * 1e3:.1f} us vs {node_ms[n][0] * 1e3:.1f} us as built" for n in sorted(chosen)}


def source_name(name: str) -> str:
    """The value a precision cast or a renamed output came from: 'x:float16' -> 'x'."""
    for dt in (DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32):
        if name.endswith(":" + dt.value):
            return name[: -len(dt.value) - 1]
    return name


def _is_fp32_compute(node: Node) -> bool:
    """A node that reads float inputs and none in low precision."""
    fl = [v for v in node.inputs if v is not None and v.dtype is not None and v.dtype.is_float]
    return bool(fl) and all(v.dtype == DType.FLOAT32 for v in fl)


def _onnx_code(dt: DType) -> int:
    from ..ir.dtypes import DTYPE_TO_ONNX

    return DTYPE_TO_ONNX[dt]
