"""Control flow: an If with a constant condition is its branch; a loop value that never changes is an
outer value.

**Constant If.**

Under static shapes (``--shapes``) exporters' conditions such as ``Shape(x)[1] == 512`` or
``Shape(state)[1] > 0`` fold to constants, and the If becomes dead weight: the interpreter would
enter a body for nothing, and passes could not fuse across its boundary. ONNX Runtime's constant
folding inlines such an If; so does this rule.

Inlining moves the chosen branch's nodes and initializers into the enclosing graph, in front of
the If (value names are unique across the whole tree, so nothing is renamed). What the branch
read from enclosing scopes, the enclosing graph can read too; bodies nested in the branch keep
capturing the same values. The If's outputs become the branch's outputs.

**Loop invariants.** A Loop-carried value (or a Scan state) whose body passes it through unchanged
(body output is the body input) is the initial value in every iteration and after the last one.
Exporters carry weights this way (tf2onnx's Keras LSTM passes its kernels through the while
loop), which hides them from every pass inside the body: there they are inputs, not constants.
The rule drops such values from the loop's interface; the body reads the initial value from the
enclosing scope instead (a constant there folds into a GEMM), and the loop's output for it is the
initial value.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..ir.graph import Graph, Value
from .rewrite import Editor, Match, P, PassContext, Rule, apply_rules, replace_in_graph


def _for_output(ed: Editor, old: Value, new: Value, made: set[int], given: list[Value]) -> Value:
    """``new`` replaces ``old``. A graph output keeps its name, so when ``new`` is not computed by a node
    this rewrite made (a constant, an input, an outer value, or a value already given for another
    output), it passes through an Identity that takes the name."""
    if ed.is_output(old) and (new.producer is None or id(new.producer) not in made or new in given):
        return ed.out("Identity", [new], name=old.name, like=old)
    return new


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
        b = _for_output(ed, o, b, moved, results)
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


def _through_identities(v: Value) -> Value:
    while v.producer is not None and v.producer.op == "Identity" and v.producer.inputs[0] is not None:
        v = v.producer.inputs[0]
    return v


def _forward_invariants(ed: Editor, m: Match) -> Optional[Value]:
    node = m.node("y")
    body = node.attrs.get("body")
    if not isinstance(body, Graph):
        return None
    # where the carried values sit: (first node input, first body input, first body output, count)
    if node.op == "Loop":
        first_in, first_body_in, first_body_out, count = 2, 2, 1, len(node.inputs) - 2
    else:  # Scan: the states come first
        count = len(node.inputs) - node.attrs.get("num_scan_inputs", 0)
        first_in, first_body_in, first_body_out = 0, 0, 0
    if len(body.inputs) < first_body_in + count or len(body.outputs) < first_body_out + count:
        return None
    invariant = []
    for j in range(count):
        b_in, init_v = body.inputs[first_body_in + j], node.inputs[first_in + j]
        if init_v is None or init_v.kind != "tensor" or _through_identities(body.outputs[first_body_out + j]) is not b_in:
            continue
        if sum(1 for o in body.outputs if _through_identities(o) is b_in) == 1:
            invariant.append(j)  # (read by another output, it would become a body output read from outside)
    if not invariant:
        return None
    for j in reversed(invariant):  # the body reads the initial value from the enclosing scope
        b_in, init_v = body.inputs[first_body_in + j], node.inputs[first_in + j]
        del body.outputs[first_body_out + j]
        del body.inputs[first_body_in + j]
        replace_in_graph(body, b_in, init_v)
    keep = [j for j in range(count) if j not in invariant]
    inputs = list(node.inputs[:first_in]) + [node.inputs[first_in + j] for j in keep] + \
        list(node.inputs[first_in + count:])
    new = ed.emit(node.op, inputs, dict(node.attrs), name=node.name, num_outputs=len(node.outputs) - len(invariant))
    results: dict[int, Value] = {id(node.outputs[j]): node.inputs[first_in + j] for j in invariant}
    for o, n in zip([o for j, o in enumerate(node.outputs) if j not in invariant], new.outputs):
        n.dtype, n.kind = o.dtype or n.dtype, o.kind
        n.shape = o.shape if o.shape is not None else n.shape
        results[id(o)] = n
    root = node.outputs[0]
    for o in node.outputs[1:]:
        n = results[id(o)]
        if n.producer is new and not ed.is_output(o):
            o.name, n.name = ed.fresh_name(o.name + ".old"), o.name  # the value keeps its name
        ed.replace(o, n)
    # (an output gets an Identity rather than an input or constant, which the engine would decline
    # after the body has changed)
    return _for_output(ed, root, results[id(root)], {id(new)}, [])


FORWARD_INVARIANTS_RULE = Rule("forward_loop_invariants", P(("Loop", "Scan"), name="y", open_inputs=True),
                               _forward_invariants, exclusive=False)


def simplify_control_flow(graph: Graph, ctx: PassContext) -> bool:
    """An If with a constant condition becomes its branch; loop values that never change become outer values."""
    return apply_rules(graph, [INLINE_IF_RULE, FORWARD_INVARIANTS_RULE], ctx.log)
