"""Control flow with a constant condition: an If whose condition is known at build time is its branch.

Under static shapes (``--shapes``) exporters' conditions such as ``Shape(x)[1] == 512`` or
``Shape(state)[1] > 0`` fold to constants, and the If becomes dead weight: the interpreter would
enter a body for nothing, and passes could not fuse across its boundary. ONNX Runtime's constant
folding inlines such an If; so does this rule.

Inlining moves the chosen branch's nodes and initializers into the enclosing graph, in front of
the If (value names are unique across the whole tree, so nothing is renamed). What the branch
read from enclosing scopes, the enclosing graph can read too; bodies nested in the branch keep
capturing the same values. The If's outputs become the branch's outputs.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..ir.graph import Graph, Value
from .rewrite import Editor, Match, P, Rule


def _inline_if(ed: Editor, m: Match) -> Optional[Value]:
    node = m.node("y")
    cond = np.asarray(m.const("c"))
    if cond.size != 1:
        return None  # malformed: the run reports it with the node's name
    branch = node.attrs.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
    if not isinstance(branch, Graph) or branch.inputs or len(branch.outputs) != len(node.outputs):
        return None
    moved = {id(n) for n in branch.nodes}
    ed.adopt(list(branch.nodes))
    ed.graph.initializers.update(branch.initializers)
    results: list[Value] = []
    for o, b in zip(node.outputs, branch.outputs):
        if ed.is_output(o) and (b.producer is None or id(b.producer) not in moved or b in results):
            # the graph's output keeps its name: a constant, an outer value or a value given twice
            # is passed through an Identity of that name
            b = ed.out("Identity", [b], name=o.name, like=o)
        if b.dtype is None:
            b.dtype = o.dtype
        if b.shape is None:
            b.shape = o.shape
        results.append(b)
    for o, b in zip(node.outputs[1:], results[1:]):
        if b.producer is not None and id(b.producer) in moved and not ed.is_output(o):
            o.name, b.name = ed.fresh_name(o.name + ".old"), o.name  # the value keeps the If output's name
        ed.replace(o, b)
    return results[0]


INLINE_IF_RULE = Rule("inline_constant_if", P("If", P.const("c"), name="y"), _inline_if, exclusive=False)
