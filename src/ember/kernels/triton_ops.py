"""Each fusible IR op as Triton expressions: the vocabulary the group code generator writes with.

A node lowers to straight-line primitives (:class:`Prim`): an element-wise expression, or a
reduction of one operand over the row (sum / max / min) that yields one scalar per row. Values
are computed in registers: floats in fp32 (fp16/bf16 are widened once at the load), integers in
their own width, booleans as int1. Every template here reproduces the op's reference function in
ember.ops (e.g. Relu keeps NaN, Softplus switches to x past 20, Max/Min propagate NaN).
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


def kind_of(dt: Optional[DType]) -> str:
    if dt in (DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32):
        return "f"
    if dt == DType.BOOL:
        return "b"
    if dt in (DType.INT8, DType.INT16, DType.INT32, DType.INT64, DType.UINT8):
        return "i"
    raise Unsupported(f"dtype {dt} (fused kernels take float16/bfloat16/float32, bool and int8-64, uint8)")


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


class Builder:
    """Collects the primitives of a group in topological order."""

    def __init__(self) -> None:
        self.prims: list[Prim] = []

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


def _need(node: Node, ops: list[Optional[Operand]], kinds: str) -> None:
    for o in ops:
        if o is not None and o.kind not in kinds:
            raise Unsupported(f"node '{node.name}' ({node.op}): an input of kind '{o.kind}' "
                              f"(fused here: {'float' if kinds == 'f' else kinds})")


def _zero(k: str) -> str:
    return "0.0" if k == "f" else "0"


def _f(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else f'float("{float(x)}")'


# -- unary float ops: one template each, {0} is the operand --------------------------------------
UNARY_F: dict[str, str] = {
    "Exp": "tl.exp({0})", "Log": "tl.log({0})", "Sqrt": "tl.sqrt({0})", "Erf": "tl.erf({0})",
    "Sigmoid": "tl.sigmoid({0})", "Tanh": "tm.tanh({0})", "Reciprocal": "(1.0 / {0})",
    "Sin": "tl.sin({0})", "Cos": "tl.cos({0})", "Floor": "tl.floor({0})", "Ceil": "tl.ceil({0})",
    "Softsign": "({0} / (1.0 + tl.abs({0})))",
    "HardSwish": "({0} * tl.minimum(tl.maximum({0} / 6.0 + 0.5, 0.0), 1.0))",
    "Softplus": "tl.where({0} > 20.0, {0}, tm.log1p(tl.exp({0})))",
    "Mish": "({0} * tm.tanh(tl.where({0} > 20.0, {0}, tm.log1p(tl.exp({0})))))",
    "IsNaN": "({0} != {0})",
}


def _unary_attr(node: Node, x: str) -> Optional[str]:
    """Float unary ops whose template depends on attributes."""
    a = node.attrs
    op = node.op
    if op == "LeakyRelu":
        return f"tl.where({x} >= 0.0, {x}, {x} * {_f(a.get('alpha', 0.01))})"
    if op == "HardSigmoid":
        return (f"tl.minimum(tl.maximum({_f(a.get('alpha', 0.2))} * {x} + {_f(a.get('beta', 0.5))}, 0.0), 1.0)")
    if op == "Swish":
        alpha = float(a.get("alpha", 1.0))
        return f"({x} * tl.sigmoid({x}))" if alpha == 1.0 else f"({x} * tl.sigmoid({_f(alpha)} * {x}))"
    if op == "Gelu":
        if a.get("approximate", "none") == "tanh":
            # 0.5 (1 + tanh u) = sigmoid(2u): the same function without 1 + tanh's cancellation for x << 0
            return f"({x} * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x})))"
        return f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"
    if op == "Elu":
        return f"tl.where({x} > 0.0, {x}, {_f(a.get('alpha', 1.0))} * tm.expm1({x}))"
    if op == "Selu":
        alpha = _f(a.get("alpha", 1.67326319217681884765625))
        gamma = _f(a.get("gamma", 1.05070102214813232421875))
        return f"({gamma} * tl.where({x} > 0.0, {x}, {alpha} * tm.expm1({x})))"
    if op == "Celu":
        alpha = _f(a.get("alpha", 1.0))
        return f"(tl.maximum({x}, 0.0) + tl.minimum({alpha} * tm.expm1({x} / {alpha}), 0.0))"
    if op == "ThresholdedRelu":
        return f"tl.where({x} > {_f(a.get('alpha', 1.0))}, {x}, 0.0)"
    if op == "Shrink":
        lam, bias = _f(a.get("lambd", 0.5)), _f(a.get("bias", 0.0))
        return f"tl.where({x} < -{lam}, {x} + {bias}, tl.where({x} > {lam}, {x} - {bias}, 0.0))"
    if op == "IsInf":
        neg, pos = a.get("detect_negative", 1), a.get("detect_positive", 1)
        if neg and pos:
            return f"(tl.abs({x}) == float(\"inf\"))"
        return f"({x} == float(\"{'-inf' if neg else 'inf' if pos else 'nan'}\"))"
    return None


COMPARE = {"Equal": "==", "Greater": ">", "GreaterOrEqual": ">=", "Less": "<", "LessOrEqual": "<="}
LOGIC = {"And": "&", "Or": "|", "Xor": "^"}
ARITH = {"Add": "+", "Sub": "-", "Mul": "*"}
_TL_TYPES = {DType.FLOAT16: "tl.float16", DType.BFLOAT16: "tl.bfloat16", DType.FLOAT32: "tl.float32",
             DType.BOOL: "tl.int1", DType.INT8: "tl.int8", DType.INT16: "tl.int16", DType.INT32: "tl.int32",
             DType.INT64: "tl.int64", DType.UINT8: "tl.uint8"}


def tl_type(dt: DType) -> str:
    kind_of(dt)
    return _TL_TYPES[dt]


def _cast(b: Builder, node: Node, x: Operand, src: Optional[DType], dst: Optional[DType]) -> Operand:
    """ONNX Cast: float -> narrower float rounds through the target type; -> bool is x != 0."""
    k = kind_of(dst)
    if src is None:
        raise Unsupported(f"node '{node.name}' (Cast): input dtype unknown")
    if dst == DType.UINT8 and x.kind == "f":
        raise Unsupported(f"node '{node.name}' (Cast): float -> uint8 wraps differently in torch and Triton")
    if k == "b":
        return b.fmt("({0} != " + _zero(x.kind) + ")", "b", x) if x.kind != "b" else x
    if k == "f":
        if dst in (DType.FLOAT16, DType.BFLOAT16) and src != dst:
            return b.fmt("{0}.to(" + tl_type(dst) + ").to(tl.float32)", "f", x)
        return x if x.kind == "f" else b.fmt("{0}.to(tl.float32)", "f", x)
    return b.fmt("{0}.to(" + tl_type(dst) + ")", "i", x)


def _pow(b: Builder, node: Node, x: Operand, y: Operand) -> Operand:
    _need(node, [x], "f")
    if not y.var:  # constant exponent: the common cases as products, others through exp/log
        e = float(y.text.replace('float("', "").replace('")', ""))
        special = {1.0: "{0}", 2.0: "({0} * {0})", 3.0: "({0} * {0} * {0})", 0.5: "tl.sqrt({0})",
                   -1.0: "(1.0 / {0})", -0.5: "(1.0 / tl.sqrt({0}))", 0.0: "(tl.zeros_like({0}) + 1.0)"}
        if e in special:
            return b.fmt(special[e], "f", x)
        return b.fmt("tm.pow({0}, " + _f(e) + ")", "f", x)
    yf = y if y.kind == "f" else b.fmt("{0}.to(tl.float32)", "f", y)
    return b.fmt("tm.pow({0}, {1})", "f", x, yf)


def lower_pointwise(b: Builder, node: Node, args: list[Optional[Operand]]) -> Operand:
    """The primitives of one pointwise node; raises Unsupported for what is not written here."""
    op = node.op
    xs = [a for a in args if a is not None]
    if op in UNARY_F:
        _need(node, xs, "f")
        return b.fmt(UNARY_F[op], "b" if op == "IsNaN" else "f", xs[0])
    if op in ("LeakyRelu", "HardSigmoid", "Swish", "Gelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Shrink",
              "IsInf"):
        _need(node, xs, "f")
        return b.emit(_unary_attr(node, xs[0].text), "b" if op == "IsInf" else "f", xs[0])
    if op in ("Relu", "Abs", "Neg", "Sign"):
        _need(node, xs, "fi")
        x = xs[0]
        z = _zero(x.kind)
        t = {"Relu": f"tl.where({{0}} < {z}, {z}, {{0}})", "Abs": "tl.abs({0})", "Neg": "(-{0})",
             "Sign": f"tl.where({{0}} > {z}, 1, tl.where({{0}} < {z}, -1, 0)).to({{0}}.dtype)"}[op]
        if op == "Sign" and x.kind == "f":  # NaN stays NaN, as torch.sign keeps it
            t = "tl.where({0} > 0.0, 1.0, tl.where({0} < 0.0, -1.0, {0}))"
        return b.fmt(t, x.kind, x)
    if op in ARITH or op == "Div":
        x, y = xs
        if x.kind != y.kind:
            raise Unsupported(f"node '{node.name}' ({op}): inputs of different kinds")
        if op == "Div":
            _need(node, xs, "f")  # integer division truncates; kept on the reference path
            return b.fmt("({0} / {1})", "f", x, y)
        _need(node, xs, "fi")
        return b.fmt("({0} " + ARITH[op] + " {1})", x.kind, x, y)
    if op in ("Max", "Min", "Sum", "Mean"):
        _need(node, xs, "fi" if op != "Mean" else "f")
        if len({x.kind for x in xs}) != 1:
            raise Unsupported(f"node '{node.name}' ({op}): inputs of different kinds")
        acc = xs[0]
        for x in xs[1:]:
            if op in ("Max", "Min"):
                nan = ", propagate_nan=tl.PropagateNan.ALL" if x.kind == "f" else ""
                acc = b.fmt(f"tl.{'maximum' if op == 'Max' else 'minimum'}({{0}}, {{1}}{nan})", x.kind, acc, x)
            else:
                acc = b.fmt("({0} + {1})", x.kind, acc, x)
        if op == "Mean":
            acc = b.fmt("({0} / " + _f(len(xs)) + ")", "f", acc)
        return acc if acc.var else b.fmt("({0})", acc.kind, acc)
    if op == "Pow":
        return _pow(b, node, args[0], args[1])
    if op == "Clip":
        x, lo, hi = (args + [None, None])[:3]
        _need(node, [x], "fi")
        nan = ", propagate_nan=tl.PropagateNan.ALL" if x.kind == "f" else ""
        out = x
        if lo is not None:
            out = b.fmt("tl.maximum({0}, {1}" + nan + ")", x.kind, out, lo)
        if hi is not None:
            out = b.fmt("tl.minimum({0}, {1}" + nan + ")", x.kind, out, hi)
        return out if out.var else b.fmt("({0})", x.kind, out)
    if op == "PRelu":
        _need(node, xs, "f")
        return b.fmt("tl.where({0} < 0.0, {0} * {1}, {0})", "f", xs[0], xs[1])
    if op == "SwiGLU":
        _need(node, xs, "f")
        alpha = float(node.attrs.get("alpha", 1.0))
        s = "{0}" if alpha == 1.0 else _f(alpha) + " * {0}"
        return b.fmt("({0} * tl.sigmoid(" + s + ") * {1})", "f", xs[0], xs[1])
    if op == "Where":
        c, x, y = xs
        if c.kind != "b" or x.kind != y.kind:
            raise Unsupported(f"node '{node.name}' (Where): condition must be bool and branches of one kind")
        return b.fmt("tl.where({0}, {1}, {2})", x.kind, c, x, y)
    if op in COMPARE:
        x, y = xs
        if x.kind != y.kind or x.kind == "b" and op != "Equal":
            raise Unsupported(f"node '{node.name}' ({op}): inputs of different kinds")
        return b.fmt("({0} " + COMPARE[op] + " {1})", "b", x, y)
    if op in LOGIC:
        _need(node, xs, "b")
        return b.fmt("({0} " + LOGIC[op] + " {1})", "b", xs[0], xs[1])
    if op == "Not":
        _need(node, xs, "b")
        return b.fmt("({0} == 0)", "b", xs[0])
    if op in ("Cast", "CastLike"):
        from ..ops.quant import dtype_of_attr

        dst = dtype_of_attr(node.attrs["to"]) if op == "Cast" else node.inputs[1].dtype
        return _cast(b, node, args[0], node.inputs[0].dtype, dst)
    raise Unsupported(f"node '{node.name}': op {op} has no fused-kernel template")


# -- row reductions (the last axis) ---------------------------------------------------------------
ROW_REDUCTIONS = ("Softmax", "LogSoftmax", "LayerNormalization", "RMSNormalization", "ReduceMax", "ReduceMin",
                  "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp")


def lower_row_reduction(b: Builder, node: Node, args: list[Optional[Operand]], n: str) -> Operand:
    """The primitives of a last-axis reduction; ``n`` is the source name of the row length."""
    op = node.op
    x = args[0]
    _need(node, [a for a in args if a is not None], "f")
    if op in ("Softmax", "LogSoftmax", "ReduceLogSumExp"):
        m = b.reduce("max", x)
        e = b.fmt("tl.exp({0} - {1})", "f", x, m)
        s = b.reduce("sum", e)
        if op == "Softmax":
            inv = b.fmt("(1.0 / {0})", "f", s)
            return b.fmt("({0} * {1})", "f", e, inv)
        lse = b.fmt("({0} + tl.log({1}))", "f", m, s)
        return lse if op == "ReduceLogSumExp" else b.fmt("({0} - {1})", "f", x, lse)
    if op == "LayerNormalization":
        mean = b.fmt("({0} / " + n + ")", "f", b.reduce("sum", x))
        d = b.fmt("({0} - {1})", "f", x, mean)
        var = b.fmt("({0} / " + n + ")", "f", b.reduce("sum", b.fmt("({0} * {0})", "f", d)))
        rstd = b.fmt("tl.rsqrt({0} + " + _f(node.attrs.get("epsilon", 1e-5)) + ")", "f", var)
        y = b.fmt("({0} * {1} * {2})", "f", d, rstd, args[1])
        return b.fmt("({0} + {1})", "f", y, args[2]) if len(args) > 2 and args[2] is not None else y
    if op == "RMSNormalization":
        ms = b.fmt("({0} / " + n + ")", "f", b.reduce("sum", b.fmt("({0} * {0})", "f", x)))
        rstd = b.fmt("tl.rsqrt({0} + " + _f(node.attrs.get("epsilon", 1e-5)) + ")", "f", ms)
        return b.fmt("({0} * {1} * {2})", "f", x, rstd, args[1])
    if op in ("ReduceMax", "ReduceMin"):
        return b.reduce("max" if op == "ReduceMax" else "min", x)
    operand = {"ReduceSum": "{0}", "ReduceMean": "{0}", "ReduceSumSquare": "({0} * {0})",
               "ReduceL1": "tl.abs({0})", "ReduceL2": "({0} * {0})"}[op]
    s = b.reduce("sum", x if operand == "{0}" else b.fmt(operand, "f", x))
    if op == "ReduceMean":
        return b.fmt("({0} / " + n + ")", "f", s)
    return b.fmt("tl.sqrt({0})", "f", s) if op == "ReduceL2" else s


def check_row_reduction(node: Node) -> None:
    """Attributes and forms the row kernel computes exactly; raises Unsupported otherwise."""
    op = node.op
    if op not in ROW_REDUCTIONS:
        raise Unsupported(f"node '{node.name}': reduction {op} has no fused-kernel template")
    if len(node.outputs) != 1:
        raise Unsupported(f"node '{node.name}' ({op}): only the first output can be fused")
    x = node.inputs[0]
    rank = len(x.shape)
    if op.startswith("Reduce"):
        if node.attrs.get("noop_with_empty_axes", 0):
            raise Unsupported(f"node '{node.name}' ({op}): noop_with_empty_axes")
        axes_v = node.inputs[1] if len(node.inputs) > 1 else None
        if axes_v is None:
            axes = list(range(rank))
        elif axes_v.is_const:
            axes = sorted(int(a) % max(rank, 1) for a in np.asarray(axes_v.data).reshape(-1)) or list(range(rank))
        else:
            raise Unsupported(f"node '{node.name}' ({op}): axes computed at run time")
        if axes != [rank - 1]:
            raise Unsupported(f"node '{node.name}' ({op}): reduces axes {axes}, not the last one only")
    elif node.attrs.get("axis", -1) not in (-1, rank - 1):
        raise Unsupported(f"node '{node.name}' ({op}): axis {node.attrs.get('axis')} is not the last")
    if op == "LayerNormalization" and node.attrs.get("stash_type", 1) != 1:
        raise Unsupported(f"node '{node.name}' (LayerNormalization): stash_type other than float32")


def param_inputs(node: Node) -> set[int]:
    """Input positions that are parameters, not data: the reduction axes, CastLike's target."""
    if node.op.startswith("Reduce"):
        return {1}
    if node.op == "CastLike":
        return {1}
    return set()


LowerFn = Callable[[Builder, Node, list], Operand]
