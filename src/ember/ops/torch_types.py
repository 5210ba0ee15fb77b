"""DType <-> torch.dtype."""
from __future__ import annotations

import numpy as np
import torch

from ..ir.dtypes import DType, to_numpy

_TO_TORCH = {
    DType.BOOL: torch.bool, DType.INT8: torch.int8, DType.INT16: torch.int16, DType.INT32: torch.int32,
    DType.INT64: torch.int64, DType.UINT8: torch.uint8, DType.UINT16: torch.uint16,
    DType.UINT32: torch.uint32, DType.UINT64: torch.uint64, DType.FLOAT16: torch.float16,
    DType.BFLOAT16: torch.bfloat16, DType.FLOAT32: torch.float32, DType.FLOAT64: torch.float64,
    DType.FLOAT8E4M3: torch.float8_e4m3fn, DType.FLOAT8E5M2: torch.float8_e5m2,
}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}


def to_torch(dt: DType) -> torch.dtype:
    return _TO_TORCH[DType.parse(dt)]


def from_torch(dt: torch.dtype) -> DType:
    try:
        return _FROM_TORCH[dt]
    except KeyError:
        raise ValueError(f"torch dtype {dt} has no ember equivalent") from None


def tensor_from_numpy(a: np.ndarray, device: "torch.device | str" = "cpu") -> torch.Tensor:
    """numpy (including ml_dtypes bf16/fp8 arrays) -> torch, copying."""
    a = np.asarray(a)
    name = a.dtype.name
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        raw = np.ascontiguousarray(a).view(np.uint8 if a.dtype.itemsize == 1 else np.uint16).copy()
        t = torch.from_numpy(raw).view(to_torch(DType(name))).reshape(a.shape)  # ascontiguousarray makes 0-d 1-d
    elif name in ("uint16", "uint32", "uint64"):
        t = torch.from_numpy(np.ascontiguousarray(a).copy())
    else:
        t = torch.from_numpy(np.array(a, copy=True))
    return t.to(device) if str(device) != "cpu" else t


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    dt = from_torch(t.dtype)
    if dt in (DType.BFLOAT16, DType.FLOAT8E4M3, DType.FLOAT8E5M2):
        raw = t.contiguous().view(torch.uint8 if dt.itemsize == 1 else torch.int16).numpy()
        return raw.view(to_numpy(dt))
    return t.contiguous().numpy()


def to_torch_value(x, device: "torch.device | str" = "cpu"):
    """A runtime value from the user side: array -> tensor, list -> sequence, None -> empty optional."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return [to_torch_value(e, device) for e in x]
    return tensor_from_numpy(np.asarray(x), device)


def to_numpy_value(x):
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [to_numpy_value(e) for e in x]
    return tensor_to_numpy(x)
