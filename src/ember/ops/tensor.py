"""Tensor layout: reshape, transpose, concat, split, squeeze, expand, pad, tile, depth/space moves.

Shape-like inputs (``shape``, ``axes``, ``pads``, ``repeats``, ``split``) are small int64 tensors read
on the host: they decide output shapes, so they are needed before any device work is launched.
"""
from __future__ import annotations

from typing import Optional

import torch

from .registry import op


def host_ints(t: Optional[torch.Tensor]) -> Optional[list[int]]:
    """A shape-like tensor as Python ints (None stays None)."""
    if t is None:
        return None
    return [int(v) for v in t.reshape(-1).tolist()]


def norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def broadcast_to_shape(in_shape: list[int], target: list[int]) -> list[int]:
    """Two-way numpy broadcast of Expand (a target dim of 1 keeps the input's dim)."""
    rank = max(len(in_shape), len(target))
    a = [1] * (rank - len(in_shape)) + list(in_shape)
    b = [1] * (rank - len(target)) + list(target)
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"shape {in_shape} cannot be expanded to {target}")
        out.append(y if x == 1 else x)
    return out


@op("Reshape", kind="view", host_inputs=("shape",), low_precision=("data",))
def reshape(data, shape, *, allowzero: int = 0):
    dims = host_ints(shape)
    if not allowzero:
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)


@op("Transpose", kind="view", low_precision="all")
def transpose(data, *, perm: Optional[list[int]] = None):
    if perm is None:
        perm = list(range(data.dim() - 1, -1, -1))
    return data.permute(*perm)


@op("Concat", kind="view", low_precision="all")
def concat(*inputs, axis: int):
    rank = max(t.dim() for t in inputs)
    return torch.cat(list(inputs), dim=norm_axis(axis, rank))


@op("Squeeze", kind="view", host_inputs=("axes",), low_precision=("data",))
def squeeze(data, axes=None):
    if axes is None:
        return data.reshape([d for d in data.shape if d != 1])
    drop = {norm_axis(a, data.dim()) for a in host_ints(axes)}
    for a in drop:
        if data.shape[a] != 1:
            raise ValueError(f"cannot squeeze axis {a} of size {data.shape[a]}")
    return data.reshape([d for i, d in enumerate(data.shape) if i not in drop])


@op("Unsqueeze", kind="view", host_inputs=("axes",), low_precision=("data",))
def unsqueeze(data, axes):
    rank = data.dim() + axes.numel()
    new = sorted(norm_axis(a, rank) for a in host_ints(axes))
    shape = list(data.shape)
    for a in new:
        shape.insert(a, 1)
    return data.reshape(shape)


@op("Flatten", kind="view", low_precision="all")
def flatten(input, *, axis: int = 1):
    axis = axis + input.dim() if axis < 0 else axis
    outer = 1
    for d in input.shape[:axis]:
        outer *= d
    inner = 1
    for d in input.shape[axis:]:
        inner *= d
    return input.reshape(outer, inner)


@op("Expand", kind="view", host_inputs=("shape",), low_precision=("input",))
def expand(input, shape):
    out = broadcast_to_shape(list(input.shape), host_ints(shape))
    return input.reshape([1] * (len(out) - input.dim()) + list(input.shape)).expand(out)


@op("Tile", kind="other", host_inputs=("repeats",), low_precision=("input",))
def tile(input, repeats):
    reps = host_ints(repeats)
    if input.dim() == 0:
        return input.clone()
    return input.repeat(*reps)


@op("Identity", kind="view", low_precision="all")
def identity(input):
    return input  # tensors, sequences (lists) and optionals (None) alike


