"""The one rewrite mechanism every pass uses: patterns over values, rules, and a graph editor.

A pattern describes the producer tree of a value (tinygrad's UPat, for an SSA graph):

    P("Mul", P.any("x"), P("Sigmoid", P.any("x")))        # x * sigmoid(x), the same x twice

``P(op, *inputs, name=..., where=...)`` matches a value produced by a node of ``op`` (a name or a
tuple of names) whose inputs match ``inputs`` in order; commutative ops (Add, Mul) also try their
two inputs swapped. ``P.any(name)`` matches any value; ``P.const(name)`` a constant. A name binds
the value; using a name twice requires the same value. ``where(value, match)`` is an extra test.

A :class:`Rule` pairs a pattern with a function ``fn(editor, match) -> Value | None`` that builds
the replacement through the :class:`Editor` and returns it (None: no rewrite). :func:`apply_rules`
visits nodes in order, tries every rule rooted at each node's first output, and rewires the uses.
Nodes left without users are removed at the end by dead-code elimination.

After a rule fires, the rules are tried again on the replacement (a rewrite's result is
rewritten until no rule matches, as tinygrad's graph_rewrite does), so chains collapse in one
sweep. Small constants are hash-consed: the editor reads every small constant through the first
equal one visible in its scope (and ``Editor.const`` returns it instead of a copy), so exporters'
repeated axes and scalars are one value, which CSE and patterns that bind a name twice need.

Rules apply in If/Loop/Scan bodies too (ONNX Runtime's transformers must "Recurse for all valid
Nodes"): :func:`apply_rules` sweeps every body, innermost first, then the graph. An editor edits
one graph, and a pattern matches only that graph's nodes: a value a body reads from an enclosing
graph is a leaf there, like an input (a body may read an outer constant's data, never rewrite or
remove the outer node). Uses count what bodies capture (see scope.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from ..ir.dtypes import from_numpy
from ..ir.graph import Graph, Node, Value
from ..ops.infer import infer_node
from .scope import eliminate_dead_nodes, reads, remove_unused_initializers, scopes, tree_names

__all__ = ["COMMUTATIVE", "Editor", "Match", "P", "PassContext", "Rule", "apply_rules", "eliminate_dead_nodes",
           "remove_unused_initializers"]

COMMUTATIVE = {"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal"}
SMALL_CONST_BYTES = 1 << 12  # constants up to this size are hash-consed (equal ones become one value)
MAX_REWRITES_PER_NODE = 8  # a rewrite's result is rewritten again at most this often (rules that undo each other)


def const_key(v: Optional[Value]) -> Optional[tuple]:
    """What makes two small constants the same value; None for activations and large weights.
    (The IR dtype tells bfloat16 and the float8 kinds apart, which numpy stores alike.)"""
    if v is None or v.data is None or v.data.nbytes > SMALL_CONST_BYTES:
        return None
    return (v.dtype, v.data.dtype.str, v.data.shape, v.data.tobytes())


class Match(dict):
    """name -> Value, plus the nodes the pattern walked through (``match.nodes``).

    ``local``: ids of the nodes a pattern may walk through (the edited graph's); None: any node.
    """

    def __init__(self, *a: Any, local: Optional[set[int]] = None, **kw: Any):
        super().__init__(*a, **kw)
        self.nodes: list[Node] = []
        self.local = local

    def node(self, name: str) -> Node:
        n = self[name].producer
        assert n is not None
        return n

    def const(self, name: str) -> np.ndarray:
        return self[name].data

    def copy(self) -> "Match":
        m = Match(self, local=self.local)
        m.nodes = list(self.nodes)
        return m


Where = Callable[[Value, Match], bool]


@dataclass
class P:
    op: Union[str, tuple[str, ...], None]
    inputs: tuple["P", ...]
    name: Optional[str] = None
    where: Optional[Where] = None
    is_const: bool = False
    alternatives: tuple["P", ...] = ()
    # allow extra trailing inputs (optional ones left unmatched)
    open_inputs: bool = False

    def __init__(self, op: Union[str, tuple[str, ...], None] = None, *inputs: "P", name: Optional[str] = None,
                 where: Optional[Where] = None, open_inputs: bool = False):
        self.op = op
        self.inputs = inputs
        self.name = name
        self.where = where
        self.is_const = False
        self.alternatives = ()
        self.open_inputs = open_inputs

    @staticmethod
    def any(name: Optional[str] = None, where: Optional[Where] = None) -> "P":
        return P(None, name=name, where=where)

    @staticmethod
    def const(name: Optional[str] = None, where: Optional[Where] = None) -> "P":
        p = P(None, name=name, where=where)
        p.is_const = True
        return p

    @staticmethod
    def one_of(*alternatives: "P", name: Optional[str] = None) -> "P":
        p = P(None, name=name)
        p.alternatives = alternatives
        return p

    def match(self, v: Optional[Value], m: Match) -> Iterator[Match]:
        """Every way this pattern matches ``v`` extending ``m`` (backtracking)."""
        if v is None:
            return
        if self.alternatives:
            for alt in self.alternatives:
                for m2 in alt.match(v, m):
                    yield from self._bind(v, m2)
            return
        if self.op is None:
            if self.is_const and not v.is_const:
                return
            yield from self._bind(v, m)
            return
        node = v.producer
        if node is None or v is not node.outputs[0] or (m.local is not None and id(node) not in m.local):
            return  # (a value from an enclosing graph is a leaf: its node is not ours to rewrite)
        ops = (self.op,) if isinstance(self.op, str) else self.op
        if node.op not in ops:
            return
        n_in = len(node.inputs)
        if n_in < len(self.inputs) or (n_in > len(self.inputs) and not self.open_inputs
                                       and any(x is not None for x in node.inputs[len(self.inputs):])):
            return
        orders = [node.inputs[: len(self.inputs)]]
        if node.op in COMMUTATIVE and len(self.inputs) == 2:
            orders.append([node.inputs[1], node.inputs[0]])
        for ins in orders:
            base = m.copy()
            base.nodes.append(node)
            for m2 in self._match_inputs(list(ins), 0, base):
                yield from self._bind(v, m2)

    def _match_inputs(self, ins: list[Optional[Value]], i: int, m: Match) -> Iterator[Match]:
        if i == len(self.inputs):
            yield m
            return
        for m2 in self.inputs[i].match(ins[i], m):
            yield from self._match_inputs(ins, i + 1, m2)

    def _bind(self, v: Value, m: Match) -> Iterator[Match]:
        if self.name is not None:
            if self.name in m and m[self.name] is not v:
                return
            m = m.copy()
            m[self.name] = v
        if self.where is not None and not self.where(v, m):
            return
        yield m


@dataclass
class Rule:
    """A pattern and what to build in its place. ``name`` says what it does in pass logs."""

    name: str
    pattern: P
    build: Callable[["Editor", Match], Optional[Value]]
    # patterns whose inner nodes must have no other users (else the rewrite duplicates work)
    exclusive: bool = True


class Editor:
    """Edits one graph in place while keeping a use map and topological order up to date.

    ``names``: every name taken in the whole tree of graphs (shared by the editors of one sweep),
    so a new value never takes the name of a value in an enclosing graph or a body.
    ``enclosing``: the graphs around ``graph`` (outermost first), whose constants it can read.
    """

    def __init__(self, graph: Graph, names: Optional[set[str]] = None, enclosing: tuple[Graph, ...] = ()):
        self.graph = graph
        self.constants: dict[tuple, Value] = {}  # const_key -> the first such constant visible here
        self._duplicate_of: dict[int, Value] = {}  # id of a later equal constant -> that first one
        for g in (*enclosing, graph):
            for c in g.initializers.values():
                k = const_key(c)
                if k is not None and self.constants.setdefault(k, c) is not c:
                    self._duplicate_of[id(c)] = self.constants[k]
        self.uses: dict[int, list[Node]] = {}
        self._pending: list[Node] = []
        self._names = names if names is not None else tree_names(graph)
        self._outputs = {id(v) for v in graph.outputs}
        self._counter = 0
        self.removed: set[int] = set()
        self.local: set[int] = {id(n) for n in graph.nodes}  # the nodes this editor may rewrite
        self.position = {id(n): i for i, n in enumerate(graph.nodes)}  # order at the sweep's start
        for n in graph.nodes:
            self._add_uses(n)

    # -- queries ------------------------------------------------------------------------------------
    def users(self, v: Value) -> list[Node]:
        """Nodes of this graph that read ``v`` (directly, or through a body nested in them)."""
        return self.uses.get(id(v), [])

    def is_output(self, v: Value) -> bool:
        return id(v) in self._outputs

    def producer(self, v: Optional[Value]) -> Optional[Node]:
        """The node of this graph (or emitted into it) that computes ``v``; None for inputs,
        constants and values of an enclosing graph."""
        n = v.producer if v is not None else None
        if n is None or (id(n) not in self.local and not any(n is p for p in self._pending)):
            return None
        return n

    def single_use(self, v: Value) -> bool:
        """``v`` is computed here and read by exactly one node (an outer value may have other users)."""
        return self.producer(v) is not None and len(self.users(v)) == 1 and not self.is_output(v)

    def match(self) -> Match:
        """An empty match confined to this graph's nodes."""
        return Match(local=self.local)

    def only_used_inside(self, m: Match, root: Node) -> bool:
        """Every intermediate value of the match is used only by nodes of the match."""
        inside = {id(n) for n in m.nodes}
        for n in m.nodes:
            if n is root:
                continue
            for o in n.outputs:
                if self.is_output(o) or any(id(u) not in inside for u in self.users(o)):
                    return False
        return True

    # -- building ----------------------------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        name = hint
        while name in self._names:
            self._counter += 1
            name = f"{hint}__{self._counter}"
        self._names.add(name)
        return name

    def emit(self, op: str, inputs: list[Optional[Value]], attrs: Optional[dict[str, Any]] = None,
             name: str = "", num_outputs: int = 1, meta: Optional[dict[str, Any]] = None) -> Node:
        """A new node, placed before the node being rewritten, with its output types inferred."""
        base = name or op.lower().replace(".", "_")
        outs = [Value(self.fresh_name(base if num_outputs == 1 else f"{base}:{i}")) for i in range(num_outputs)]
        node = Node(op, list(inputs), outs, dict(attrs or {}), outs[0].name, dict(meta or {}))
        for o in outs:
            o.producer = node
        infer_node(node)
        self._pending.append(node)
        return node

    def out(self, op: str, inputs: list[Optional[Value]], attrs: Optional[dict[str, Any]] = None,
            name: str = "", like: Optional[Value] = None) -> Value:
        """emit() for a one-output node; ``like`` gives dtype/shape when inference cannot."""
        o = self.emit(op, inputs, attrs, name).outputs[0]
        if like is not None:
            o.dtype = o.dtype or like.dtype
            o.shape = o.shape if o.shape is not None else like.shape
        return o

    def adopt(self, nodes: list[Node]) -> None:
        """Place existing nodes (a body being inlined) before the node being rewritten, as emit() does.
        Their names are already unique in the tree."""
        self._pending.extend(nodes)

    def const(self, data: np.ndarray, hint: str = "const") -> Value:
        """A constant holding ``data``: an equal small one already visible here, else a new initializer."""
        data = np.asarray(data)
        if not data.flags.c_contiguous:  # (not ascontiguousarray: it turns 0-d scalars into 1-d)
            data = data.copy()
        k = const_key(Value("", from_numpy(data.dtype), data=data))
        if k is not None and k in self.constants:
            return self.constants[k]
        v = self.graph.add_const(self.fresh_name(hint), data)
        if k is not None:
            self.constants[k] = v
        return v

    def intern_inputs(self, node: Node) -> bool:
        """Make ``node`` read the first visible constant equal to each small constant it reads; every
        use of a duplicate in this graph moves at once. Returns whether anything moved."""
        moved = False
        for v in node.inputs:
            first = self._duplicate_of.get(id(v)) if v is not None else None
            if first is not None and not self.is_output(v):
                self.replace(v, first)
                moved = True
        return moved

    # -- rewiring ----------------------------------------------------------------------------------
    def replace(self, old: Value, new: Value) -> None:
        """Every use of ``old`` reads ``new``; a graph output keeps its name."""
        if old is new:
            return
        for n in list(self.users(old)):
            n.inputs = [new if x is old else x for x in n.inputs]
            for sg in n.subgraphs():
                replace_in_graph(sg, old, new)
            self.uses.setdefault(id(new), []).append(n)
        self.uses.pop(id(old), None)
        if self.is_output(old):
            self._rename_output(old, new)

    def _rename_output(self, old: Value, new: Value) -> None:
        produced_here = self.producer(new) is not None and not self.is_output(new)
        if produced_here and new not in self.graph.inputs:
            new.name, old.name = old.name, self.fresh_name(old.name + ".replaced")
            self.graph.outputs = [new if v is old else v for v in self.graph.outputs]
        else:  # an input or constant (or another output) cannot take the name: copy it
            node = Node("Identity", [new], [Value(old.name, old.dtype, old.shape)], {}, old.name)
            node.outputs[0].producer = node
            old.name = self.fresh_name(old.name + ".replaced")
            self._pending.append(node)
            self.graph.outputs = [node.outputs[0] if v is old else v for v in self.graph.outputs]
        self._outputs = {id(v) for v in self.graph.outputs}

    def flush(self, before: Node) -> None:
        """Place the nodes emitted so far just before ``before``."""
        if not self._pending:
            return
        idx = self.graph.nodes.index(before)
        self.graph.nodes[idx:idx] = self._pending
        for n in self._pending:
            self._add_uses(n)
            self.local.add(id(n))
        self._pending = []

    def remove(self, node: Node) -> None:
        self.graph.nodes.remove(node)
        self._drop_uses(node)
        self.removed.add(id(node))
        self.local.discard(id(node))

    def remove_if_dead(self, nodes: list[Node]) -> None:
        """Remove those of ``nodes`` whose outputs nobody reads (consumers first, then their producers)."""
        progress = True
        while progress:
            progress = False
            for n in nodes:
                if id(n) in self.local and not any(self.users(o) or self.is_output(o) for o in n.outputs):
                    self.remove(n)
                    progress = True

    def _add_uses(self, n: Node) -> None:
        for v in reads(n):
            lst = self.uses.setdefault(id(v), [])
            if n not in lst:  # (Node compares by identity)
                lst.append(n)

    def _drop_uses(self, n: Node) -> None:
        for v in reads(n):
            if id(v) in self.uses:
                self.uses[id(v)] = [u for u in self.uses[id(v)] if u is not n]


def replace_in_graph(g: Graph, old: Value, new: Value) -> None:
    """Every read of ``old`` in ``g`` (its nodes, its bodies, its outputs) reads ``new``."""
    for n in g.nodes:
        n.inputs = [new if x is old else x for x in n.inputs]
        for sg in n.subgraphs():
            replace_in_graph(sg, old, new)
    g.outputs = [new if x is old else x for x in g.outputs]


def apply_rules(graph: Graph, rules: list[Rule], log: Optional[list[str]] = None) -> bool:
    """One sweep of ``rules`` over the nodes of every body (innermost first) and then of ``graph``,
    each in order, then dead-code removal. Returns whether anything changed."""
    by_op: dict[Optional[str], list[Rule]] = {}
    for r in rules:
        ops = r.pattern.op if isinstance(r.pattern.op, tuple) else (r.pattern.op,)
        for o in ops:
            by_op.setdefault(o, []).append(r)
    names = tree_names(graph)
    changed = False
    for g, enclosing in scopes(graph):
        changed |= _sweep(Editor(g, names, enclosing), by_op, log)
    if changed:
        eliminate_dead_nodes(graph)
        remove_unused_initializers(graph)  # (constants that became duplicates or were folded away)
    return changed


def _sweep(ed: Editor, by_op: dict[Optional[str], list[Rule]], log: Optional[list[str]]) -> bool:
    changed = False
    for node in list(ed.graph.nodes):
        if id(node) in ed.removed or not node.outputs:  # removed by an earlier rewrite
            continue
        changed |= ed.intern_inputs(node)
        for _ in range(MAX_REWRITES_PER_NODE):
            new = next((v for rule in by_op.get(node.op, []) + by_op.get(None, [])
                        if (v := _try_rule(ed, rule, node.outputs[0], node, log)) is not None), None)
            if new is None:
                break
            changed = True
            nxt = ed.producer(new)  # rewrite the result again, until no rule matches
            if nxt is None or nxt is node or id(nxt) in ed.removed or not nxt.outputs or nxt.outputs[0] is not new:
                break
            node = nxt
    return changed


def _try_rule(ed: Editor, rule: Rule, root: Value, node: Node, log: Optional[list[str]]) -> Optional[Value]:
    for m in rule.pattern.match(root, ed.match()):
        if rule.exclusive and not ed.only_used_inside(m, node):
            continue
        new = rule.build(ed, m)
        if new is None or new is root or (ed.is_output(root) and (ed.producer(new) is None or ed.is_output(new))):
            # (an output that would become an input, a constant or an outer value keeps its node:
            # the name must stay, and an Identity in its place would be rewritten again and again)
            ed._pending = []
            continue
        created = {id(n) for n in ed._pending}
        if new.dtype is None:
            new.dtype = root.dtype
        if new.shape is None:
            new.shape = root.shape
        ed.flush(node)
        if new.producer is not None and id(new.producer) in created:
            new.producer.name = node.name  # the node doing the work keeps the name users know
            _keep_name(ed, root, new)
        ed.replace(root, new)
        ed.flush(node)
        ed.remove_if_dead(m.nodes)
        if log is not None:
            log.append(f"{rule.name}: {node.name}")
        return new
    return None


def _keep_name(ed: Editor, old: Value, new: Value) -> None:
    """The replacement takes the replaced value's name, so values keep their ONNX names."""
    if new.producer is None or ed.is_output(old) or ed.is_output(new) or new.name == old.name:
        return
    taken = old.name
    old.name = ed.fresh_name(old.name + ".old")
    new.name = taken


@dataclass
class PassContext:
    """What a pass may read besides the graph: the level, debug mode, limits, and a log."""

    opt_level: int = 2
    debug: bool = False
    max_fold_bytes: int = 1 << 22  # constant folding never creates a tensor larger than this (4 MiB) ...
    log: list[str] = field(default_factory=list)
