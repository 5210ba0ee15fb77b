"""Casts and linear quantization: Cast, CastLike, QuantizeLinear, DequantizeLinear,
DynamicQuantizeLinear, QLinearMatMul.

Cast's ``to`` is the ONNX TensorProto element-type number (as in ONNX), or an ember dtype name.
FP8 casts follow ONNX's tables: with ``saturate`` finite overflow and infinities clamp to the
largest finite value; without it they become NaN (E4M3FN) or infinity (E5M2).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.dtypes import DType, ONNX_TO_DTYPE
from .elementwise import as_computable
from .linalg import int_matmul, matmul_shape
from .lowering import Builder, Operand, Unsupported, kind_of, tl_type, zero
from .registry import op, shape_rule
from .torch_types import to_torch

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_QUANT_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535),
                 torch.int16: (-32768, 32767)}


def dtype_of_attr(to: "int | str | DType") -> DType:
    """Cast's ``to``: an ONNX element-type number or an ember dtype name."""
    if isinstance(to, int):
        if to not in ONNX_TO_DTYPE:
            raise ValueError(f"ONNX element type {to} is not one ember runs")
        return ONNX_TO_DTYPE[to]
    return DType.parse(to)


def cast_tensor(x: torch.Tensor, dtype: torch.dtype, saturate: int = 1) -> torch.Tensor:
    """ONNX Cast semantics on torch tensors, including the unsigned and FP8 dtypes."""
    if x.dtype == dtype:
        return x
    if dtype in FP8:
        v = x if x.is_floating_point() and x.dtype not in FP8 else x.float()
        if saturate:
            fmax = torch.finfo(dtype).max
            v = torch.where(torch.isnan(v), v, v.clamp(-fmax, fmax))
        elif dtype == torch.float8_e4m3fn:  # torch saturates; ONNX wants NaN past the rounding range
            v = torch.where(v.abs() > 464.0, torch.full_like(v, float("nan")), v)
        return v.to(dtype)
    if x.dtype in FP8:
        x = x.float()
    if dtype == torch.bool:
        return x != 0
    if not dtype.is_floating_point and x.is_floating_point() and dtype in (torch.uint16, torch.uint32, torch.uint64):
        # float -> unsigned: go through int64 so values keep their integer part
        return x.to(torch.int64).to(dtype) if dtype != torch.uint64 else x.to(torch.int64).view(torch.uint64)
    if x.dtype == torch.uint64 and dtype.is_floating_point:
        return x.to(torch.float64).to(dtype)
    return x.to(dtype)


def _cast_lowering(b: Builder, node, args: list) -> Operand:
    """ONNX Cast in a fused kernel: float -> narrower float rounds through the target type; -> bool is x != 0."""
    x, src = args[0], node.inputs[0].dtype
    dst = dtype_of_attr(node.attrs["to"]) if node.op == "Cast" else node.inputs[1].dtype
    k = kind_of(dst)
    if src is None:
        raise Unsupported(f"node '{node.name}' (Cast): input dtype unknown")
    if dst == DType.UINT8 and x.kind == "f":
        raise Unsupported(f"node '{node.name}' (Cast): float -> uint8 wraps differently in torch and Triton")
    if k == "b":
        return b.fmt("({0} != " + zero(x.kind) + ")", "b", x) if x.kind != "b" else x
    if k == "f":
        if dst in (DType.FLOAT16, DType.BFLOAT16) and src != dst:
            return b.fmt("{0}.to(" + tl_type(dst) + ").to(tl.float32)", "f", x)
        return x if x.kind == "f" else b.fmt("{0}.to(tl.float32)", "f", x)
    return b.fmt("{0}.to(" + tl_type(dst) + ")", "i", x)


@op("Cast", kind="pointwise", triton=_cast_lowering)
def cast(input, *, to, saturate: int = 1, round_mode: str = "up"):  # noqa: A002  (ONNX names)
    """round_mode only matters for FLOAT8E8M0, which ember does not run."""
    return cast_tensor(input, to_torch(dtype_of_attr(to)), saturate)


@op("CastLike", kind="pointwise", type_inputs=("target_type",), triton=_cast_lowering)
def cast_like(input, target_type, *, saturate: int = 1, round_mode: str = "up"):  # noqa: A002
    return cast_tensor(input, target_type.dtype, saturate)


@shape_rule("Cast")
def _cast_rule(node):
    return [(dtype_of_attr(node.attrs["to"]), node.inputs[0].shape)]


