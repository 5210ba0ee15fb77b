"""Indexing: Slice, Gather*, Scatter*, TensorScatter, Compress, NonZero, OneHot, ReverseSequence.

ONNX indices may be negative (counted from the end); they are wrapped before torch sees them.
torch's gather/scatter kernels lack uint16/32/64, so those tensors move as same-width signed
ints (a bit reinterpretation, exact for data movement).
"""
from __future__ import annotations

from typing import Optional

import torch

from .registry import op
from .tensor import host_ints, norm_axis

_SIGNED_TWIN = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def as_movable(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 16/32/64-bit data as signed so gather/scatter kernels accept it."""
    twin = _SIGNED_TWIN.get(x.dtype)
    return x.view(twin) if twin is not None else x


def restore(x: torch.Tensor, like_dtype: torch.dtype) -> torch.Tensor:
    return x.view(like_dtype) if x.dtype != like_dtype else x


def wrap_indices(indices: torch.Tensor, dim: int) -> torch.Tensor:
    idx = indices.to(torch.int64)
    return torch.where(idx < 0, idx + dim, idx)


# -- Slice ----------------------------------------------------------------------------------------
def slice_bounds(dim: int, start: int, end: int, step: int) -> tuple[int, int, int]:
    """ONNX Slice clamping: negative values count from the end, then clamp to the valid range."""
    if step == 0:
        raise ValueError("Slice step cannot be 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return start, end, step


@op("Slice", kind="view", host_inputs=("starts", "ends", "axes", "steps"), low_precision=("data",))
def slice_(data, starts, ends, axes=None, steps=None):
    st, en = host_ints(starts), host_ints(ends)
    ax = host_ints(axes) if axes is not None else list(range(len(st)))
    sp = host_ints(steps) if steps is not None else [1] * len(st)
    out = data
    for s, e, a, k in zip(st, en, ax, sp):
        a = norm_axis(a, data.dim())
        s, e, k = slice_bounds(data.shape[a], s, e, k)
        if k > 0:
            index = [slice(None)] * a + [slice(s, max(e, s), k)]
            out = out[tuple(index)]
        else:
            picks = torch.arange(s, e, k, device=data.device)
            out = out.index_select(a, picks)
    return out


# -- Gather ---------------------------------------------------------------------------------------
@op("Gather", kind="other", low_precision=("data",))
def gather(data, indices, *, axis: int = 0):
    axis = norm_axis(axis, data.dim())
    idx = wrap_indices(indices, data.shape[axis])
    picked = data.index_select(axis, idx.reshape(-1))
    return picked.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


@op("GatherElements", kind="other", low_precision=("data",))
def gather_elements(data, indices, *, axis: int = 0):
    axis = norm_axis(axis, data.dim())
    idx = wrap_indices(indices, data.shape[axis])
    return restore(torch.gather(as_movable(data), axis, idx), data.dtype)


@op("GatherND", kind="other")
def gather_nd(data, indices, *, batch_dims: int = 0):
    b = batch_dims
    batch_shape = tuple(data.shape[:b])
    k = indices.shape[-1]
    n_batch = 1
    for d in batch_shape:
        n_batch *= d
    flat_data = data.reshape((n_batch,) + tuple(data.shape[b:]))
    idx = indices.to(torch.int64).reshape(n_batch, -1, k)
    # negative indices wrap, column by column with Python ints (no host->device copy: capturable)
    cols = tuple(torch.where(idx[..., j] < 0, idx[..., j] + int(d), idx[..., j])
                 for j, d in enumerate(data.shape[b:b + k]))
    batch_ids = torch.arange(n_batch, device=data.device).unsqueeze(1)
    picked = flat_data[(batch_ids,) + cols]
    return picked.reshape(batch_shape + tuple(indices.shape[b:-1]) + tuple(data.shape[b + k:]))


# -- Scatter --------------------------------------------------------------------------------------
_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@op("ScatterElements", kind="other", aliases=("Scatter",))
def scatter_elements(data, indices, updates, *, axis: int = 0, reduction: str = "none"):
    axis = norm_axis(axis, data.dim())
    idx = wrap_indices(indices, data.shape[axis])
    if reduction in ("max", "min") and data.dtype in _SIGNED_TWIN:
        # order matters: compare as wide signed ints (exact below 2**63)
        out = data.to(torch.int64).scatter_reduce(axis, idx, updates.to(torch.int64), _REDUCE[reduction])
        return out.to(data.dtype)
    x, u = as_movable(data), as_movable(updates)
    if reduction == "none":
        out = x.scatter(axis, idx, u)
    elif reduction == "add":
        out = x.scatter_add(axis, idx, u)
    elif reduction in _REDUCE:
        out = x.scatter_reduce(axis, idx, u, _REDUCE[reduction], include_self=True)
    else:
        raise ValueError(f"ScatterElements reduction '{reduction}' is not one of none, add, mul, max, min")
    return restore(out, data.dtype)


@op("ScatterND", kind="other")
def scatter_nd(data, indices, updates, *, reduction: str = "none"):
    k = indices.shape[-1]
    lead = tuple(data.shape[:k])
    rest = tuple(data.shape[k:])
    idx = indices.to(torch.int64).reshape(-1, k)
    strides = [1] * k
    for j in range(k - 2, -1, -1):
        strides[j] = strides[j + 1] * lead[j + 1]
    # wrap negative indices and linearize with Python ints (no host->device copy: capturable)
    linear = torch.zeros(idx.shape[0], dtype=torch.int64, device=data.device)
    for j in range(k):
        col = idx[:, j]
        linear = linear + torch.where(col < 0, col + lead[j], col) * strides[j]
    n_lead = 1
    for d in lead:
        n_lead *= d
    signed = reduction in ("max", "min") and data.dtype in _SIGNED_TWIN
    x = data.to(torch.int64) if signed else as_movable(data)
    u = updates.to(torch.int64) if signed else as_movable(updates)
    flat = x.reshape((n_lead,) + rest).clone()
    upd = u.reshape((-1,) + rest)
    if reduction == "none":
        flat[linear] = upd
    elif reduction == "add":
        flat.index_add_(0, linear, upd)
    elif reduction in _REDUCE:
        expanded = linear.reshape((-1,) + (1,) * len(rest)).expand(upd.shape)
        flat = flat.scatter_reduce(0, expanded, upd, _REDUCE[reduction], include_self=True)
    else:
        raise ValueError(f"ScatterND reduction '{reduction}' is not one of none, add, mul, max, min")
    out = flat.reshape(data.shape)
    return out.to(data.dtype) if signed else restore(out, data.dtype)


@op("TensorScatter", kind="other")
def tensor_scatter(past_cache, update, write_indices=None, *, axis: int = -2, mode: str = "linear"):
    """Write ``update`` into a KV cache at per-batch offsets along ``axis`` (dim 0 is the batch)."""
    axis = norm_axis(axis, past_cache.dim())
    batch, max_len, seq = past_cache.shape[0], past_cache.shape[axis], update.shape[axis]
    if write_indices is None:
        write_indices = torch.zeros(batch, dtype=torch.int64, device=past_cache.device)
    pos = write_indices.to(torch.int64).reshape(batch, 1) + torch.arange(seq, device=past_cache.device)
    if mode == "circular":
        pos = torch.remainder(pos, max_len)
    elif mode != "linear":
        raise ValueError(f"TensorScatter mode '{mode}' is not one of linear, circular")
    # index shaped like update: batch on dim 0, positions on `axis`, broadcast elsewhere
    shape = [1] * update.dim()
    shape[0], shape[axis] = batch, seq
    index = pos.reshape(shape).expand(update.shape)
    out = as_movable(past_cache).scatter(axis, index, as_movable(update))
    return restore(out, past_cache.dtype)


# -- selection ------------------------------------------------------------------------------------
@op("Compress", kind="other")
def compress(input, condition, *, axis: Optional[int] = None):
    x = input.reshape(-1) if axis is None else input
    a = 0 if axis is None else norm_axis(axis, input.dim())
    cond = condition.reshape(-1).to(torch.bool)[: x.shape[a]]
    picks = torch.nonzero(cond).reshape(-1)
    return x.index_select(a, picks)


@op("NonZero", kind="other")
def nonzero(X):
    x = X.to(torch.int64) if X.dtype in _SIGNED_TWIN else X
    if x.dim() == 0:
        return torch.zeros((0, int(bool(x.item()))), dtype=torch.int64, device=X.device)
    return torch.nonzero(x).t().contiguous()


@op("OneHot", kind="other", host_inputs=("depth",))
def one_hot(indices, depth, values, *, axis: int = -1):
    d = int(depth.reshape(()).to(torch.float64).item())
    rank = indices.dim() + 1
    axis = norm_axis(axis, rank)
    idx = indices.to(torch.int64)  # float indices truncate, as numpy's astype does
    idx = torch.where(idx < 0, idx + d, idx)
    classes = torch.arange(d, device=indices.device)
    hot = idx.unsqueeze(-1) == classes  # [..., depth]; out-of-range rows match nothing
    hot = hot.movedim(-1, axis)
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return torch.where(hot, on, off)


@op("ReverseSequence", kind="other")
def reverse_sequence(input, sequence_lens, *, batch_axis: int = 1, time_axis: int = 0):
    t_len = input.shape[time_axis]
    lens = sequence_lens.to(torch.int64)
    t = torch.arange(t_len, device=input.device)
    src = torch.where(t.unsqueeze(0) < lens.unsqueeze(1), lens.unsqueeze(1) - 1 - t.unsqueeze(0), t.unsqueeze(0))
    # src is [batch, time]; lay it out on (batch_axis, time_axis) and broadcast the rest
    shape = [1] * input.dim()
    shape[batch_axis], shape[time_axis] = src.shape[0], t_len
    order = (0, 1) if batch_axis < time_axis else (1, 0)
    index = src.permute(*order).reshape(shape).expand(input.shape)
    return restore(torch.gather(as_movable(input), time_axis, index), input.dtype)
