"""Normalizations: Batch (inference and training forms), Instance, Layer, Group, RMS, LRN, Lp, MVN.

Statistics are accumulated in float32 at least (halves are widened), as DESIGN.md's numerics ask;
``stash_type`` = 1 (float32) is what every exporter writes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir.dtypes import DType
from ..ir.graph import Node
from .infer import same_as_input
from .lowering import Builder, Operand, Unsupported, fnum, need
from .nn import compute_dtype
from .registry import op, shape_rule


def _per_channel(t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).reshape(1, -1, *([1] * (ndim - 2)))


@op("BatchNormalization", kind="pointwise")
def batch_normalization(x, scale, b, input_mean, input_var, *, epsilon: float = 1e-5, momentum: float = 0.9,
                        training_mode: int = 0):
    ct = compute_dtype(x)
    xf = x.to(ct)
    if not training_mode:
        inv = torch.rsqrt(input_var.to(ct) + epsilon)
        mul = _per_channel(scale.to(ct) * inv, x.dim(), ct)
        y = (xf - _per_channel(input_mean, x.dim(), ct)) * mul + _per_channel(b, x.dim(), ct)
        return y.to(x.dtype)
    dims = [0] + list(range(2, x.dim()))
    mean = xf.mean(dim=dims)
    var = xf.var(dim=dims, unbiased=False)
    y = (xf - _per_channel(mean, x.dim(), ct)) * _per_channel(scale.to(ct) * torch.rsqrt(var + epsilon), x.dim(), ct)
    y = y + _per_channel(b, x.dim(), ct)
    running_mean = input_mean.to(ct) * momentum + mean * (1 - momentum)
    running_var = input_var.to(ct) * momentum + var * (1 - momentum)
    return y.to(x.dtype), running_mean.to(input_mean.dtype), running_var.to(input_var.dtype)


@op("InstanceNormalization", kind="reduction", low_precision="all")
def instance_normalization(x, scale, b, *, epsilon: float = 1e-5):
    ct = compute_dtype(x)
    xf = x.to(ct)
    dims = tuple(range(2, x.dim()))
    mean = xf.mean(dim=dims, keepdim=True)
    var = xf.var(dim=dims, unbiased=False, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + epsilon) * _per_channel(scale, x.dim(), ct) + _per_channel(b, x.dim(), ct)
    return y.to(x.dtype)


def _stash_dtype(x: torch.Tensor, stash_type: int) -> torch.dtype:
    return torch.float32 if stash_type == 1 and x.dtype != torch.float64 else compute_dtype(x)


def _layer_norm_rows(b: Builder, node, args: list) -> Operand:
    if node.attrs.get("stash_type", 1) != 1:
        raise Unsupported(f"node '{node.name}' (LayerNormalization): stash_type other than float32")
    need(node, [a for a in args if a is not None], "f")
    x, n = args[0], b.row_length
    mean = b.fmt("({0} / " + n + ")", "f", b.reduce("sum", x))
    d = b.fmt("({0} - {1})", "f", x, mean)
    var = b.fmt("({0} / " + n + ")", "f", b.reduce("sum", b.fmt("({0} * {0})", "f", d)))
    rstd = b.fmt("tl.rsqrt({0} + " + fnum(node.attrs.get("epsilon", 1e-5)) + ")", "f", var)
    y = b.fmt("({0} * {1} * {2})", "f", d, rstd, args[1])
    return b.fmt("({0} + {1})", "f", y, args[2]) if len(args) > 2 and args[2] is not None else y


def _rms_norm_rows(b: Builder, node, args: list) -> Operand:
    need(node, [a for a in args if a is not None], "f")
    x, n = args[0], b.row_length
    ms = b.fmt("({0} / " + n + ")", "f", b.reduce("sum", b.fmt("({0} * {0})", "f", x)))
    rstd = b.fmt("tl.rsqrt({0} + " + fnum(node.attrs.get("epsilon", 1e-5)) + ")", "f", ms)
    return b.fmt("({0} * {1} * {2})", "f", x, rstd, args[1])


@op("LayerNormalization", kind="reduction", triton=_layer_norm_rows, low_precision="all")
def layer_normalization(x, scale, b=None, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1,
                        ctx=None):
    ct = _stash_dtype(x, stash_type)
    axis = axis % x.dim()
    dims = tuple(range(axis, x.dim()))
    xf = x.to(ct)
    mean = xf.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(((xf - mean) ** 2).mean(dim=dims, keepdim=True) + epsilon)
    y = (xf - mean) * inv_std * scale.to(ct)
    if b is not None:
        y = y + b.to(ct)
    if ctx is None or ctx.num_outputs == 1:
        return y.to(x.dtype)
    stat_dtype = _declared_torch_dtype(ctx, 1) or (torch.float32 if stash_type == 1 else x.dtype)
    return y.to(x.dtype), mean.to(stat_dtype), inv_std.to(stat_dtype)


def _declared_torch_dtype(ctx, i: int):
    from .torch_types import to_torch

    if ctx is not None and len(ctx.output_dtypes) > i and ctx.output_dtypes[i] is not None:
        return to_torch(ctx.output_dtypes[i])
    return None


@op("GroupNormalization", kind="reduction", low_precision="all")
def group_normalization(x, scale, bias, *, epsilon: float = 1e-5, num_groups: int, stash_type: int = 1):
    ct = _stash_dtype(x, stash_type)
    N, C = x.shape[:2]
    xg = x.to(ct).reshape(N, num_groups, -1)
    mean = xg.mean(dim=2, keepdim=True)
    var = xg.var(dim=2, unbiased=False, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + epsilon)).reshape(x.shape)
    y = y * _per_channel(scale, x.dim(), ct) + _per_channel(bias, x.dim(), ct)
    return y.to(x.dtype)


@op("RMSNormalization", kind="reduction", triton=_rms_norm_rows, low_precision="all")
def rms_normalization(x, scale, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1):
    ct = _stash_dtype(x, stash_type)
    axis = axis % x.dim()
    xf = x.to(ct)
    ms = (xf * xf).mean(dim=tuple(range(axis, x.dim())), keepdim=True)
    return (xf * torch.rsqrt(ms + epsilon) * scale.to(ct)).to(x.dtype)


@op("LRN", kind="other")
def lrn(x, *, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0, size: int):
    ct = compute_dtype(x)
    xf = x.to(ct)
    sq = xf * xf
    # ONNX's window is [c - floor((size-1)/2), c + ceil((size-1)/2)] (torch centres even sizes the other way)
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    C = x.shape[1]
    pad = [0, 0] * (x.dim() - 2) + [front, back]
    sqp = F.pad(sq, pad)
    total = sum(sqp[:, i:i + C] for i in range(size))
    return (xf / (bias + alpha / size * total) ** beta).to(x.dtype)


@op("LpNormalization", kind="reduction")
def lp_normalization(x, *, axis: int = -1, p: int = 2):
    ct = compute_dtype(x)
    xf = x.to(ct)
    norm = xf.abs().sum(dim=axis, keepdim=True) if p == 1 else (xf * xf).sum(dim=axis, keepdim=True).sqrt()
    # a zero vector stays zero (the reference's 0/0 is defined as 0)
    return torch.where(norm == 0, torch.zeros_like(xf), xf / norm).to(x.dtype)


@op("MeanVarianceNormalization", kind="reduction")
def mean_variance_normalization(x, *, axes: list = (0, 2, 3)):
    ct = compute_dtype(x)
    xf = x.to(ct)
    dims = tuple(int(a) for a in axes)
    mean = xf.mean(dim=dims, keepdim=True)
    var = (xf * xf).mean(dim=dims, keepdim=True) - mean * mean
    return ((xf - mean) / (var.sqrt() + 1e-9)).to(x.dtype)


# -- shape rules ----------------------------------------------------------------------------------
shape_rule("InstanceNormalization", "GroupNormalization", "RMSNormalization", "LRN", "LpNormalization",
           "MeanVarianceNormalization")(same_as_input(0))


@shape_rule("BatchNormalization")
def _batch_norm_rule(node: Node):
    x, mean = node.inputs[0], node.inputs[3]
    return [(x.dtype, x.shape), (mean.dtype, mean.shape), (node.inputs[4].dtype, node.inputs[4].shape)][
        : len(node.outputs)]


@shape_rule("LayerNormalization")
def _layer_norm_rule(node: Node):
    x = node.inputs[0]
    out = [(x.dtype, x.shape)]
    if len(node.outputs) > 1:
        stat = None
        if x.shape is not None:
            axis = node.attrs.get("axis", -1) % len(x.shape)
            stat = (*x.shape[:axis], *([1] * (len(x.shape) - axis)))
        stat_dtype = DType.FLOAT32 if node.attrs.get("stash_type", 1) == 1 else x.dtype
        out += [(stat_dtype, stat)] * (len(node.outputs) - 1)
    return out