@shape_rule("CastLike")
def _cast_like_rule(node):
    return [(node.inputs[1].dtype, node.inputs[0].shape)]


# -- quantization ---------------------------------------------------------------------------------
def expand_param(p: torch.Tensor, x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """A scale or zero point shaped to broadcast over x: per tensor, per axis, or blocked along axis."""
    if p.dim() == 0 or p.numel() == 1 and x.dim() != p.dim():
        return p.reshape(())
    axis = axis % x.dim()
    if p.dim() == 1 and not block_size:
        shape = [1] * x.dim()
        shape[axis] = p.shape[0]
        return p.reshape(shape)
    if block_size:
        return torch.repeat_interleave(p, block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    return p


def _quant_dtype(zero_point: Optional[torch.Tensor], output_dtype: int) -> torch.dtype:
    if zero_point is not None:
        return zero_point.dtype
    if output_dtype:
        return to_torch(dtype_of_attr(output_dtype))
    return torch.uint8


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], qdtype: torch.dtype,
             saturate: int = 1, precision: Optional[torch.dtype] = None) -> torch.Tensor:
    """saturate(round_half_even(x / scale) + zero_point); scale/zero_point already broadcastable."""
    if precision is not None:
        q = x.to(precision) / scale.to(precision)
    else:
        ct = torch.promote_types(x.dtype, scale.dtype)
        q = x.to(ct) / scale.to(ct)
    if qdtype in FP8:
        return cast_tensor(q, qdtype, saturate)
    lo, hi = _QUANT_RANGES[qdtype]
    qi = torch.round(q.double())
    if zero_point is not None:
        qi = qi + as_computable(zero_point).double()
    return torch.clamp(qi, lo, hi).to(torch.int64).to(qdtype)


def _scalar_param(node, i: int) -> bool:
    v = node.inputs[i] if len(node.inputs) > i else None
    return v is None or (v.shape is not None and all(d == 1 for d in v.shape))


def _quantize_lowering(b: Builder, node, args: list) -> Operand:
    """QuantizeLinear per tensor to int8/uint8 in a fused kernel: saturate(rint(x / scale) + zero_point)."""
    x, s = args[0], args[1]
    zp = args[2] if len(args) > 2 else None
    out = node.outputs[0].dtype
    if (out not in (DType.INT8, DType.UINT8) or not all(_scalar_param(node, i) for i in (1, 2))
            or node.attrs.get("precision", 0) or not node.attrs.get("saturate", 1) or node.attrs.get("block_size", 0)
            or x.kind != "f" or s.kind != "f"):
        raise Unsupported(f"node '{node.name}' (QuantizeLinear): per-tensor int8/uint8 from floats only")
    lo, hi = (-128.0, 127.0) if out == DType.INT8 else (0.0, 255.0)
    q = b.fmt("tm.rint(tl.math.div_rn({0}, {1}))", "f", x, s)
    if zp is not None:
        q = b.fmt("({0} + {1})", "f", q, _as_float(b, zp))
    return b.fmt(f"tl.minimum(tl.maximum({{0}}, {lo}), {hi}).to(tl.int32)", "i", q)


def _dequantize_lowering(b: Builder, node, args: list) -> Operand:
    """DequantizeLinear per tensor from int8/uint8 in a fused kernel: (x - zero_point) * scale."""
    x, s = args[0], args[1]
    zp = args[2] if len(args) > 2 else None
    if (node.inputs[0].dtype not in (DType.INT8, DType.UINT8) or not all(_scalar_param(node, i) for i in (1, 2))
            or node.attrs.get("block_size", 0) or s.kind != "f"):
        raise Unsupported(f"node '{node.name}' (DequantizeLinear): per-tensor int8/uint8 only")
    v = b.fmt("{0}.to(tl.float32)", "f", x)
    if zp is not None:
        v = b.fmt("({0} - {1})", "f", v, _as_float(b, zp))
    return b.fmt("({0} * {1})", "f", v, s)


def _as_float(b: Builder, v: Operand) -> Operand:
    """An operand as fp32: a literal written as a float, a variable converted."""
    if not v.var:
        return Operand(repr(float(v.text)), v.level, "f", var=False)
    return b.fmt("{0}.to(tl.float32)", "f", v)


