"""Graph verifier: single assignment, topological order, no dangling values, known ops, types."""
from __future__ import annotations

from ..errors import GraphError
from .graph import Graph, Value


def verify(graph: Graph, known_ops: "set[str] | None" = None, _outer: "set[int] | None" = None) -> None:
    """Raise GraphError naming the first problem found."""
    defined: set[int] = set(_outer or ())
    names: dict[str, Value] = {}

    def define(v: Value, what: str) -> None:
        if id(v) in defined and _outer is not None and id(v) in _outer:
            raise GraphError(f"graph '{graph.name}': {what} '{v.name}' shadows a value of an enclosing graph")
        if id(v) in defined:
            raise GraphError(f"graph '{graph.name}': value '{v.name}' is assigned twice ({what})")
        if v.name in names and names[v.name] is not v:
            raise GraphError(f"graph '{graph.name}': two different values are named '{v.name}'")
        names[v.name] = v
        defined.add(id(v))

    for v in graph.inputs:
        define(v, "input")
    for name, v in graph.initializers.items():
        if v.data is None:
            raise GraphError(f"graph '{graph.name}': initializer '{name}' has no data")
        define(v, "initializer")
    for node in graph.nodes:
        if known_ops is not None and node.op not in known_ops:
            raise GraphError(f"node '{node.name}': op '{node.op}' is not in the op registry")
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined and not v.is_const:
                raise GraphError(
                    f"node '{node.name}' ({node.op}): input {i} '{v.name}' is used before it is defined "
                    "(graph not in topological order, or the value dangles)")
        for sg in node.subgraphs():
            verify(sg, known_ops, defined)
        for o in node.outputs:
            if o.producer is not node:
                raise GraphError(f"node '{node.name}': output '{o.name}' does not point back to its producer")
            define(o, f"output of node '{node.name}'")
    for v in graph.outputs:
        if id(v) not in defined and not v.is_const:
            raise GraphError(f"graph '{graph.name}': output '{v.name}' is never produced")
