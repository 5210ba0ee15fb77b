"""Reduced precision in the builder: which layers a reduced-precision engine keeps in fp32 for speed.

The conversion itself is a rule set of the pass pipeline (passes/precision.py: each op's compute
type comes from its definition); this module weighs the tuner's timings of each layer in both
precisions, casts included (:func:`choose_fp32_for_speed`).
"""
from __future__ import annotations



from ..ir.dtypes import DType
from ..ir.graph import Graph, Node, Value
from ..passes.precision import KeptLayer, convert_precision, lowerable, source_name  # noqa: F401  (re-exported)

OP_REASONS = {"op": "its op stays fp32 (overflow-prone or no low-precision rule)",
              "control flow": "If/Loop/Scan bodies stay fp32"}


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


def _is_fp32_compute(node: Node) -> bool:
    """A node that reads float inputs and none in low precision."""
    fl = [v for v in node.inputs if v is not None and v.dtype is not None and v.dtype.is_float]
    return bool(fl) and all(v.dtype == DType.FLOAT32 for v in fl)
