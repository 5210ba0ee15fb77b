"""Tensor datatypes of the KServe v2 protocol and their numpy, Triton-config and wire forms.

Tensors are numpy arrays inside the server. BF16 has no numpy dtype, so BF16 tensors travel as
uint16 arrays holding the raw bits; the engine adapter turns them into torch.bfloat16.
BYTES tensors are numpy object arrays of `bytes`; on the wire each element is a 4-byte
little-endian length followed by the bytes (the Triton binary layout).
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .errors import BadRequestError

# KServe datatype -> numpy dtype used to hold it
KSERVE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16),
    "BYTES": np.dtype(object),
}

# numpy dtype name (what ember.TensorSpec.dtype holds) -> KServe datatype
NUMPY_NAME_TO_KSERVE: dict[str, str] = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64", "bfloat16": "BF16",
    "object": "BYTES", "bytes": "BYTES", "str": "BYTES", "string": "BYTES",
}

KSERVE_TO_NUMPY_NAME: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "bfloat16", "BYTES": "object",
}

# Triton config.pbtxt names (TYPE_FP32) and short forms users write in YAML.
_CONFIG_ALIASES: dict[str, str] = {
    "STRING": "BYTES", "FLOAT32": "FP32", "FLOAT": "FP32", "FLOAT16": "FP16", "HALF": "FP16",
    "FLOAT64": "FP64", "DOUBLE": "FP64", "BFLOAT16": "BF16",
}

ELEMENT_SIZE: dict[str, int] = {k: v.itemsize for k, v in KSERVE_TO_NUMPY.items() if k != "BYTES"}


def normalize_datatype(name: str, where: str) -> str:
    """'TYPE_FP32', 'fp32', 'float32' -> 'FP32'. Raises ValueError naming `where` otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"{where}: datatype must be a string like FP32 or float32, got {name!r}")
    key = name.strip()
    if key.upper().startswith("TYPE_"):
        key = key[5:]
    if key.lower() in NUMPY_NAME_TO_KSERVE:
        return NUMPY_NAME_TO_KSERVE[key.lower()]
    key = key.upper()
    key = _CONFIG_ALIASES.get(key, key)
    if key not in KSERVE_TO_NUMPY:
        raise ValueError(f"{where}: unknown datatype {name!r}; use one of {', '.join(KSERVE_TO_NUMPY)}")
    return key


