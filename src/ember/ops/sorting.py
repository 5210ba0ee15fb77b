"""Order-dependent selection: TopK and Unique (ties resolved by index, as ONNX specifies)."""
from __future__ import annotations

from typing import Optional

import torch

from .registry import op
from .index import as_movable, restore
from .tensor import norm_axis


def _sort_key(x: torch.Tensor) -> torch.Tensor:
    """A tensor ordered like x that torch can sort on every device (CUDA lacks unsigned sorts)."""
    if x.dtype in (torch.uint16, torch.uint32):
        return x.to(torch.int64)
    if x.dtype == torch.uint64:  # flipping the sign bit maps unsigned order onto signed order
        return x.view(torch.int64) ^ torch.iinfo(torch.int64).min
    return x


@op("TopK", kind="other", host_inputs=("K",), low_precision=("X",))
def top_k(X, K, *, axis: int = -1, largest: int = 1, sorted: int = 1):
    axis = norm_axis(axis, X.dim())
    k = int(K.reshape(-1)[0].item())
    # a stable sort keeps the lower index first among equal values (torch.topk does not promise it)
    _, indices = torch.sort(_sort_key(X), dim=axis, descending=bool(largest), stable=True)
    indices = indices.narrow(axis, 0, k)
    values = torch.gather(as_movable(X), axis, indices)
    return restore(values, X.dtype), indices


@op("Unique", kind="other")
def unique(X, *, axis: Optional[int] = None, sorted: int = 1):
    x = X.reshape(-1) if axis is None else X
    a = 0 if axis is None else norm_axis(axis, X.dim())
    y, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True, dim=a)
    n = y.shape[a]
    positions = torch.arange(x.shape[a], device=X.device)
    first = torch.full((n,), x.shape[a], dtype=torch.int64, device=X.device)
    first = first.scatter_reduce(0, inverse, positions, "amin")
    if not sorted:  # order of first occurrence
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=X.device)
        y, first, counts, inverse = y.index_select(a, order), first[order], counts[order], rank[inverse]
    return y, first, inverse.to(torch.int64), counts.to(torch.int64)
