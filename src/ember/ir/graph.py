"""Graph, Node, Value: the IR every ember package speaks.

A Value is produced once (by a node, or as a graph input, or as a constant with data).
Subgraphs (If/Loop/Scan bodies) are Graph attributes of a node; their nodes may read Values of
enclosing graphs by reference (outer-scope capture), as ONNX allows.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from .dtypes import DType
from .shapes import Dim, shape_str


@dataclass(eq=False)
class Value:
    name: str
    dtype: Optional[DType] = None
    shape: Optional[tuple[Dim, ...]] = None  # None: rank unknown
    producer: Optional["Node"] = field(default=None, repr=False)
    data: Optional[np.ndarray] = field(default=None, repr=False)  # set for constants/initializers
    kind: str = "tensor"  # "tensor" | "sequence" | "optional"

    @property
    def is_const(self) -> bool:
        return self.data is not None

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)

    def type_str(self) -> str:
        t = f"{self.dtype or '?'}{shape_str(self.shape)}"
        return t if self.kind == "tensor" else f"{self.kind}<{t}>"


@dataclass(eq=False)
class Node:
    op: str
    inputs: list[Optional[Value]]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    # Free-form annotations written by passes/build (fusion group, tactic, precision...).
    meta: dict[str, Any] = field(default_factory=dict)

    def subgraphs(self) -> Iterator["Graph"]:
        for v in self.attrs.values():
            if isinstance(v, Graph):
                yield v
            elif isinstance(v, list) and v and all(isinstance(g, Graph) for g in v):
                yield from v

    def __repr__(self) -> str:
        ins = ", ".join(v.name if v else "_" for v in self.inputs)
        outs = ", ".join(v.name for v in self.outputs)
        return f"Node({self.name}: {outs} = {self.op}({ins}))"


@dataclass(eq=False)
class Graph:
    name: str = "main"
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    initializers: dict[str, Value] = field(default_factory=dict)  # constants with data
    opset: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(), repr=False)

    # -- building ----------------------------------------------------------------------------
    def add_input(self, name: str, dtype: DType | None, shape: tuple[Dim, ...] | None) -> Value:
        v = Value(name, dtype, shape)
        self.inputs.append(v)
        return v

    def add_const(self, name: str, data: np.ndarray) -> Value:
        from .dtypes import from_numpy

        data = np.asarray(data)
        v = Value(name, from_numpy(data.dtype), tuple(int(d) for d in data.shape), data=data)
        self.initializers[name] = v
        return v

    def add_node(self, op: str, inputs: list[Optional[Value]], outputs: list[Value] | int = 1,
                 attrs: dict[str, Any] | None = None, name: str = "") -> Node:
        if isinstance(outputs, int):
            base = name or f"{op.lower()}_{next(self._ids)}"
            outputs = [Value(f"{base}:{i}" if outputs > 1 else base) for i in range(outputs)]
        node = Node(op, list(inputs), list(outputs), dict(attrs or {}), name or outputs[0].name)
        for o in node.outputs:
            o.producer = node
        self.nodes.append(node)
        return node

    # -- queries ----------------------------------------------------------------------------
    def all_nodes(self) -> Iterator[Node]:
        """Nodes of this graph and, recursively, of its subgraphs."""
        for n in self.nodes:
            yield n
            for g in n.subgraphs():
                yield from g.all_nodes()

    def consumers(self) -> dict[Value, list[Node]]:
        uses: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    uses.setdefault(v, []).append(n)
            for g in n.subgraphs():
                for v in g.captured_values():
                    uses.setdefault(v, []).append(n)
        return uses

    def captured_values(self) -> list[Value]:
        """Values this graph (or its subgraphs) reads from enclosing scopes."""
        defined: set[int] = {id(v) for v in self.inputs} | {id(v) for v in self.initializers.values()}
        for n in self.nodes:
            defined.update(id(o) for o in n.outputs)
        seen: dict[int, Value] = {}
        for n in self.nodes:
            reads = [v for v in n.inputs if v is not None]
            for g in n.subgraphs():
                reads.extend(g.captured_values())
            for v in reads:
                if id(v) not in defined and not v.is_const:
                    seen.setdefault(id(v), v)
        for v in self.outputs:
            if id(v) not in defined and not v.is_const:
                seen.setdefault(id(v), v)
        return list(seen.values())

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.initializers.values()
        for n in self.nodes:
            yield from n.outputs

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)
