"""Pooling: MaxPool (with ONNX Indices), AveragePool, LpPool, the global pools, MaxUnpool.

Padding is always applied explicitly (F.pad) and the kernels run with padding=0, so ONNX's
asymmetric pads, auto_pad and ceil_mode (a last window that may hang past the end padding but
must start inside input or begin padding) are handled in one place: ``pool_geometry``.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ..ir.dtypes import DType
from ..ir.graph import Node
from .nn import compute_dtype, output_size, pool_geometry, torch_pad_arg, window
from .registry import op, shape_rule

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _sum_pool(x: torch.Tensor, kernel, strides, dilations) -> torch.Tensor:
    """Window sums over (N, C, spatial...), the input already padded so that windows fit exactly.

    One strided slice per kernel offset, added up: exact in the input's precision (a convolution
    with a kernel of ones would run in TF32 on CUDA) and dilations come for free."""
    n = x.dim() - 2
    outs = [(x.shape[2 + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(n)]
    total = None
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                      for o, d, m, s in zip(offset, dilations, outs, strides))
        part = x[(slice(None), slice(None), *index)]
        total = part.clone() if total is None else total.add_(part)
    return total


def _window_sums_and_counts(x: torch.Tensor, *, auto_pad, ceil_mode, dilations, kernel_shape, pads, strides,
                            count_include_pad: bool):
    """Sum of each window (zero padding) and the number of elements it averages over."""
    n = x.dim() - 2
    win = window(n, kernel_shape, strides, dilations, pads, auto_pad)
    outs, begin, end, extra = pool_geometry(win, x.shape[2:], bool(ceil_mode))
    xp = F.pad(x, torch_pad_arg(begin, [e + x_ for e, x_ in zip(end, extra)]))
    sums = _sum_pool(xp, win.kernel, win.strides, win.dilations)
    # count: input elements, plus the explicit pads when count_include_pad (never the ceil extension)
    ones = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    if count_include_pad:
        ones = F.pad(ones, torch_pad_arg(begin, end), value=1.0)
        ones = F.pad(ones, torch_pad_arg([0] * n, extra))
    else:
        ones = F.pad(ones, torch_pad_arg(begin, [e + x_ for e, x_ in zip(end, extra)]))
    counts = _sum_pool(ones, win.kernel, win.strides, win.dilations)
    return sums, counts


@op("AveragePool", kind="reduction", low_precision=("x",))
def average_pool(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, count_include_pad: int = 0,
                 dilations: list = None, kernel_shape: list, pads: list = None, strides: list = None):
    ct = compute_dtype(x)
    sums, counts = _window_sums_and_counts(x.to(ct), auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                           kernel_shape=kernel_shape, pads=pads, strides=strides,
                                           count_include_pad=bool(count_include_pad))
    return (sums / counts).to(x.dtype)


@op("LpPool", kind="reduction")
def lp_pool(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations: list = None, kernel_shape: list,
            p: int = 2, pads: list = None, strides: list = None):
    ct = compute_dtype(x)
    sums, _ = _window_sums_and_counts(x.to(ct).abs().pow(p), auto_pad=auto_pad, ceil_mode=ceil_mode,
                                      dilations=dilations, kernel_shape=kernel_shape, pads=pads, strides=strides,
                                      count_include_pad=True)
    return sums.pow(1.0 / p).to(x.dtype)


@op("MaxPool", kind="reduction", low_precision=("x",))
def max_pool(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations: list = None, kernel_shape: list,
             pads: list = None, storage_order: int = 0, strides: list = None, ctx=None):
    n = x.dim() - 2
    if n not in _MAX_POOL:
        raise NotImplementedError(f"MaxPool over {n} spatial axes (ember runs 1, 2 or 3)")
    win = window(n, kernel_shape, strides, dilations, pads, auto_pad)
    outs, begin, end, extra = pool_geometry(win, x.shape[2:], bool(ceil_mode))
    ct = x.dtype if x.dtype in (torch.float32, torch.float64) else compute_dtype(x)
    xp = F.pad(x.to(ct), torch_pad_arg(begin, [e + x_ for e, x_ in zip(end, extra)]), value=-math.inf)
    want_indices = ctx is not None and ctx.num_outputs > 1
    res = _MAX_POOL[n](xp, win.kernel, win.strides, 0, win.dilations, return_indices=want_indices)
    if not want_indices:
        return res.to(x.dtype)
    y, flat = res
    return y.to(x.dtype), _onnx_indices(flat, x.shape, xp.shape[2:], begin, storage_order)


def _onnx_indices(flat: torch.Tensor, x_shape, padded: list, begin: list, storage_order: int) -> torch.Tensor:
    """torch's per-plane index into the padded input -> ONNX's index into the whole unpadded input."""
    N, C, *spatial = x_shape
    coords = []
    rest = flat
    for size in reversed(padded):
        coords.append(rest % size)
        rest = rest // size
    coords = [c - b for c, b in zip(reversed(coords), begin)]
    idx = torch.zeros_like(flat)
    if storage_order == 0:  # row-major
        for c, size in zip(coords, spatial):
            idx = idx * size + c
    else:  # column-major over the spatial axes
        stride = 1
        for c, size in zip(coords, spatial):
            idx = idx + c * stride
            stride *= size
    plane = torch.arange(N * C, device=flat.device, dtype=flat.dtype).reshape(N, C, *([1] * len(spatial)))
    return idx + plane * math.prod(spatial)


@op("GlobalAveragePool", kind="reduction", low_precision="all")
def global_average_pool(x):
    return x.to(compute_dtype(x)).mean(dim=tuple(range(2, x.dim())), keepdim=True).to(x.dtype)


@op("GlobalMaxPool", kind="reduction", low_precision="all")
def global_max_pool(x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalLpPool", kind="reduction")
def global_lp_pool(x, *, p: int = 2):
    xf = x.to(compute_dtype(x))
    return xf.abs().pow(p).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(1.0 / p).to(x.dtype)


@op("MaxUnpool", kind="other", host_inputs=("output_shape",))
def max_unpool(x, indices, output_shape=None, *, kernel_shape: list, pads: list = None, strides: list = None):
    n = x.dim() - 2
    win = window(n, kernel_shape, strides, None, pads)
    inferred = list(x.shape[:2]) + [(x.shape[2 + i] - 1) * win.strides[i] + win.kernel[i] - win.pads[i]
                                    - win.pads[n + i] for i in range(n)]
    y = torch.zeros(math.prod(inferred), dtype=x.dtype, device=x.device)
    y.scatter_(0, indices.reshape(-1).long(), x.reshape(-1))
    y = y.reshape(inferred)
    if output_shape is None:
        return y
    # indices address the inferred shape; a given output_shape only zero-extends it at the end
    shape = [int(d) for d in output_shape.tolist()]
    return F.pad(y, torch_pad_arg([0] * len(shape), [o - i for o, i in zip(shape, inferred)]))


# -- shape rules ----------------------------------------------------------------------------------
def _pool_rule(node: Node):
    x = node.inputs[0]
    if x.shape is None:
        return [(x.dtype, None)] + [(DType.INT64, None)] * (len(node.outputs) - 1)
    n = len(x.shape) - 2
    a = node.attrs
    win = window(n, a["kernel_shape"], a.get("strides"), a.get("dilations"), a.get("pads"),
                 a.get("auto_pad", "NOTSET"))
    spatial = [output_size(win, i, x.shape[2 + i], bool(a.get("ceil_mode", 0))) for i in range(n)]
    shape = None if any(d is None for d in spatial) else (x.shape[0], x.shape[1], *spatial)
    return [(x.dtype, shape)] + [(DType.INT64, shape)] * (len(node.outputs) - 1)


shape_rule("MaxPool", "AveragePool", "LpPool")(_pool_rule)


@shape_rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool_rule(node: Node):
    x = node.inputs[0]
    if x.shape is None:
        return [(x.dtype, None)]
    return [(x.dtype, (*x.shape[:2], *([1] * (len(x.shape) - 2))))]