@op("QuantizeLinear", kind="pointwise", triton=_quantize_lowering)
def quantize_linear(x, y_scale, y_zero_point=None, *, axis: int = 1, block_size: int = 0, output_dtype: int = 0,
                    saturate: int = 1, precision: int = 0):
    qdtype = _quant_dtype(y_zero_point, output_dtype)
    scale = expand_param(y_scale, x, axis, block_size)
    zp = expand_param(y_zero_point, x, axis, block_size) if y_zero_point is not None else None
    if qdtype in FP8:
        zp = None  # FP8 zero points are zero by definition
    prec = to_torch(dtype_of_attr(precision)) if precision else None
    return quantize(x, scale, zp, qdtype, saturate, prec)


@op("DequantizeLinear", kind="pointwise", triton=_dequantize_lowering)
def dequantize_linear(x, x_scale, x_zero_point=None, *, axis: int = 1, block_size: int = 0, output_dtype: int = 0):
    """(x - zero_point) * scale, in the scale's dtype unless output_dtype says otherwise."""
    scale = expand_param(x_scale, x, axis, block_size)
    if x.dtype in FP8:
        dx = x.float()
    else:
        dx = as_computable(x).to(torch.float32)
        if x_zero_point is not None:
            zp = expand_param(x_zero_point, x, axis, block_size)
            dx = (as_computable(x).to(torch.int64) - as_computable(zp).to(torch.int64)).to(torch.float32)
    out_dtype = to_torch(dtype_of_attr(output_dtype)) if output_dtype else x_scale.dtype
    return (dx * scale.float()).to(out_dtype)


@op("DynamicQuantizeLinear", kind="other")
def dynamic_quantize_linear(x):
    """uint8 quantization with a scale and zero point computed from x's range (which includes 0)."""
    xf = x.float()
    hi = torch.clamp(xf.max(), min=0.0) if xf.numel() else torch.zeros((), device=x.device)
    lo = torch.clamp(xf.min(), max=0.0) if xf.numel() else torch.zeros((), device=x.device)
    scale = torch.where(hi == lo, torch.ones_like(hi), hi - lo) / 255.0
    zp = torch.round(torch.clamp(0.0 - lo / scale, 0.0, 255.0))
    y = torch.clamp(torch.round(xf / scale) + zp, 0.0, 255.0)
    return y.to(torch.uint8), scale.to(x.dtype), zp.to(torch.uint8)


@op("QLinearMatMul", kind="anchor")
def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    acc = int_matmul(a.to(torch.int64) - a_zero_point.to(torch.int64),
                     b.to(torch.int64) - b_zero_point.to(torch.int64))
    # scales combine in their own dtype first, as the ONNX reference does
    s = (a_scale * b_scale / y_scale).double()
    y = torch.round(acc.double() * s) + y_zero_point.to(torch.int64).double()
    lo, hi = _QUANT_RANGES[y_zero_point.dtype]
    return torch.clamp(y, lo, hi).to(y_zero_point.dtype)


@shape_rule("QuantizeLinear")
def _quantize_rule(node):
    x = node.inputs[0]
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if zp is not None:
        dt = zp.dtype
    elif node.attrs.get("output_dtype", 0):
        dt = dtype_of_attr(node.attrs["output_dtype"])
    else:
        dt = DType.UINT8
    return [(dt, x.shape)]


@shape_rule("DequantizeLinear")
def _dequantize_rule(node):
    x, scale = node.inputs[:2]
    od = node.attrs.get("output_dtype", 0)
    return [(dtype_of_attr(od) if od else scale.dtype, x.shape)]



@shape_rule("DynamicQuantizeLinear")
def _dynamic_quantize_rule(node):
    x = node.inputs[0]
    return [(DType.UINT8, x.shape), (x.dtype, ()), (DType.UINT8, ())]


@shape_rule("QLinearMatMul")
def _qlinear_matmul_rule(node):
    a, b, y_zp = node.inputs[0], node.inputs[3], node.inputs[7]
    if a.shape is None or b.shape is None:
        return [(y_zp.dtype, None)]
    return [(y_zp.dtype, matmul_shape(a.shape, b.shape))]


@op("BitCast", kind="pointwise")
def bitcast(x, *, to: int):
    """Reinterpret the bits as another type of the same width (little endian, as torch stores)."""
    dt = ONNX_TO_DTYPE.get(to)
    if dt is None:
        raise ValueError(f"BitCast to ONNX type {to}, which ember does not run")
    target = to_torch(dt)
    if x.element_size() != torch.empty((), dtype=target).element_size():
        raise ValueError(f"BitCast from {x.dtype} to {target}: the bit widths differ")
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)  # same byte, 0 or 1
    return x.view(target)


@shape_rule("BitCast")
def _bitcast_shape(node):
    return [(ONNX_TO_DTYPE.get(node.attrs["to"]), node.inputs[0].shape)]
