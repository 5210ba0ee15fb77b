"""Converters for tensor layout, shape and indexing ops: attribute forms of old opsets become inputs."""
from __future__ import annotations

import numpy as np

from ....ir.dtypes import to_numpy
from ..registry import converter


def _ints_input(b, name: str):
    """An attribute list of ints as an int64 constant input (None if the attribute is absent)."""
    v = b.attr(name)
    return None if v is None else b.const_i64(v, hint=name)


@converter("Reshape", until=4)
def reshape_v1(b) -> None:
    b.emit("Reshape", [b.input(0), _ints_input(b, "shape")])


@converter("Concat", until=3)
def concat_v1(b) -> None:
    b.emit("Concat", b.inputs(), {"axis": b.attr("axis", 1)})


@converter("Squeeze", until=12)
def squeeze_v1(b) -> None:
    b.emit("Squeeze", [b.input(0), _ints_input(b, "axes")])


@converter("Unsqueeze", until=12)
def unsqueeze_v1(b) -> None:
    b.emit("Unsqueeze", [b.input(0), _ints_input(b, "axes")])


@converter("Slice", until=9)
def slice_v1(b) -> None:
    b.emit("Slice", [b.input(0), _ints_input(b, "starts"), _ints_input(b, "ends"), _ints_input(b, "axes")])


@converter("Split", until=12)
def split_v2(b) -> None:
    split = b.input(1) if b.num_inputs > 1 else _ints_input(b, "split")  # opset 1 allowed either
    b.emit("Split", [b.input(0), split], {"axis": b.attr("axis", 0)})


@converter("Pad", until=10)
def pad_v2(b) -> None:
    x = b.input(0)
    pads = b.attr("pads", b.attr("paddings"))
    value = np.asarray(b.attr("value", 0.0))
    if x.dtype is not None:  # the constant input has the data's type
        value = value.astype(to_numpy(x.dtype))
    b.emit("Pad", [x, b.const_i64(pads, hint="pads"), b.const(value, hint="value")],
           {"mode": b.attr("mode", "constant")})


@converter("TopK", until=9)
def topk_v1(b) -> None:
    b.emit("TopK", [b.input(0), b.const_i64([b.attr("k")], hint="k")], {"axis": b.attr("axis", -1)})


@converter("Range", until=26)
def range_v11(b) -> None:
    # before opset 27 fp16/bf16 ranges were computed in double precision
    b.emit("Range", b.inputs(), {"stash_type": 11})


@converter("Dropout", until=11)
def dropout_v1(b) -> None:
    # before opset 12 Dropout had no training input: inference makes it an identity (and a mask of ones)
    b.emit("Dropout", [b.input(0)])


@converter("Tile", until=5)
def tile_v1(b) -> None:
    b.unsupported("Tile before opset 6 (tiles/axis inputs) is not supported; re-export with opset >= 6")
