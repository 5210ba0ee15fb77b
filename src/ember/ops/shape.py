"""Shape arithmetic ops: Shape, Size, ConstantOfShape, Range, EyeLike.

Their outputs are small int64 tensors (or tensors whose size such a tensor decides); exporters
chain them into "shape subgraphs" that the optimizer folds once input shapes are known.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..ir.dtypes import ONNX_TO_DTYPE
from .registry import op
from .tensor import host_ints
from .torch_types import tensor_from_numpy, to_torch


def onnx_dtype(code: int) -> torch.dtype:
    """An ONNX TensorProto element type number as a torch dtype."""
    if code not in ONNX_TO_DTYPE:
        raise ValueError(f"ONNX element type {code} is not one ember runs")
    return to_torch(ONNX_TO_DTYPE[code])


@op("Shape", kind="shape")
def shape(data, *, start: int = 0, end: Optional[int] = None):
    dims = list(data.shape)
    r = len(dims)
    lo = start + r if start < 0 else start
    hi = r if end is None else (end + r if end < 0 else end)
    lo, hi = min(max(lo, 0), r), min(max(hi, 0), r)
    return torch.tensor(dims[lo:hi], dtype=torch.int64, device=data.device)


@op("Size", kind="shape")
def size(data):
    return torch.tensor(data.numel(), dtype=torch.int64, device=data.device)


@op("ConstantOfShape", kind="shape", host_inputs=("input",))
def constant_of_shape(input, *, value: Optional[np.ndarray] = None):
    dims = host_ints(input)
    if value is None:
        return torch.zeros(dims, dtype=torch.float32, device=input.device)
    fill = tensor_from_numpy(np.asarray(value).reshape(()), input.device)
    return fill.expand(dims).clone()


@op("Range", kind="shape", host_inputs=("start", "limit", "delta"))
def range_(start, limit, delta, *, stash_type: int = 1):
    dtype = start.dtype
    if dtype.is_floating_point:
        # fp16/bf16 are computed in the stash type (float32 by default); others in their own type
        compute = onnx_dtype(stash_type) if dtype in (torch.float16, torch.bfloat16) else torch.float64
        s, l, d = (float(t.to(compute).item()) for t in (start, limit, delta))
        n = max(math.ceil((l - s) / d), 0)
        idx = torch.arange(n, dtype=compute, device=start.device)
        return (torch.tensor(s, dtype=compute, device=start.device) + idx * torch.tensor(d, dtype=compute)).to(dtype)
    s, l, d = int(start.item()), int(limit.item()), int(delta.item())
    n = max(-(-(l - s) // d), 0)
    return (s + torch.arange(n, dtype=torch.int64, device=start.device) * d).to(dtype)


@op("EyeLike", kind="other")
def eye_like(input, *, dtype: Optional[int] = None, k: int = 0):
    out_dtype = onnx_dtype(dtype) if dtype is not None else input.dtype
    n, m = input.shape
    rows = torch.arange(n, device=input.device).unsqueeze(1)
    cols = torch.arange(m, device=input.device).unsqueeze(0)
    return (cols - rows == k).to(out_dtype)
