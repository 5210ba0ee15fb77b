"""The vocabulary an op states its fused-kernel (Triton) lowering in, next to its reference function.

    @op("Exp", kind="pointwise", triton="tl.exp({0})")            # a template over the operands
    @op("LeakyRelu", kind="pointwise", triton=leaky_relu_lowering)  # a function (builder, node, operands)

A node lowers to straight-line primitives (:class:`Prim`): an element-wise expression, or a
reduction of one operand over the row (sum / max / min) that yields one scalar per row. Values are
computed in registers: floats in fp32 (fp16/bf16 are widened once at the load), integers in their
own width, booleans as int1. Every lowering reproduces the op's reference function (Relu keeps
NaN, Softplus switches to x past 20, Max/Min propagate NaN...). The generator that turns the
primitives into a kernel is kernels/triton_codegen.py; nothing here imports Triton.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..ir.dtypes import DType
from ..ir.graph import Node

CONST, ROW, ELEM = 0, 1, 2  # operand levels: literal, one scalar per row, one value per element


class Unsupported(Exception):
    """Why a node (or group) cannot be generated; the message names what to change."""


@dataclass(frozen=True)
class Operand:
    text: str  # a variable name or a literal
    level: int
    kind: str  # 'f' (fp32 registers), 'i' (integer), 'b' (int1)
    var: bool = True


@dataclass
class Prim:
    name: str
    text: str  # the expression; for a reduction, the operand's variable
    level: int
    kind: str
    deps: tuple[str, ...]
    reduce: Optional[str] = None  # 'sum' | 'max' | 'min'


class Builder:
    """Collects the primitives of a group in topological order. ``row_length``: the kernel's name
    of the row length (row kernels)."""

    def __init__(self, row_length: str = "n_cols") -> None:
        self.prims: list[Prim] = []
        self.row_length = row_length

    def emit(self, text: str, kind: str, *deps: Operand) -> Operand:
        level = max([ROW] + [d.level for d in deps])
        name = f"v{len(self.prims)}"
        self.prims.append(Prim(name, text, level, kind, tuple(d.text for d in deps if d.var)))
        return Operand(name, level, kind)

    def reduce(self, how: str, x: Operand) -> Operand:
        if x.kind != "f":
            raise Unsupported("reductions of integer or bool values")
        name = f"v{len(self.prims)}"
        self.prims.append(Prim(name, x.text, ROW, "f", (x.text,) if x.var else (), reduce=how))
        return Operand(name, ROW, "f")

    def fmt(self, template: str, kind: str, *ops: Operand) -> Operand:
        return self.emit(template.format(*[o.text for o in ops]), kind, *ops)


Lowering = Callable[[Builder, Node, "list[Optional[Operand]]"], Operand]

_TL_TYPES = {DType.FLOAT16: "tl.float16", DType.BFLOAT16: "tl.bfloat16", DType.FLOAT32: "tl.float32",
             DType.BOOL: "tl.int1", DType.INT8: "tl.int8", DType.INT16: "tl.int16", DType.INT32: "tl.int32",
             DType.INT64: "tl.int64", DType.UINT8: "tl.uint8"}


def kind_of(dt: Optional[DType]) -> str:
    if dt in (DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32):
        return "f"
    if dt == DType.BOOL:
        return "b"
    if dt in (DType.INT8, DType.INT16, DType.INT32, DType.INT64, DType.UINT8):
        return "i"
    raise Unsupported(f"dtype {dt} (fused kernels take float16/bfloat16/float32, bool and int8-64, uint8)")


def tl_type(dt: DType) -> str:
    kind_of(dt)
    return _TL_TYPES[dt]


def literal(data: np.ndarray, dt: DType) -> Operand:
    """A one-element constant written into the source."""
    v = np.asarray(data).reshape(-1)[0]
    k = kind_of(dt)
    if k == "f":
        f = float(v)
        text = repr(f) if math.isfinite(f) else f'float("{f}")'
    elif k == "b":
        text = "True" if bool(v) else "False"
    else:
        text = str(int(v))
    return Operand(text, CONST, k, var=False)


def need(node: Node, ops: "list[Optional[Operand]]", kinds: str) -> None:
    """Raise Unsupported unless every operand is of one of ``kinds``."""
    for o in ops:
        if o is not None and o.kind not in kinds:
            raise Unsupported(f"node '{node.name}' ({node.op}): an input of kind '{o.kind}' "
                              f"(fused here: {'float' if kinds == 'f' else kinds})")


def zero(kind: str) -> str:
    return "0.0" if kind == "f" else "0"


def fnum(x: float) -> str:
    """A float as source text (inf and nan included)."""
    return repr(float(x)) if math.isfinite(x) else f'float("{float(x)}")'


def present(args: "list[Optional[Operand]]") -> "list[Operand]":
    return [a for a in args if a is not None]


def template(expr: "str | Callable[[dict], str]", kinds: str = "f", out: str = "f") -> Lowering:
    """A lowering that formats ``expr`` (or ``expr(attrs)``) over the node's operands ({0}, {1}...).
    ``kinds``: operand kinds it takes; ``out``: the result's kind, or "same" (the first operand's)."""

    def lower(b: Builder, node: Node, args: "list[Optional[Operand]]") -> Operand:
        xs = present(args)
        need(node, xs, kinds)
        text = expr(node.attrs) if callable(expr) else expr
        return b.fmt(text, xs[0].kind if out == "same" else out, *xs)

    return lower


def binary(symbol: str, kinds: str = "fi") -> Lowering:
    """``{0} <symbol> {1}`` over two operands of one kind."""

    def lower(b: Builder, node: Node, args: "list[Optional[Operand]]") -> Operand:
        x, y = present(args)
        if x.kind != y.kind:
            raise Unsupported(f"node '{node.name}' ({node.op}): inputs of different kinds")
        need(node, [x, y], kinds)
        return b.fmt("({0} " + symbol + " {1})", x.kind, x, y)

    return lower
