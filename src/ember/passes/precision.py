"""Reduced precision as a rule set: store activations and weights in fp16/bf16 where that is safe.

Each node gets a compute type from its op's definition (``OpDef.low_precision``: GEMM, conv,
attention, norms, softmax, pointwise math and layout ops compute in low precision with fp32
accumulation; sums, products and Exp that overflow fp16 stay fp32). One rule, run by the rewrite
engine over the main graph in order, rebuilds each node with its float inputs cast to its compute
type (constants converted once at build time) and its outputs in that type; engine inputs and
outputs keep the dtypes the model declares. Like autocast, but decided once, visible in the graph.

Casts it inserts carry ``meta["precision_cast"]`` and are named after the value they convert
(``x:float16``): the tuner and the fidelity check see through them (``source_name``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..ir.dtypes import DTYPE_TO_ONNX, DType, to_numpy
from ..ir.graph import Graph, Node, Value
from ..ops import get, known_ops
from .rewrite import Editor, Match, P, Rule, apply_rules

TYPE_AGNOSTIC = ("Cast", "CastLike", "Shape", "Size")  # left as they are


@dataclass(frozen=True)
class KeptLayer:
    """A float node that computes in fp32 in a reduced-precision engine, and why."""

    node: str
    op: str
    reason: str  # "accuracy" | "speed" | "op" | "control flow" | "sensitivity" (quantized builds)
    detail: str = ""  # what was measured or which rule applied

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}" + (f", {self.detail}" if self.detail else "")


def low_positions(node: Node) -> "set[int] | None":
    """Input positions computed in low precision, or None if the node stays fp32."""
    if node.op not in known_ops():
        return None
    return get(node.op).low_precision_inputs(len(node.inputs))


def _is_float(v: Optional[Value]) -> bool:
    return v is not None and v.dtype is not None and v.dtype.is_float


class _Conversion:
    """The state of one conversion: casts made so far (one per value and type), layers kept fp32."""

    def __init__(self, graph: Graph, low: DType, keep: dict[str, tuple[str, str]]):
        self.graph, self.low, self.keep = graph, low, keep
        self.top = {id(n) for n in graph.nodes}  # bodies keep their types: only main-graph nodes convert
        self.done: set[int] = set()  # nodes this conversion built (never converted again)
        self.casts: dict[tuple[int, DType], Value] = {}
        self.kept: list[KeptLayer] = []
        self.counter = 0

    def wants(self, v: Value, m: Match) -> bool:
        n = v.producer
        return n is not None and id(n) in self.top and id(n) not in self.done and n.op not in TYPE_AGNOSTIC

    def cast(self, ed: Editor, v: Value, to: DType) -> Value:
        key = (id(v), to)
        if key in self.casts:
            return self.casts[key]
        if v.is_const:
            c = self.graph.add_const(ed.fresh_name(f"{v.name}:{to.value}"), np.asarray(v.data).astype(to_numpy(to)))
        else:
            self.counter += 1
            c = Value(ed.fresh_name(f"{v.name}:{to.value}"), to, v.shape)
            n = Node("Cast", [v], [c], {"to": DTYPE_TO_ONNX[to]}, name=f"cast_{self.counter}_{v.name}",
                     meta={"precision_cast": True})
            c.producer = n
            self.done.add(id(n))
            ed.adopt([n])
        self.casts[key] = c
        return c

    def _fp32_captures(self, ed: Editor, node: Node) -> bool:
        """Outer values a body of ``node`` reads by name that this conversion made low precision are
        read through a cast back to fp32 (a body's ops were typed for the fp32 graph). Returns
        whether any was."""
        rebound = False
        for body in node.subgraphs():
            for v in body.captured_values():
                if _is_float(v) and v.dtype == self.low:
                    _rebind(body, v, self.cast(ed, v, DType.FLOAT32))
                    rebound = True
        return rebound

    def convert(self, ed: Editor, m: Match) -> Optional[Value]:
        node = m["y"].producer
        nested = any(node.subgraphs())
        low_pos = low_positions(node) if not nested and node.name not in self.keep else None
        float_in = [i for i, v in enumerate(node.inputs) if _is_float(v)]
        inputs = list(node.inputs)
        low_out = rebound = False
        if low_pos is None:  # an fp32 node: low-precision inputs come back to fp32
            for i in float_in:
                if inputs[i].dtype == self.low:
                    inputs[i] = self.cast(ed, inputs[i], DType.FLOAT32)
            if float_in:
                reason, detail = self.keep.get(node.name) or (("control flow", "") if nested else ("op", ""))
                self.kept.append(KeptLayer(node.name, node.op, reason, detail))
            if nested:  # bodies stay fp32: outer values they read that became low come back to fp32 too
                rebound = self._fp32_captures(ed, node)
        else:
            for i in float_in:
                v = inputs[i]
                want = self.low if i in low_pos and v.dtype == DType.FLOAT32 else (
                    DType.FLOAT32 if i not in low_pos and v.dtype == self.low else v.dtype)
                if want != v.dtype:
                    inputs[i] = self.cast(ed, v, want)
            low_out = any(inputs[i].dtype == self.low for i in float_in)
        retype = low_out and any(o.dtype == DType.FLOAT32 for o in node.outputs)
        if not retype and not rebound and all(a is b for a, b in zip(inputs, node.inputs)):
            self.done.add(id(node))
            return None
        outs = [Value(ed.fresh_name(o.name + ".low"), self.low if retype and o.dtype == DType.FLOAT32 else o.dtype,
                      o.shape) for o in node.outputs]
        attrs = dict(node.attrs)
        if retype and attrs.get("output_dtype") == DTYPE_TO_ONNX[DType.FLOAT32]:  # a float output type it names
            attrs["output_dtype"] = DTYPE_TO_ONNX[self.low]
        new = Node(node.op, inputs, outs, attrs, name=node.name, meta=dict(node.meta))
        for o in outs:
            o.producer = new
        self.done.add(id(new))
        ed.adopt([new])
        for old, o in zip(node.outputs[1:], outs[1:]):  # the first is rewired (and renamed) by the engine
            if ed.users(old) or ed.is_output(old):
                ed.replace(old, o)
            if not ed.is_output(o):
                o.name, old.name = old.name, ed.fresh_name(old.name + ".old")
        return outs[0]


def _rebind(body: Graph, old: Value, new: Value) -> None:
    """Every read of ``old`` in ``body`` and its nested bodies becomes a read of ``new``."""
    for n in body.nodes:
        n.inputs = [new if v is old else v for v in n.inputs]
        for sg in n.subgraphs():
            _rebind(sg, old, new)
    body.outputs = [new if v is old else v for v in body.outputs]


def convert_precision(graph: Graph, low: DType, keep: "dict[str, tuple[str, str]] | None" = None) -> list[KeptLayer]:
    """Rewrite ``graph`` for ``low`` (FLOAT16 or BFLOAT16). ``keep``: node name -> (reason, detail)
    for nodes to compute in fp32 although their op could run in ``low`` (the fidelity check's, the
    tuner's and the quantizer's choices). Returns every float node that stays fp32."""
    conv = _Conversion(graph, low, keep or {})
    declared = [v.dtype for v in graph.outputs]  # (the engine rewires outputs in place: same positions)
    apply_rules(graph, [Rule("compute_in_low_precision", P.any("y", where=conv.wants), conv.convert, exclusive=False)])
    # engine outputs keep their declared dtype
    outputs = []
    for v, want in zip(graph.outputs, declared):
        if v.dtype != want and v.producer is not None:
            conv.counter += 1
            orig = Value(v.name, want, v.shape)
            v.name = f"{v.name}:{low.value}"
            n = Node("Cast", [v], [orig], {"to": DTYPE_TO_ONNX[want]}, name=f"cast_out_{conv.counter}",
                     meta={"precision_cast": True})
            orig.producer = n
            graph.nodes.append(n)
            outputs.append(orig)
        else:
            outputs.append(v)
    graph.outputs = outputs
    return conv.kept


def lowerable(graph: Graph) -> list[str]:
    """Names of the nodes convert_precision would compute in low precision, in graph order: the
    ones a fidelity or speed choice may keep in fp32."""
    out = []
    for node in graph.nodes:
        if node.op in TYPE_AGNOSTIC or any(node.subgraphs()):
            continue
        if low_positions(node) is not None and any(_is_float(v) for v in node.inputs):
            out.append(node.name)
    return out


def source_name(name: str) -> str:
    """The value a precision cast or a renamed output came from: 'x:float16' -> 'x'."""
    for dt in (DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32):
        if name.endswith(":" + dt.value):
            return name[: -len(dt.value) - 1]
    return name
