"""Quantized anchors: a GEMM or convolution on INT8 or FP8 operands with its epilogue folded in.

    ember.QGemm(a, b, a_scale, b_scale, bias?, residual?, a_zero_point?, y_scale?, y_zero_point?, smooth?)
    ember.QConv(x, w, x_scale, w_scale, bias?, residual?, x_zero_point?, y_scale?, y_zero_point?)

    y = epilogue(a_scale * b_scale[n] * sum_k (qa[m, k] - a_zero_point) * qb[k, n] + bias[n]) (+ residual)
    then, with y_scale: requantized, saturate(round_half_even(y / y_scale) + y_zero_point)

The quantized type is the weight's: int8 (symmetric, per output channel) or float8_e4m3fn. The
activation ``a`` arrives either as floats, quantized here per tensor (``round(a * smooth / a_scale)
+ a_zero_point`` saturated to int8, or cast to E4M3 saturating at 448: the QuantizeLinear a
Q/DQ model puts before the anchor, folded in), or already quantized (int8 / uint8 with its zero
point, E4M3). ``smooth`` (QGemm): SmoothQuant's per-input-channel factors, applied before
quantizing (the weight rows carry their inverse). The epilogue attributes are ember.Gemm's and
ember.Conv's (bias, activation, residual in either order); it computes in fp32. Without
``y_scale`` the output is float of ``output_dtype`` (an ONNX type code, 0: float32); with it,
the type of ``y_zero_point`` (int8 if absent) or E4M3.

These reference functions are the exact numerics (CPU path): integer products accumulate exactly
(float64 holds every int8 x int8 sum ember meets), rounded once to fp32 as an int32 accumulator
converts; E4M3 products are exact in float64 too. passes/qdq.py rewrites Q/DQ models, QLinearConv,
QLinearMatMul, ConvInteger/MatMulInteger with their scales, and calibrated graphs into these ops;
kernels/quantized.py has the fast kernels (cuBLASLt int8, torch._scaled_mm, Triton templates).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir.dtypes import DType
from ..ir.graph import Node, Value
from .fused import CONV_ATTRS, epilogue
from .nn import output_size, window
from .quant import dtype_of_attr
from .registry import get, op, shape_rule
from .torch_types import to_torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite E4M3 (fn) value
INT8_RANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255)}
QUANTIZED_DTYPES = (torch.int8, torch.uint8, FP8)


def rne(t: torch.Tensor) -> torch.Tensor:
    """Round half to even (torch.round's rule, as ONNX QuantizeLinear asks)."""
    return torch.round(t)


def quantize_activation(a: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], qtype: torch.dtype,
                        smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A float activation quantized per tensor: int8/uint8 (the zero point's type) or E4M3."""
    v = a.float()
    if smooth is not None:
        v = v * smooth.float()
    v = v / scale.float().reshape(())
    if qtype == FP8:
        return torch.nan_to_num(v, nan=0.0).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    qdt = zero_point.dtype if zero_point is not None else torch.int8
    lo, hi = INT8_RANGE[qdt]
    q = rne(v.double())
    if zero_point is not None:
        q = q + zero_point.double().reshape(())
    return q.clamp(lo, hi).to(qdt)


def _centered(q: torch.Tensor, zero_point: Optional[torch.Tensor]) -> torch.Tensor:
    """q - zero_point as exact float64 values (E4M3 values as they are)."""
    qd = q.double() if q.dtype != FP8 else q.float().double()
    if zero_point is not None and q.dtype != FP8:
        qd = qd - zero_point.double().reshape(())
    return qd


def _quantized_input(a: torch.Tensor, a_scale: torch.Tensor, a_zero_point: Optional[torch.Tensor], qtype: torch.dtype,
                     smooth: Optional[torch.Tensor]) -> torch.Tensor:
    if a.dtype in QUANTIZED_DTYPES:
        return a
    return quantize_activation(a, a_scale, a_zero_point, qtype, smooth)


def finish(acc: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
           activation: str, act_keys, act_values, act_after_residual: int, y_scale: Optional[torch.Tensor],
           y_zero_point: Optional[torch.Tensor], qtype: torch.dtype, output_dtype: int) -> torch.Tensor:
    """The epilogue in fp32: dequantize (``scale`` broadcasts over the accumulator), bias, activation,
    residual; then requantize with ``y_scale`` or cast to the float output type."""
    y = acc.float() * scale
    if bias is not None:
        y = y + bias.float()
    y = epilogue(y, residual.float() if residual is not None else None, activation, act_keys, act_values,
                 act_after_residual)
    if y_scale is None:
        return y.to(to_torch(dtype_of_attr(output_dtype)) if output_dtype else torch.float32)
    return quantize_activation(y, y_scale, y_zero_point, qtype)


@op("ember.QGemm", kind="anchor", low_precision=("a", "bias", "residual"))
def quantized_gemm(a, b, a_scale, b_scale, bias=None, residual=None, a_zero_point=None, y_scale=None,
                   y_zero_point=None, smooth=None, *, trans_b: int = 0, activation: str = "",
                   act_keys: Optional[list] = None, act_values: Optional[list] = None, act_after_residual: int = 0,
                   output_dtype: int = 0):
    """INT8/FP8 GEMM ``a [.., K] @ b [K, N]`` (``b [N, K]`` with trans_b) with a dequantize / bias /
    activation / residual / requantize epilogue (see the module docstring)."""
    qtype = b.dtype
    qa = _quantized_input(a, a_scale, a_zero_point, qtype, smooth)
    bd = _centered(b, None)
    if trans_b:
        bd = bd.transpose(-1, -2)
    acc = torch.matmul(_centered(qa, a_zero_point), bd)  # exact in float64
    scale = a_scale.float().reshape(()) * b_scale.float().reshape(-1)
    return finish(acc, scale, bias, residual, activation, act_keys, act_values, act_after_residual, y_scale,
                  y_zero_point, qtype, output_dtype)


@op("ember.QConv", kind="anchor", low_precision=("x", "bias", "residual"))
def quantized_conv(x, w, x_scale, w_scale, bias=None, residual=None, x_zero_point=None, y_scale=None,
                   y_zero_point=None, *, auto_pad: str = "NOTSET", dilations: Optional[list] = None, group: int = 1,
                   kernel_shape: Optional[list] = None, pads: Optional[list] = None, strides: Optional[list] = None,
                   activation: str = "", act_keys: Optional[list] = None, act_values: Optional[list] = None,
                   act_after_residual: int = 0, output_dtype: int = 0):
    """INT8/FP8 convolution with per-output-channel weight scales and the QGemm epilogue. Padding is
    the activation's real zero (its zero point, in the quantized domain)."""
    from .conv import _conv_core

    qtype = w.dtype
    qx = _quantized_input(x, x_scale, x_zero_point, qtype, None)
    acc = _conv_core(_centered(qx, x_zero_point), _centered(w, None), auto_pad=auto_pad, dilations=dilations,
                     group=group, kernel_shape=kernel_shape, pads=pads, strides=strides)
    channel = [1, -1] + [1] * (acc.dim() - 2)
    scale = (x_scale.float().reshape(()) * w_scale.float().reshape(-1)).reshape(channel)
    b = bias.reshape(channel) if bias is not None else None
    return finish(acc, scale, b, residual, activation, act_keys, act_values, act_after_residual, y_scale,
                  y_zero_point, qtype, output_dtype)


def output_type(node: Node, weight: Optional[Value]) -> Optional[DType]:
    """The dtype of a quantized anchor's output: requantized (y_zero_point's type, or the weight's
    quantized type) or the float ``output_dtype``."""
    ins = node.inputs + [None] * (9 - len(node.inputs))
    if ins[7] is not None:
        if ins[8] is not None:
            return ins[8].dtype
        return DType.FLOAT8E4M3 if weight is not None and weight.dtype == DType.FLOAT8E4M3 else DType.INT8
    od = node.attrs.get("output_dtype", 0)
    return dtype_of_attr(od) if od else DType.FLOAT32


@shape_rule("ember.QGemm")
def _qgemm_shape(node: Node):
    a, b = node.inputs[0], node.inputs[1]
    dt = output_type(node, b)
    if a.shape is None or b.shape is None or len(b.shape) != 2 or len(a.shape) < 1:
        return [(dt, None)]
    n = b.shape[0] if node.attrs.get("trans_b") else b.shape[1]
    return [(dt, tuple(a.shape[:-1]) + (n,))]


@shape_rule("ember.QConv")
def _qconv_shape(node: Node):
    x, w = node.inputs[0], node.inputs[1]
    dt = output_type(node, w)
    if x.shape is None or w.shape is None:
        return [(dt, None)]
    n = len(x.shape) - 2
    a = node.attrs
    win = window(n, a.get("kernel_shape") or w.shape[2:], a.get("strides"), a.get("dilations"), a.get("pads"),
                 a.get("auto_pad", "NOTSET"))
    return [(dt, (x.shape[0], w.shape[0], *(output_size(win, i, x.shape[2 + i]) for i in range(n))))]


QGEMM_ATTRS = ("trans_b", "activation", "act_keys", "act_values", "act_after_residual", "output_dtype")
QCONV_ATTRS = CONV_ATTRS + ("activation", "act_keys", "act_values", "act_after_residual", "output_dtype")


def quantized_op_of(op_name: str) -> Optional[str]:
    """The quantized anchor an op becomes in an INT8/FP8 engine (its OpDef.quant), or None."""
    spec = get(op_name).quant
    return spec.quantized_op if spec is not None else None
