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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ops.infer import infer_node

COMMUTATIVE = {"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal"}


class Match(dict):
    """name -> Value, plus the nodes the pattern walked through (``match.nodes``)."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.nodes: list[Node] = []

    def node(self, name: str) -> Node:
        n = self[name].producer
        assert n is not None
        return n

    def const(self, name: str) -> np.ndarray:
        return self[name].data

    def copy(self) -> "Match":
        m = Match(self)
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
        if node is None or v is not node.outputs[0]:
            return
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
    """Edits a graph in place while keeping a use map and topological order up to date."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.uses: dict[int, list[Node]] = {}
        self._pending: list[Node] = []
        self._names = {v.name for v in graph.values()}
        self._outputs = {id(v) for v in graph.outputs}
        self._counter = 0
        self.removed: set[int] = set()
        self.position = {id(n): i for i, n in enumerate(graph.nodes)}  # order at the sweep's start
        for n in graph.nodes:
            self._add_uses(n)

    # -- queries ------------------------------------------------------------------------------------
    def users(self, v: Value) -> list[Node]:
        return self.uses.get(id(v), [])

    def is_output(self, v: Value) -> bool:
        return id(v) in self._outputs

    def single_use(self, v: Value) -> bool:
        return len(self.users(v)) == 1 and not self.is_output(v)

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

    def const(self, data: np.ndarray, hint: str = "const") -> Value:
        data = np.asarray(data)
        if not data.flags.c_contiguous:  # (not ascontiguousarray: it turns 0-d scalars into 1-d)
            data = data.copy()
        return self.graph.add_const(self.fresh_name(hint), data)

    # -- rewiring ----------------------------------------------------------------------------------
    def replace(self, old: Value, new: Value) -> None:
        """Every use of ``old`` reads ``new``; a graph output keeps its name."""
        if old is new:
            return
        for n in list(self.users(old)):
            n.inputs = [new if x is old else x for x in n.inputs]
            for sg in n.subgraphs():
                _replace_in_subgraph(sg, old, new)
            self.uses.setdefault(id(new), []).append(n)
        self.uses.pop(id(old), None)
        if self.is_output(old):
            self._rename_output(old, new)

    def _rename_output(self, old: Value, new: Value) -> None:
        produced_here = new.producer is not None and not self.is_output(new)
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
        self._pending = []

    def remove(self, node: Node) -> None:
        self.graph.nodes.remove(node)
        self._drop_uses(node)
        self.removed.add(id(node))

    def remove_if_dead(self, nodes: list[Node]) -> None:
        """Remove those of ``nodes`` whose outputs nobody reads (consumers first, then their producers)."""
        progress = True
        while progress:
            progress = False
            for n in nodes:
                if id(n) not in self.removed and not any(self.users(o) or self.is_output(o) for o in n.outputs):
                    self.remove(n)
                    progress = True

    def _add_uses(self, n: Node) -> None:
        for v in n.inputs:
            if v is not None:
                lst = self.uses.setdefault(id(v), [])
                if n not in lst:
                    lst.append(n)
        for sg in n.subgraphs():
            for v in sg.captured_values():
                lst = self.uses.setdefault(id(v), [])
                if n not in lst:
                    lst.append(n)

    def _drop_uses(self, n: Node) -> None:
        for v in list(n.inputs) + [c for sg in n.subgraphs() for c in sg.captured_values()]:
            if v is not None and id(v) in self.uses:
                self.uses[id(v)] = [u for u in self.uses[id(v)] if u is not n]


def _replace_in_subgraph(g: Graph, old: Value, new: Value) -> None:
    for n in g.nodes:
        n.inputs = [new if x is old else x for x in n.inputs]
        for sg in n.subgraphs():
            _replace_in_subgraph(sg, old, new)
    g.outputs = [new if x is old else x for x in g.outputs]


def apply_rules(graph: Graph, rules: list[Rule], log: Optional[list[str]] = None) -> bool:
    """One sweep of ``rules`` over the graph's nodes in order. Returns whether anything changed."""
    ed = Editor(graph)
    changed = False
    by_op: dict[Optional[str], list[Rule]] = {}
    for r in rules:
        ops = r.pattern.op if isinstance(r.pattern.op, tuple) else (r.pattern.op,)
        for o in ops:
            by_op.setdefault(o, []).append(r)
    for node in list(graph.nodes):
        if id(node) in ed.removed or not node.outputs:  # removed by an earlier rewrite
            continue
        root = node.outputs[0]
        for rule in by_op.get(node.op, []) + by_op.get(None, []):
            new = _try_rule(ed, rule, root, node)
            if new is not None:
                changed = True
                if log is not None:
                    log.append(f"{rule.name}: {node.name}")
                break
    if changed:
        eliminate_dead_nodes(graph)
    return changed


def _try_rule(ed: Editor, rule: Rule, root: Value, node: Node) -> Optional[Value]:
    for m in rule.pattern.match(root, Match()):
        if rule.exclusive and not ed.only_used_inside(m, node):
            continue
        new = rule.build(ed, m)
        if new is None or new is root or (ed.is_output(root) and (new.producer is None or ed.is_output(new))):
            # (an output that would become an input or constant keeps its node: the name must stay)
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
        return new
    return None


def _keep_name(ed: Editor, old: Value, new: Value) -> None:
    """The replacement takes the replaced value's name, so values keep their ONNX names."""
    if new.producer is None or ed.is_output(old) or ed.is_output(new) or new.name == old.name:
        return
    taken = old.name
    old.name = ed.fresh_name(old.name + ".old")
    new.name = taken


def eliminate_dead_nodes(graph: Graph) -> bool:
    """Remove nodes none of whose outputs is used (side-effect free IR: every node may go)."""
    used: set[int] = {id(v) for v in graph.outputs}
    keep: list[Node] = []
    for n in reversed(graph.nodes):
        if any(id(o) in used for o in n.outputs):
            keep.append(n)
            used.update(id(v) for v in n.inputs if v is not None)
            for sg in n.subgraphs():
                used.update(id(v) for v in sg.captured_values())
    removed = len(keep) != len(graph.nodes)
    graph.nodes = keep[::-1]
    return removed


def remove_unused_initializers(graph: Graph) -> bool:
    used: set[int] = {id(v) for v in graph.outputs}
    for n in graph.nodes:
        used.update(id(v) for v in n.inputs if v is not None)
        for sg in n.subgraphs():
            used.update(id(v) for v in sg.captured_values())
    dead = [k for k, v in graph.initializers.items() if id(v) not in used]
    for k in dead:
        del graph.initializers[k]
    return bool(dead)


@dataclass
class PassContext:
    """What a pass may read besides the graph: the level, debug mode, limits, and a log."""

    opt_level: int = 2
    debug: bool = False
    max_fold_bytes: int = 1 << 22  # constant folding never creates a tensor larger than this (4 MiB) ...
    log: list[str] = field(default_factory=list)