@op("Split", kind="view", host_inputs=("split",), low_precision=("input",))
def split(input, split=None, *, axis: int = 0, num_outputs: Optional[int] = None, ctx):
    axis = norm_axis(axis, input.dim())
    dim = input.shape[axis]
    if split is not None:
        sizes = host_ints(split)
    else:
        n = num_outputs if num_outputs is not None else ctx.num_outputs
        chunk = -(-dim // n)  # ceil: only the last part may be smaller
        sizes = [min(chunk, max(dim - i * chunk, 0)) for i in range(n)]
    return tuple(torch.split(input, sizes, dim=axis))


def _pad_source_index(n: int, before: int, after: int, mode: str, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """For each output position along one axis, the input position it reads (and where it is padding)."""
    src = torch.arange(-before, n + after, device=device)
    if mode == "constant":
        inside = (src >= 0) & (src < n)
        return src.clamp(0, max(n - 1, 0)), ~inside
    if mode == "edge":
        return src.clamp(0, n - 1), None
    if mode == "wrap":
        return torch.remainder(src, n), None
    if mode == "reflect":
        if n == 1:
            return torch.zeros_like(src), None
        period = 2 * (n - 1)
        m = torch.remainder(src, period)
        return torch.where(m < n, m, period - m), None
    raise ValueError(f"Pad mode '{mode}' is not one of constant, reflect, edge, wrap")


@op("Pad", kind="other", host_inputs=("pads", "axes"), low_precision=("data", "constant_value"))
def pad(data, pads, constant_value=None, axes=None, *, mode: str = "constant"):
    rank = data.dim()
    p = host_ints(pads)
    ax = [norm_axis(a, rank) for a in host_ints(axes)] if axes is not None else list(range(rank))
    n_ax = len(ax)
    out = data
    pad_mask = None  # positions that take constant_value: an OR of per-axis masks, size 1 elsewhere
    for i, a in enumerate(ax):
        before, after = p[i], p[i + n_ax]
        if before < 0 or after < 0:  # crop first: wrap/reflect/edge read the cropped data
            lo, hi = max(-before, 0), max(-after, 0)
            out = out.narrow(a, lo, max(out.shape[a] - lo - hi, 0))
            before, after = max(before, 0), max(after, 0)
        if before == 0 and after == 0:
            continue
        idx, is_pad = _pad_source_index(out.shape[a], before, after, mode, data.device)
        if out.shape[a] == 0 and idx.numel() > 0:
            if mode != "constant":
                raise ValueError(f"Pad mode '{mode}' cannot pad an empty axis {a}")
            shape = list(out.shape)
            shape[a] = idx.numel()
            out = out.new_zeros(shape)
        else:
            out = out.index_select(a, idx)
        if is_pad is not None:
            shape = [1] * rank
            shape[a] = is_pad.numel()
            m = is_pad.reshape(shape)
            pad_mask = m if pad_mask is None else (pad_mask | m)
    if pad_mask is not None:
        value = constant_value.reshape(()).to(data.dtype) if constant_value is not None else \
            torch.zeros((), dtype=data.dtype, device=data.device)
        out = torch.where(pad_mask, value, out)
    return out


@op("CenterCropPad", kind="other", host_inputs=("shape",))
def center_crop_pad(input_data, shape, *, axes: Optional[list[int]] = None):
    rank = input_data.dim()
    ax = [norm_axis(a, rank) for a in axes] if axes is not None else list(range(rank))
    out = input_data
    for a, target in zip(ax, host_ints(shape)):
        dim = out.shape[a]
        if target < dim:  # crop: the extra odd element comes off the end
            out = out.narrow(a, (dim - target) // 2, target)
        elif target > dim:  # pad with zeros: the extra odd element goes at the end
            new_shape = list(out.shape)
            new_shape[a] = target
            padded = out.new_zeros(new_shape)
            padded.narrow(a, (target - dim) // 2, dim).copy_(out)
            out = padded
    return out


@op("DepthToSpace", kind="view", low_precision="all")
def depth_to_space(input, *, blocksize: int, mode: str = "DCR"):
    b, c, h, w = input.shape
    bs = blocksize
    if mode == "DCR":
        t = input.reshape(b, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        t = input.reshape(b, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return t.reshape(b, c // (bs * bs), h * bs, w * bs)


@op("SpaceToDepth", kind="view", low_precision="all")
def space_to_depth(input, *, blocksize: int, mode: str = "DCR"):
    b, c, h, w = input.shape
    bs = blocksize
    t = input.reshape(b, c, h // bs, bs, w // bs, bs)
    if mode == "DCR":
        t = t.permute(0, 3, 5, 1, 2, 4)
    else:
        t = t.permute(0, 1, 3, 5, 2, 4)
    return t.reshape(b, c * bs * bs, h // bs, w // bs)


@op("Trilu", kind="pointwise", host_inputs=("k",))
def trilu(input, k=None, *, upper: int = 1):
    kk = int(k.reshape(()).item()) if k is not None else 0
    n, m = input.shape[-2], input.shape[-1]
    rows = torch.arange(n, device=input.device).unsqueeze(1)
    cols = torch.arange(m, device=input.device).unsqueeze(0)
    keep = (cols - rows >= kk) if upper else (cols - rows <= kk)
    return torch.where(keep, input, torch.zeros((), dtype=input.dtype, device=input.device))
