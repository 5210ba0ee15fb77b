"""Scopes: a graph and the If/Loop/Scan bodies nested in it, as every pass sees them.

A body is a Graph attribute of its node. Its nodes may read values of any enclosing graph by
reference (ONNX outer-scope capture): the same Value object, no copy, no input. So a value of a
graph is used by a node when the node reads it, or when any body nested in the node reads it.
Constants count too: an initializer of the main graph read only inside an If branch is in use.

Passes work on one graph at a time (its nodes only) and visit every graph of the tree through
``graphs_postorder``: bodies first, so a graph is rewritten after what its bodies read has
settled. Value names are unique across the whole tree (the runtime and the engine file key
values by name), so new names are drawn from ``tree_names``.
"""
from __future__ import annotations

from typing import Iterator, Optional

from ..errors import GraphError
from ..ir.graph import Graph, Node, Value


def nested_graphs(graph: Graph) -> Iterator[Graph]:
    """Every body nested in ``graph``, at any depth (not ``graph`` itself), outer bodies first."""
    for n in graph.nodes:
        for sg in n.subgraphs():
            yield sg
            yield from nested_graphs(sg)


def graphs_postorder(graph: Graph) -> list[Graph]:
    """The bodies of ``graph`` (innermost first), then ``graph``."""
    return [g for g, _ in scopes(graph)]


def scopes(graph: Graph, enclosing: tuple[Graph, ...] = ()) -> list[tuple[Graph, tuple[Graph, ...]]]:
    """Each graph of the tree with the graphs enclosing it (outermost first), bodies before their graph."""
    out: list[tuple[Graph, tuple[Graph, ...]]] = []
    for n in graph.nodes:
        for sg in n.subgraphs():
            out.extend(scopes(sg, enclosing + (graph,)))
    out.append((graph, enclosing))
    return out


def captures(graph: Graph) -> list[Value]:
    """Values ``graph`` (or a body nested in it) reads from enclosing graphs, constants included."""
    defined: set[int] = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for n in graph.nodes:
        defined.update(id(o) for o in n.outputs)
    seen: dict[int, Value] = {}
    for v in [r for n in graph.nodes for r in reads(n)] + list(graph.outputs):
        if id(v) not in defined:
            seen.setdefault(id(v), v)
    return list(seen.values())


def reads(node: Node) -> list[Value]:
    """What ``node`` reads: its inputs, and what its bodies capture."""
    out = [v for v in node.inputs if v is not None]
    if node.attrs:  # (only nodes with attributes can hold a body)
        for sg in node.subgraphs():
            out.extend(captures(sg))
    return out


def tree_names(graph: Graph) -> set[str]:
    """Names of every value of ``graph`` and its bodies."""
    names = {v.name for v in graph.values()}
    for sg in nested_graphs(graph):
        names.update(v.name for v in sg.values())
    return names


# -- dead code ----------------------------------------------------------------------------------------
def _dead_nodes_of(graph: Graph) -> bool:
    used: set[int] = {id(v) for v in graph.outputs}
    keep: list[Node] = []
    for n in reversed(graph.nodes):
        if any(id(o) in used for o in n.outputs):
            keep.append(n)
            used.update(id(v) for v in reads(n))
    removed = len(keep) != len(graph.nodes)
    graph.nodes = keep[::-1]
    return removed


def eliminate_dead_nodes(graph: Graph) -> bool:
    """Remove nodes none of whose outputs is used, in every body and then in ``graph`` (the IR is
    side-effect free). A value only a body reads is used by the body's node, so it stays."""
    changed = False
    for g in graphs_postorder(graph):
        changed |= _dead_nodes_of(g)
    return changed


def remove_unused_initializers(graph: Graph) -> bool:
    """Drop initializers no node of their graph, no body nested in it, and no output reads."""
    changed = False
    for g in graphs_postorder(graph):
        used: set[int] = {id(v) for v in g.outputs}
        for n in g.nodes:
            used.update(id(v) for v in reads(n))
        dead = [k for k, v in g.initializers.items() if id(v) not in used]
        for k in dead:
            del g.initializers[k]
        changed |= bool(dead)
    return changed


# -- checking ---------------------------------------------------------------------------------------
def check_scopes(graph: Graph, visible: Optional[set[int]] = None) -> None:
    """Raise GraphError if a node reads a value that neither its graph nor an enclosing one defines
    before it. Unlike ``ir.verify`` this holds constants to the rule too: a constant read in a body
    must be an initializer of the body or of an enclosing graph, or the engine file loses it."""
    defined = set(visible or ()) | {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}

    def check(v: Value, who: str) -> None:
        if id(v) in defined:
            return
        why = ("it is a constant that no enclosing graph holds as an initializer (a pass dropped it)"
               if v.is_const else "it is not defined in this graph or an enclosing one before this point")
        raise GraphError(f"graph '{graph.name}': {who} reads '{v.name}', but {why}")

    for n in graph.nodes:
        for v in n.inputs:
            if v is not None:
                check(v, f"node '{n.name}' ({n.op})")
        for sg in n.subgraphs():
            check_scopes(sg, defined)
        defined.update(id(o) for o in n.outputs)
    for v in graph.outputs:
        check(v, "the graph's output list")