def config_type_name(datatype: str) -> str:
    """KServe datatype -> Triton config enum name (FP32 -> TYPE_FP32, BYTES -> TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


# ---- BYTES ------------------------------------------------------------------------


def _as_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, np.bytes_):
        return bytes(x)
    return str(x).encode("utf-8")


def serialize_bytes_tensor(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = _as_bytes(item)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes_tensor(raw: bytes | memoryview, count: int, name: str) -> np.ndarray:
    view = memoryview(raw)
    # Every element takes at least its 4-byte length, so the body bounds the element count. Check
    # that before allocating: a shape of [2**40] with 8 bytes of data must be a 400, not a 1 GB
    # allocation or a MemoryError.
    if count * 4 > len(view):
        raise BadRequestError(f"input '{name}': a BYTES tensor of {count} elements needs at least {count * 4} bytes "
                              f"(a 4-byte length per element), the request sent {len(view)}; check the shape")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise BadRequestError(f"input '{name}': BYTES data ends after {i} of {count} elements; "
                                  "each element needs a 4-byte little-endian length prefix")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise BadRequestError(f"input '{name}': BYTES element {i} declares {n} bytes but only "
                                  f"{len(view) - pos} remain")
        out[i] = bytes(view[pos:pos + n])
        pos += n
    if pos != len(view):
        raise BadRequestError(f"input '{name}': {len(view) - pos} bytes left over after {count} BYTES elements; "
                              "check the shape")
    return out


# ---- raw (binary) tensors ---------------------------------------------------------------


def element_count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_from_raw(raw: bytes | memoryview, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw, count, name).reshape(shape)
    expected = count * ELEMENT_SIZE[datatype]
    if len(raw) != expected:
        raise BadRequestError(
            f"input '{name}': {datatype} tensor of shape {list(shape)} needs {expected} bytes, got {len(raw)}")
    arr = np.frombuffer(raw, dtype=KSERVE_TO_NUMPY[datatype].newbyteorder("<"), count=count)
    return arr.reshape(shape)


def tensor_to_raw(arr: np.ndarray, datatype: str) -> bytes:
    return bytes(tensor_raw_view(arr, datatype))


def tensor_raw_view(arr: np.ndarray, datatype: str) -> bytes | memoryview:
    """The wire bytes of a tensor, as a view of the array where its memory already is that layout
    (contiguous, little-endian): the response body is then the one copy."""
    if datatype == "BYTES":
        return serialize_bytes_tensor(arr)
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a).cast("B") if a.size else b""


# ---- JSON tensors ----------------------------------------------------------------------------

_INT_KINDS = "iu"


def tensor_from_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """JSON `data` (flat or nested, row-major) -> array of `shape`. Strict about element types:
    strings are not numbers, floats are not integers, numbers are not booleans."""
    count = element_count(shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = _flatten(data, name)
        if len(flat) != count:
            raise BadRequestError(f"input '{name}': shape {list(shape)} needs {count} elements, data has {len(flat)}")
        if not all(isinstance(x, str) for x in flat):
            raise BadRequestError(f"input '{name}': BYTES data must be JSON strings")
        out = np.empty(count, dtype=object)
        out[:] = [x.encode("utf-8") for x in flat]
        return out.reshape(shape)
    if datatype == "BF16":
        raise BadRequestError(f"input '{name}': BF16 tensors must be sent as binary data "
                              "(binary_data_size parameter), JSON has no bfloat16 numbers")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as e:
        raise BadRequestError(f"input '{name}': data is not a rectangular list of numbers ({e})") from None
    if arr.size != count:
        raise BadRequestError(f"input '{name}': shape {list(shape)} needs {count} elements, data has {arr.size}")
    target = KSERVE_TO_NUMPY[datatype]
    kind = arr.dtype.kind
    if count == 0:
        return np.zeros(shape, dtype=target)
    if datatype == "BOOL":
        if kind != "b":
            raise BadRequestError(f"input '{name}': BOOL data must be JSON true/false")
    elif target.kind in _INT_KINDS:
        if kind not in _INT_KINDS:
            raise BadRequestError(f"input '{name}': {datatype} data must be JSON integers, got {_kind_name(kind)}")
        info = np.iinfo(target)
        if kind == "O" or arr.min() < info.min or arr.max() > info.max:
            raise BadRequestError(f"input '{name}': a value is outside the {datatype} range [{info.min}, {info.max}]")
    elif kind not in "iuf":
        raise BadRequestError(f"input '{name}': {datatype} data must be JSON numbers, got {_kind_name(kind)}")
    with np.errstate(over="ignore"):
        return arr.astype(target).reshape(shape)


def _kind_name(kind: str) -> str:
    return {"U": "strings", "S": "strings", "O": "mixed values", "b": "booleans", "f": "floats",
            "i": "integers", "u": "integers"}.get(kind, f"numpy kind {kind!r}")


def _flatten(data: list, name: str, depth: int = 0) -> list:
    if depth > 32:
        raise BadRequestError(f"input '{name}': data is nested more than 32 levels deep")
    out: list = []
    for x in data:
        if isinstance(x, list):
            out.extend(_flatten(x, name, depth + 1))
        else:
            out.append(x)
    return out


def tensor_to_json(arr: np.ndarray, datatype: str) -> list:
    if datatype == "BYTES":
        return [_as_bytes(x).decode("utf-8", errors="replace") for x in arr.reshape(-1)]
    return arr.reshape(-1).tolist()
