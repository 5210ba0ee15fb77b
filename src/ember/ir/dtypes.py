"""Element types of the IR and their mapping to numpy, torch and ONNX."""
from __future__ import annotations

import enum

import numpy as np


class DType(enum.Enum):
    BOOL = "bool"
    INT8 = "int8"
    INT16 = "int16"
    INT32 = "int32"
    INT64 = "int64"
    UINT8 = "uint8"
    UINT16 = "uint16"
    UINT32 = "uint32"
    UINT64 = "uint64"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    FLOAT8E4M3 = "float8_e4m3fn"
    FLOAT8E5M2 = "float8_e5m2"

    def __str__(self) -> str:
        return self.value

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_int(self) -> bool:
        return self in _INTS

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @staticmethod
    def parse(name: "str | DType") -> "DType":
        if isinstance(name, DType):
            return name
        try:
            return DType(name)
        except ValueError:
            raise ValueError(f"unknown dtype '{name}'; known: {', '.join(d.value for d in DType)}") from None


_FLOATS = {DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32, DType.FLOAT64, DType.FLOAT8E4M3, DType.FLOAT8E5M2}
_INTS = {DType.INT8, DType.INT16, DType.INT32, DType.INT64, DType.UINT8, DType.UINT16, DType.UINT32, DType.UINT64}
_ITEMSIZE = {
    DType.BOOL: 1, DType.INT8: 1, DType.UINT8: 1, DType.FLOAT8E4M3: 1, DType.FLOAT8E5M2: 1,
    DType.INT16: 2, DType.UINT16: 2, DType.FLOAT16: 2, DType.BFLOAT16: 2,
    DType.INT32: 4, DType.UINT32: 4, DType.FLOAT32: 4,
    DType.INT64: 8, DType.UINT64: 8, DType.FLOAT64: 8,
}

# ONNX TensorProto.DataType numbers (stable across onnx releases).
ONNX_TO_DTYPE: dict[int, DType] = {
    1: DType.FLOAT32, 2: DType.UINT8, 3: DType.INT8, 4: DType.UINT16, 5: DType.INT16, 6: DType.INT32,
    7: DType.INT64, 9: DType.BOOL, 10: DType.FLOAT16, 11: DType.FLOAT64, 12: DType.UINT32,
    13: DType.UINT64, 16: DType.BFLOAT16, 17: DType.FLOAT8E4M3, 19: DType.FLOAT8E5M2,
}
DTYPE_TO_ONNX: dict[DType, int] = {v: k for k, v in ONNX_TO_DTYPE.items()}

_NUMPY_NAMES = {d: d.value for d in DType if d not in (DType.BFLOAT16, DType.FLOAT8E4M3, DType.FLOAT8E5M2)}


def from_numpy(dt: np.dtype) -> DType:
    dt = np.dtype(dt)
    name = dt.name
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):  # ml_dtypes
        return DType(name)
    try:
        return DType(name)
    except ValueError:
        raise ValueError(f"numpy dtype {name} has no ember equivalent") from None


def to_numpy(dt: DType) -> np.dtype:
    if dt in _NUMPY_NAMES:
        return np.dtype(_NUMPY_NAMES[dt])
    import ml_dtypes  # shipped with onnx; only needed for bf16/fp8 arrays

    return np.dtype(getattr(ml_dtypes, dt.value))
