"""Math family converters: older opset spellings normalized to the newest semantics.

- Reduce*: ``axes`` was an attribute before opset 18 (ReduceSum: 13); it becomes a constant input.
- Softmax / LogSoftmax / Hardmax before opset 13 flatten the input to 2-D at ``axis`` (default 1)
  and normalize over the whole trailing block.
- Clip before opset 11 took ``min``/``max`` attributes.
- Cast before opset 6 named its target type by string.
- Opset < 7 binary ops carried ``broadcast``/``axis`` attributes; opset < 6 ops ``consumed_inputs``.
"""
from __future__ import annotations

import numpy as np
import onnx

from ....ir.dtypes import ONNX_TO_DTYPE, to_numpy
from ..registry import converter

_REDUCE_AXES_INPUT_SINCE = {"ReduceSum": 13}
_REDUCTIONS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare")


def _reduce_axes_attr(b) -> None:
    attrs = dict(b.attrs())
    axes = attrs.pop("axes", None)
    inputs = [b.input(0)]
    if axes is not None:
        inputs.append(b.const_i64(axes, hint="axes"))
    b.emit(b.proto.op_type, inputs, attrs)


for _op in _REDUCTIONS:
    converter(_op, until=_REDUCE_AXES_INPUT_SINCE.get(_op, 18) - 1)(_reduce_axes_attr)


def _flatten_softmax(b) -> None:
    """Old softmax family: normalize over all dims from ``axis`` on, as one flattened row."""
    x = b.input(0)
    op_type = b.proto.op_type
    axis = b.attr("axis", 1)
    rank = len(x.shape) if x.shape is not None else None
    if rank is not None:
        axis = axis % max(rank, 1) if rank else 0
        if axis >= rank - 1:  # one trailing dim: the same as the opset-13 form
            b.emit(op_type, [x], {"axis": -1})
            return
    flat = b.tmp("flat")
    b.emit("Flatten", [x], {"axis": axis}, outputs=[flat])
    y2d = b.tmp("y2d")
    b.emit(op_type, [flat], {"axis": 1}, outputs=[y2d])
    shape = b.tmp("shape")
    b.emit("Shape", [x], {}, outputs=[shape])
    b.emit("Reshape", [y2d, shape])


for _op in ("Softmax", "LogSoftmax", "Hardmax"):
    converter(_op, until=12)(_flatten_softmax)


@converter("Clip", until=10)
def clip_attrs(b) -> None:
    x = b.input(0)
    dt = to_numpy(x.dtype) if x.dtype is not None and x.dtype.is_float else np.float32
    attrs = b.attrs()
    lo = b.const(np.asarray(attrs["min"], dtype=dt), hint="min") if "min" in attrs else None
    hi = b.const(np.asarray(attrs["max"], dtype=dt), hint="max") if "max" in attrs else None
    b.emit("Clip", [x, lo, hi])


def _cast_target(b, to) -> int:
    if isinstance(to, str):  # opset 1..5: the type's name
        try:
            to = onnx.TensorProto.DataType.Value(to.upper())
        except ValueError:
            b.unsupported(f"Cast to unknown type {to!r}")
    if to not in ONNX_TO_DTYPE:
        b.unsupported(f"Cast to {onnx.TensorProto.DataType.Name(to)}, an element type ember does not run")
    return int(to)


@converter("Cast")
def cast(b) -> None:
    attrs = dict(b.attrs())
    attrs["to"] = _cast_target(b, attrs.get("to"))
    b.emit("Cast", [b.input(0)], attrs)


@converter("CastLike")
def cast_like(b) -> None:
    t = b.input(1)
    if t.dtype is not None and t.dtype not in ONNX_TO_DTYPE.values():
        b.unsupported(f"CastLike to {t.dtype}, an element type ember does not run")
    b.emit_default()


@converter("Gemm", until=6)
def gemm_broadcast_attr(b) -> None:
    attrs = {k: v for k, v in b.attrs().items() if k != "broadcast"}
    b.emit("Gemm", b.inputs(), attrs)


_LEGACY_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Greater", "Less", "PRelu")


def _legacy_binary(b) -> None:
    """Opset < 7 limited broadcasting: with ``axis``, B's dims line up with A's starting at axis."""
    attrs = {k: v for k, v in b.attrs().items() if k not in ("broadcast", "axis", "consumed_inputs")}
    a, bb = b.input(0), b.input(1)
    axis = b.attr("axis")
    if b.attr("broadcast", 0) and axis is not None and a.shape is not None and bb.shape is not None:
        trailing = len(a.shape) - (axis % len(a.shape)) - len(bb.shape)
        if trailing > 0:
            expanded = b.tmp("b_aligned")
            b.emit("Unsqueeze", [bb, b.const_i64(list(range(len(bb.shape), len(bb.shape) + trailing)))],
                   {}, outputs=[expanded])
            bb = expanded
    elif b.attr("broadcast", 0) and axis is not None:
        b.unsupported("legacy broadcast with an axis on inputs of unknown rank")
    b.emit(b.proto.op_type, [a, bb], attrs)


for _op in _LEGACY_BINARY:
    converter(_op, until=6)(_legacy_binary)

_LEGACY_UNARY = ("Abs", "Ceil", "Elu", "Exp", "Floor", "HardSigmoid", "LeakyRelu", "Log", "Neg", "Reciprocal", "Relu",
                 "Selu", "Sigmoid", "Sqrt", "Tanh", "Max", "Min", "Sum", "Mean")


def _drop_consumed_inputs(b) -> None:
    attrs = {k: v for k, v in b.attrs().items() if k != "consumed_inputs"}
    b.emit(b.proto.op_type, b.inputs(), attrs)


for _op in _LEGACY_UNARY:
    converter(_op, until=5)(_drop_consumed_inputs)
