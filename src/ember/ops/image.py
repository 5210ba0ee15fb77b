"""Image resampling: Resize (every ONNX mode), GridSample, AffineGrid.

Resize is separable: each resized axis is one gather of ``taps`` neighbours and a weighted sum.
The per-axis neighbour indices and weights depend only on shapes and attributes, so they are
computed on the host in float64 (exactly as the ONNX reference does) and applied on the device.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..ir.graph import Node
from .nn import compute_dtype
from .registry import OpContext, op, shape_rule


# -- Resize: coefficient tables -------------------------------------------------------------------
def _nearest_coeffs(ratio: np.ndarray, nearest_mode: str) -> np.ndarray:
    if nearest_mode == "round_prefer_floor":
        right = ratio > 0.5
    elif nearest_mode == "round_prefer_ceil":
        right = ratio >= 0.5
    elif nearest_mode == "floor":
        right = np.zeros_like(ratio, dtype=bool)
    elif nearest_mode == "ceil":
        right = np.ones_like(ratio, dtype=bool)
    else:
        raise ValueError(f"Resize: unknown nearest_mode '{nearest_mode}'")
    right = right | (ratio == 1.0)  # an exact integer coordinate is that pixel
    return np.stack([~right, right], axis=1).astype(np.float64)


def _cubic_kernel(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _coeffs(mode: str, ratio: np.ndarray, scale: float, *, antialias: bool, cubic_a: float,
            nearest_mode: str) -> np.ndarray:
    """Weights (out, taps) of the taps starting at the ONNX reference's neighbour window."""
    if mode == "nearest":
        return _nearest_coeffs(ratio, nearest_mode)
    if mode == "linear":
        if antialias and scale < 1.0:
            start = int(np.floor(-1 / scale) + 1)
            taps = np.arange(start, 2 - start)[None, :]
            c = np.clip(1 - np.abs((taps - ratio[:, None]) * scale), 0, 1)
            return c / c.sum(axis=1, keepdims=True)
        return np.stack([1 - ratio, ratio], axis=1)
    if mode == "cubic":
        s = min(scale, 1.0) if antialias else 1.0
        start = int(np.floor(-2 / s) + 1)
        taps = np.arange(start, 2 - start)[None, :]
        c = _cubic_kernel((taps - ratio[:, None]) * s, cubic_a)
        return c / c.sum(axis=1, keepdims=True) if antialias else c
    raise ValueError(f"Resize: unknown mode '{mode}'")


def _source_coords(mode: str, out_len: int, in_len: int, scale: float, roi: Optional[tuple[float, float]]):
    """Source coordinate of every output index, and which of them extrapolate (tf_crop_and_resize)."""
    y = np.arange(out_len, dtype=np.float64)
    out_f = scale * in_len
    if mode == "align_corners":
        x = np.zeros(out_len) if out_f == 1 else y * (in_len - 1) / (out_f - 1)
    elif mode == "asymmetric":
        x = y / scale
    elif mode == "tf_crop_and_resize":
        lo, hi = roi
        if out_f == 1:
            x = np.full(out_len, (hi - lo) * (in_len - 1) / 2)
        else:
            x = y * (hi - lo) * (in_len - 1) / (out_f - 1)
        x = x + lo * (in_len - 1)
        return x, (x < 0) | (x > in_len - 1)
    elif mode == "pytorch_half_pixel":
        x = np.full(out_len, -0.5) if out_f == 1 else (y + 0.5) / scale - 0.5
    elif mode == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif mode == "half_pixel_symmetric":
        adjustment = out_len / out_f
        x = in_len / 2 * (1 - adjustment) + (y + 0.5) / scale - 0.5
    else:
        raise ValueError(f"Resize: unknown coordinate_transformation_mode '{mode}'")
    return x, None


