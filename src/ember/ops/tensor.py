"""Tensor layout and indexing: reshape, transpose, slice, gather, scatter, concat, split, pad..."""
from __future__ import annotations

import torch

from .registry import op


@op("Reshape", kind="view")
def reshape(data, shape, *, allowzero: int = 0):
    dims = [int(d) for d in shape.tolist()]
    if not allowzero:
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)
