"""Fusion groups: pointwise chains and row reductions the CUDA backend compiles into one kernel each.

A group grows backwards from a sink (a pointwise op or a last-axis reduction) over producers
whose every user is already in the group, so a group is a tree with one exit and merging can
never create a cycle. All values of a group broadcast into one iteration domain: the sink's
shape, or the input row shape of the group's reduction (every reduction of a group reduces the
same rows). Groups of one node are not marked. The group id goes in ``node.meta["group"]``.

Bodies of If/Loop/Scan get groups of their own (ids unique across the tree); a group never
reaches across a body's boundary into the enclosing graph.
"""
from __future__ import annotations

from typing import Optional

from ..ir.graph import Graph, Node
from ..ir.shapes import broadcast_shapes
from ..ops import get, known_ops
from .patterns import _reduce_axes
from .rewrite import Editor, PassContext
from .scope import graphs_postorder, tree_names


def _kind(n: Node) -> str:
    return get(n.op).kind if n.op in known_ops() else "other"


def row_reduction(n: Node) -> bool:
    """A reduction over the last axis only (softmax, norms, ReduceX over axis -1)."""
    if _kind(n) != "reduction" or not n.inputs or n.inputs[0] is None or n.inputs[0].shape is None:
        return False
    rank = len(n.inputs[0].shape)
    if "axis" in n.attrs or n.op in ("Softmax", "LogSoftmax", "LayerNormalization", "RMSNormalization"):
        return n.attrs.get("axis", -1) in (-1, rank - 1)
    axes = _reduce_axes(n)
    return axes == [rank - 1]


def _fusible(n: Node) -> bool:
    if len(n.outputs) != 1 or n.outputs[0].shape is None or n.outputs[0].kind != "tensor":
        return False
    return _kind(n) == "pointwise" or row_reduction(n)


def _fits(shape, domain) -> bool:
    try:
        return tuple(broadcast_shapes(tuple(shape), tuple(domain))) == tuple(domain)
    except ValueError:
        return False


class _Group:
    def __init__(self, sink: Node):
        self.nodes = [sink]
        self.ids = {id(sink)}
        self.row: Optional[tuple] = tuple(sink.inputs[0].shape) if row_reduction(sink) else None
        self.domain = self.row if self.row is not None else tuple(sink.outputs[0].shape)

    def admit(self, p: Node) -> bool:
        out = p.outputs[0].shape
        if row_reduction(p):
            row = tuple(p.inputs[0].shape)
            if self.row is not None:
                return row == self.row and _fits(out, self.domain)
            if not _fits(self.domain, row) or not _fits(out, row):
                return False
            self.row = self.domain = row
            return True
        return _fits(out, self.domain)


def group_fusions(graph: Graph, ctx: PassContext) -> bool:
    """Mark fusion groups in node.meta['group'], in the graph and every body. Returns whether any exists."""
    names = tree_names(graph)
    count = 0
    for g in graphs_postorder(graph):
        count = _group(g, Editor(g, names), count)
    if count:
        ctx.log.append(f"group_fusions: {count} groups")
    return count > 0


def _group(graph: Graph, ed: Editor, count: int) -> int:
    """Groups of one graph, numbered from ``count``. Returns the next free number."""
    for n in graph.nodes:
        n.meta.pop("group", None)
    grouped: set[int] = set()
    for sink in reversed(graph.nodes):
        if id(sink) in grouped or not _fusible(sink):
            continue
        g = _Group(sink)
        work = [sink]
        while work:
            n = work.pop()
            for v in n.inputs:
                p = ed.producer(v)
                if p is None or id(p) in grouped or id(p) in g.ids or not _fusible(p):
                    continue
                if ed.is_output(p.outputs[0]) or not all(id(u) in g.ids for u in ed.users(p.outputs[0])):
                    continue
                if not g.admit(p):
                    continue
                g.nodes.append(p)
                g.ids.add(id(p))
                work.append(p)
        grouped |= g.ids
        if len(g.nodes) > 1:
            gid = f"fg{count}"
            count += 1
            for n in g.nodes:
                n.meta["group"] = gid
    return count


def count_kernels(graph: Graph) -> int:
    """Nodes of the graph, a fusion group counted once (a node with bodies counts as one)."""
    groups = {n.meta["group"] for n in graph.nodes if "group" in n.meta}
    return sum(1 for n in graph.nodes if "group" not in n.meta) + len(groups)