def _axis_table(in_len: int, out_len: int, scale: float, roi, a: dict):
    """(indices (out, taps) int64, weights (out, taps) float64, extrapolated mask or None) for one axis."""
    x, extrap = _source_coords(a["coordinate_transformation_mode"], out_len, in_len, scale, roi)
    x_int = np.floor(x)
    ratio = np.where(x == x_int, 1.0, x - x_int)  # prefer the pixel on the left: ratio in (0, 1]
    w = _coeffs(a["mode"], ratio, scale, antialias=bool(a["antialias"]), cubic_a=a["cubic_coeff_a"],
                nearest_mode=a["nearest_mode"])
    n = w.shape[1]
    pad = int(np.ceil(n / 2))
    xp = x + pad
    p = np.floor(xp).astype(np.int64)
    frac = xp - p
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        base = -((n - 1) // 2)
        offset = np.where(frac <= 0.5, base, base + 1)
    idx = (p + offset)[:, None] + np.arange(n)[None, :] - pad
    if a["exclude_outside"]:
        w = np.where((idx < 0) | (idx >= in_len), 0.0, w)
        s = w.sum(axis=1, keepdims=True)
        w = w / np.where(s == 0, 1.0, s)
    return np.clip(idx, 0, in_len - 1), w, extrap


def _resize_plan(shape: list[int], roi, scales, sizes, axes, keep_aspect_ratio_policy: str):
    """Per-axis (scale, output length, roi pair) over the full rank, as the ONNX reference derives them."""
    r = len(shape)
    axes = [a % r for a in axes] if axes else list(range(r))
    full_roi = None
    if roi is not None and len(roi):
        full_roi = [0.0] * r + [1.0] * r
        for i, d in enumerate(axes):
            full_roi[d], full_roi[r + d] = roi[i], roi[len(axes) + i]
    if sizes is not None and len(sizes):
        out = list(shape)
        for i, d in enumerate(axes):
            out[d] = int(sizes[i])
        scale = [out[i] / shape[i] for i in range(r)]
        if keep_aspect_ratio_policy != "stretch":
            pick = min if keep_aspect_ratio_policy == "not_larger" else max
            s = pick(scale[d] for d in axes)
            scale = [s if i in axes else 1.0 for i in range(r)]
            out = [int(s * shape[i] + 0.5) if i in axes else shape[i] for i in range(r)]
    else:
        scale = [1.0] * r
        for i, d in enumerate(axes):
            scale[d] = float(scales[i])
        out = [int(scale[i] * shape[i]) for i in range(r)]
    return axes, scale, out, full_roi


@op("Resize", kind="other", host_inputs=("roi", "scales", "sizes"), low_precision=("x",))
def resize(x, roi=None, scales=None, sizes=None, *, antialias: int = 0, axes: list = None,
           coordinate_transformation_mode: str = "half_pixel", cubic_coeff_a: float = -0.75,
           exclude_outside: int = 0, extrapolation_value: float = 0.0, keep_aspect_ratio_policy: str = "stretch",
           mode: str = "nearest", nearest_mode: str = "round_prefer_floor", ctx: OpContext = None):
    attrs = dict(antialias=antialias, coordinate_transformation_mode=coordinate_transformation_mode,
                 cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside, mode=mode, nearest_mode=nearest_mode)
    host = [None if t is None or t.numel() == 0 else t.detach().cpu().double().numpy().reshape(-1).tolist()
            for t in (roi, scales, sizes)]
    shape = list(x.shape)
    axes_, scale, out, full_roi = _resize_plan(shape, host[0], host[1], host[2], axes, keep_aspect_ratio_policy)
    r = len(shape)
    ct = compute_dtype(x)
    y = x.to(ct)
    for d in axes_:
        pair = None if full_roi is None else (full_roi[d], full_roi[r + d])
        if (math.isclose(scale[d], 1.0) and out[d] == y.shape[d]
                and (pair is None or (math.isclose(pair[0], 0.0) and math.isclose(pair[1], 1.0)))):
            continue  # identity along this axis
        key = (d, y.dim(), shape[d], out[d], scale[d], pair, y.dtype, y.device)
        table = (ctx.cached(key, lambda: _axis_tensors(y, d, shape[d], out[d], scale[d], pair, attrs))
                 if ctx is not None else _axis_tensors(y, d, shape[d], out[d], scale[d], pair, attrs))
        y = _resize_axis(y, d, out[d], table, extrapolation_value)
    return _cast_back(y, x.dtype)


def _axis_tensors(y: torch.Tensor, d: int, in_len: int, out_len: int, scale: float, roi, attrs: dict) -> tuple:
    """The gather indices and weights of one axis as device tensors: made once per planned step
    (OpContext.cached), so a run copies nothing from the host and can be captured in a CUDA graph."""
    if out_len == 0:
        return None, [], None
    idx, w, extrap = _axis_table(in_len, out_len, scale, roi, attrs)
    view = [1] * y.dim()
    view[d] = out_len
    mask = torch.as_tensor(extrap, device=y.device).reshape(view) if extrap is not None and extrap.any() else None
    if attrs["mode"] == "nearest" and np.all((w == 0) | (w == 1)):
        pick = idx[np.arange(out_len), w.argmax(axis=1)]
        return torch.as_tensor(pick, device=y.device), [], mask
    taps = [(torch.as_tensor(idx[:, t], device=y.device),
             torch.as_tensor(w[:, t], dtype=y.dtype, device=y.device).reshape(view)) for t in range(w.shape[1])]
    return None, taps, mask


def _resize_axis(y: torch.Tensor, d: int, out_len: int, table: tuple, extrapolation_value: float) -> torch.Tensor:
    pick, taps, mask = table
    if out_len == 0:
        shape = list(y.shape)
        shape[d] = 0
        return y.new_empty(shape)
    if pick is not None:
        res = torch.index_select(y, d, pick)
    else:
        res = None
        for index, weight in taps:
            term = torch.index_select(y, d, index) * weight
            res = term if res is None else res + term
    if mask is not None:
        res = res.masked_fill(mask, extrapolation_value)
    return res


def _cast_back(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return y.to(dtype)
    info = torch.iinfo(dtype)
    return torch.round(y).clamp(info.min, info.max).to(dtype)


@shape_rule("Resize")
def _resize_rule(node: Node):
    x = node.inputs[0]
    if x.shape is None:
        return [(x.dtype, None)]

    def const(i: int):
        v = node.inputs[i] if len(node.inputs) > i else None
        return None if v is None or v.data is None or v.data.size == 0 else v.data.reshape(-1).tolist()

    scales, sizes = const(2), const(3)
    a = node.attrs
    rank = len(x.shape)
    axes = [d % rank for d in a.get("axes") or range(rank)]
    policy = a.get("keep_aspect_ratio_policy", "stretch")
    out = list(x.shape)
    if sizes is not None and policy != "stretch":
        if not all(isinstance(x.shape[d], int) for d in axes):
            return [(x.dtype, None)]
        _, _, full, _ = _resize_plan([int(d) if isinstance(d, int) else 1 for d in x.shape], None, None, sizes,
                                     a.get("axes"), policy)
        for d in axes:
            out[d] = full[d]
    elif sizes is not None:
        for i, d in enumerate(axes):
            out[d] = int(sizes[i])
    elif scales is not None:
        for i, d in enumerate(axes):
            if scales[i] == 1.0:
                continue  # unit scale keeps a symbolic dim symbolic
            if not isinstance(x.shape[d], int):
                return [(x.dtype, None)]
            out[d] = int(float(scales[i]) * x.shape[d])
    else:
        return [(x.dtype, None)]
    return [(x.dtype, tuple(out))]


# -- GridSample / AffineGrid ----------------------------------------------------------------------
_GRID_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest", "cubic": "bicubic",
               "bicubic": "bicubic"}


@op("GridSample", kind="other")
def grid_sample(x, grid, *, align_corners: int = 0, mode: str = "linear", padding_mode: str = "zeros"):
    ct = compute_dtype(x)
    y = F.grid_sample(x.to(ct), grid.to(ct), mode=_GRID_MODES[mode], padding_mode=padding_mode,
                      align_corners=bool(align_corners))
    return y.to(x.dtype)


@shape_rule("GridSample")
def _grid_sample_rule(node: Node):
    x, g = node.inputs[0], node.inputs[1]
    if x.shape is None or g.shape is None:
        return [(x.dtype, None)]
    return [(x.dtype, (x.shape[0], x.shape[1], *g.shape[1:-1]))]


@op("AffineGrid", kind="other", host_inputs=("size",))
def affine_grid(theta, size, *, align_corners: int = 0):
    dims = [int(d) for d in size.tolist()]
    ct = compute_dtype(theta)
    return F.affine_grid(theta.to(ct), dims, align_corners=bool(align_corners)).to(theta.dtype)
