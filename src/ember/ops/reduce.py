"""Reductions (axes as an input, opset-18 form), ArgMax/ArgMin, CumSum/CumProd.

Reducing over an empty set gives the reduction's identity (0 for sums, 1 for products, -inf for
max and log-sums, +inf for min), as ONNX specifies. Integer reductions keep the input dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..ir.dtypes import DType
from ..ir.shapes import Dim
from .activation import softmax_rows
from .elementwise import WIDE_UNSIGNED, as_computable, ordered, restore, unordered
from .lowering import Builder, Operand, need
from .registry import op, shape_rule


def _axes(x: torch.Tensor, axes: Optional[torch.Tensor]) -> list[int]:
    if axes is None or axes.numel() == 0:
        return list(range(x.dim()))
    return sorted({int(a) % max(x.dim(), 1) for a in axes.reshape(-1).tolist()})


def _is_noop(axes: Optional[torch.Tensor], noop_with_empty_axes: int) -> bool:
    return bool(noop_with_empty_axes) and (axes is None or axes.numel() == 0)


def _identity_fill(x: torch.Tensor, dims: list[int], keepdims: int, value: float) -> torch.Tensor:
    shape = [1 if i in dims else d for i, d in enumerate(x.shape)] if keepdims else \
        [d for i, d in enumerate(x.shape) if i not in dims]
    if not x.is_floating_point() and value in (float("inf"), float("-inf")):
        info = torch.iinfo(x.dtype) if x.dtype != torch.bool else None
        value = (info.max if value > 0 else info.min) if info else (value > 0)
    return torch.full(shape, value, dtype=x.dtype, device=x.device)


def _sum_rows(operand: str, finish: str = "") -> "Callable[[Builder, object, list], Operand]":
    """A last-axis reduction as a row sum of ``operand`` ({0}: the element), then ``finish`` ({0}: the sum)."""

    def lower(b: Builder, node, args: list) -> Operand:
        need(node, [a for a in args if a is not None], "f")
        x = args[0]
        s = b.reduce("sum", x if operand == "{0}" else b.fmt(operand, "f", x))
        return b.fmt(finish.replace("{n}", b.row_length), "f", s) if finish else s

    return lower


def _extreme_rows(b: Builder, node, args: list) -> Operand:
    need(node, [a for a in args if a is not None], "f")
    return b.reduce("max" if node.op == "ReduceMax" else "min", args[0])


# the fused row kernels' form of each reduction over the last axis
ROW_LOWERINGS = {"Sum": _sum_rows("{0}"), "Mean": _sum_rows("{0}", "({0} / {n})"), "Max": _extreme_rows,
                 "Min": _extreme_rows, "SumSquare": _sum_rows("({0} * {0})"), "L1": _sum_rows("tl.abs({0})"),
                 "L2": _sum_rows("({0} * {0})", "tl.sqrt({0})"), "LogSumExp": softmax_rows}


def _reduction(name: str, fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor], empty_value: float,
               float_only: bool = False, by_order: bool = False) -> None:
    """Register Reduce<name>. ``fn(x, dims, keepdim)`` runs on a dtype torch supports."""

    def ref(data, axes=None, *, keepdims: int = 1, noop_with_empty_axes: int = 0):
        if _is_noop(axes, noop_with_empty_axes):
            return data
        dims = _axes(data, axes)
        if data.dim() == 0:
            return fn(data.reshape(1), [0], False).reshape(()).to(data.dtype)
        if any(data.shape[d] == 0 for d in dims):
            return _identity_fill(data, dims, keepdims, empty_value)
        dt = data.dtype
        if dt in (torch.float16, torch.bfloat16) or (float_only and not data.is_floating_point()):
            return fn(data.double() if not data.is_floating_point() else data.float(), dims, bool(keepdims)).to(dt)
        if by_order:  # max/min: uint64 compared through its order-preserving signed form
            return unordered(fn(ordered(data), dims, bool(keepdims)), dt)
        return restore(fn(as_computable(data), dims, bool(keepdims)), dt)

    ref.__name__ = "reduce_" + name.lower()
    # Mean, Max and Min stay in range in fp16; sums and products may overflow it: fp32
    low = ("data",) if name in ("Mean", "Max", "Min") else None
    op("Reduce" + name, kind="reduction", host_inputs=("axes",), triton=ROW_LOWERINGS.get(name),
       low_precision=low)(ref)
    shape_rule("Reduce" + name)(lambda node: _reduce_rule(node))  # defined below


def _minmax(fn):
    def run(x, dims, keep):
        if x.dtype == torch.bool:
            return fn(x.to(torch.uint8), dim=dims, keepdim=keep).to(torch.bool)
        return fn(x, dim=dims, keepdim=keep)
    return run


def _sum(x, dims, keep):
    return torch.sum(x, dim=dims, keepdim=keep, dtype=x.dtype)


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep, dtype=x.dtype)
    return x


def _mean(x, dims, keep):
    if x.is_floating_point():
        return torch.mean(x, dim=dims, keepdim=keep)
    return torch.sum(x.double(), dim=dims, keepdim=keep) / _count(x, dims)


def _count(x, dims) -> int:
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n


_reduction("Sum", _sum, 0.0)
_reduction("Prod", _prod, 1.0)
_reduction("Mean", _mean, float("nan"))
_reduction("Max", _minmax(torch.amax), float("-inf"), by_order=True)
_reduction("Min", _minmax(torch.amin), float("inf"), by_order=True)
_reduction("L1", lambda x, d, k: torch.sum(x.abs(), dim=d, keepdim=k, dtype=x.dtype), 0.0)
_reduction("L2", lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)), 0.0, float_only=True)
_reduction("SumSquare", lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k, dtype=x.dtype), 0.0)
_reduction("LogSum", lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)), float("-inf"), float_only=True)
_reduction("LogSumExp", lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k), float("-inf"), float_only=True)


def _reduce_rule(node):
    x = node.inputs[0]
    axes_v = node.inputs[1] if len(node.inputs) > 1 else None
    if x.shape is None:
        return [(x.dtype, None)]
    rank = len(x.shape)
    if axes_v is None or (axes_v.is_const and axes_v.data.size == 0):
        if node.attrs.get("noop_with_empty_axes", 0):
            return [(x.dtype, x.shape)]
        dims = set(range(rank))
    elif axes_v.is_const:
        dims = {int(a) % max(rank, 1) for a in axes_v.data.reshape(-1)}
    else:  # axes computed at run time: only the rank is known with keepdims
        return [(x.dtype, None)]
    return [(x.dtype, _reduced_shape(x.shape, dims, bool(node.attrs.get("keepdims", 1))))]


def _reduced_shape(shape: tuple[Dim, ...], dims: set[int], keep: bool) -> tuple[Dim, ...]:
    if keep:
        return tuple(1 if i in dims else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in dims)


# -- ArgMax / ArgMin ------------------------------------------------------------------------------
def _arg(fn):
    def ref(data, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0):
        axis = axis % max(data.dim(), 1)
        x = ordered(data) if data.dtype in WIDE_UNSIGNED else data
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        if select_last_index:  # first hit in the flipped tensor is the last one in the original
            idx = data.shape[axis] - 1 - fn(torch.flip(x, [axis]), dim=axis, keepdim=bool(keepdims))
        else:
            idx = fn(x, dim=axis, keepdim=bool(keepdims))
        return idx.to(torch.int64)
    return ref


op("ArgMax", kind="reduction", low_precision="all")(_arg(torch.argmax))
op("ArgMin", kind="reduction", low_precision="all")(_arg(torch.argmin))


@shape_rule("ArgMax", "ArgMin")
def _arg_rule(node):
    x = node.inputs[0]
    if x.shape is None:
        return [(DType.INT64, None)]
    axis = node.attrs.get("axis", 0) % max(len(x.shape), 1)
    return [(DType.INT64, _reduced_shape(x.shape, {axis}, bool(node.attrs.get("keepdims", 1))))]


# -- CumSum / CumProd -----------------------------------------------------------------------------
def _cumulative(x: torch.Tensor, axis: torch.Tensor, exclusive: int, reverse: int, fn, identity: int):
    dim = int(axis.reshape(-1)[0]) % max(x.dim(), 1)
    dt = x.dtype
    v = as_computable(x)
    if reverse:
        v = torch.flip(v, [dim])
    if exclusive:  # shift by one along dim, the identity entering first
        first = torch.full_like(v.narrow(dim, 0, 1), identity)
        v = torch.cat([first, v.narrow(dim, 0, v.shape[dim] - 1)], dim=dim)
    out = fn(v, dim=dim, dtype=v.dtype)
    if reverse:
        out = torch.flip(out, [dim])
    return restore(out, dt)


@op("CumSum", kind="other", host_inputs=("axis",))
def cum_sum(x, axis, *, exclusive: int = 0, reverse: int = 0):
    return _cumulative(x, axis, exclusive, reverse, torch.cumsum, 0)


@op("CumProd", kind="other", host_inputs=("axis",))
def cum_prod(x, axis, *, exclusive: int = 0, reverse: int = 0):
    return _cumulative(x, axis, exclusive, reverse, torch.cumprod, 1)


@shape_rule("CumSum", "CumProd")
def _cum_rule(node):
    return [(node.inputs[0].dtype, node.inputs[0].shape)]

