"""Symbolic shape rules of the layout/shape/indexing ops, over dims `batch` and `seq`."""
from __future__ import annotations

import numpy as np
import pytest

from ember.ir.dtypes import DType
from ember.ir.graph import Graph
from ember.ir.shapes import Sym
from ember.ops.infer import infer_shapes

B, S = Sym.named("batch"), Sym.named("seq")
I64_MAX = np.iinfo(np.int64).max


def _run(op: str, const_inputs: list, attrs: dict | None = None, x_shape=(B, S, 768), n_out: int = 1,
         dtype=DType.FLOAT32):
    """One node reading x (plus constant inputs); returns [(dtype, shape)] of its outputs."""
    g = Graph()
    x = g.add_input("x", dtype, tuple(x_shape))
    ins = [x] + [None if c is None else g.add_const(f"c{i}", np.asarray(c)) for i, c in enumerate(const_inputs)]
    node = g.add_node(op, ins, n_out, attrs or {}, name="n")
    infer_shapes(g)
    return [(o.dtype, o.shape) for o in node.outputs]


def shape_of(*args, **kw):
    return _run(*args, **kw)[0][1]


def test_reshape_heads():
    assert shape_of("Reshape", [np.array([0, 0, 12, 64])]) == (B, S, 12, 64)
    assert shape_of("Reshape", [np.array([0, -1, 64])]) == (B, S * 12, 64)
    assert shape_of("Reshape", [np.array([-1, 768])]) == (B * S, 768)


def test_transpose_concat_flatten():
    assert shape_of("Transpose", [], {"perm": [1, 0, 2]}) == (S, B, 768)
    assert shape_of("Transpose", []) == (768, S, B)
    assert shape_of("Concat", [np.zeros((1, 2, 768), np.float32)], {"axis": 1}, x_shape=(1, S, 768)) == (1, S + 2, 768)
    assert shape_of("Flatten", [], {"axis": 2}) == (B * S, 768)


def test_squeeze_unsqueeze_expand():
    assert shape_of("Unsqueeze", [np.array([1, -1])]) == (B, 1, S, 768, 1)
    assert shape_of("Squeeze", [np.array([1])], x_shape=(B, 1, S)) == (B, S)
    assert shape_of("Expand", [np.array([1, 1, 4, 768])], x_shape=(B, 1, 768)) == (1, B, 4, 768)


def test_slice_and_gather():
    starts, ends = np.array([1]), np.array([I64_MAX])
    assert shape_of("Slice", [starts, ends, np.array([1])]) == (B, S - 1, 768)
    assert shape_of("Slice", [np.array([0]), np.array([-1]), np.array([1])]) == (B, S - 1, 768)
    assert shape_of("Slice", [np.array([0, 0]), np.array([2, 384]), np.array([0, 2])], x_shape=(4, S, 768)) \
        == (2, S, 384)
    assert shape_of("Gather", [np.array(0)], {"axis": 1}) == (B, 768)
    assert shape_of("Gather", [np.zeros((2, 3), np.int64)], {"axis": 0}, x_shape=(50, 768)) == (2, 3, 768)


def test_split_and_shape():
    outs = _run("Split", [np.array([256, 512])], {"axis": 2}, n_out=2)
    assert [s for _, s in outs] == [(B, S, 256), (B, S, 512)]
    outs = _run("Split", [], {"axis": 2, "num_outputs": 3}, n_out=3)
    assert [s for _, s in outs] == [(B, S, 256)] * 3
    assert _run("Shape", []) == [(DType.INT64, (3,))]
    assert _run("Shape", [], {"start": 1}) == [(DType.INT64, (2,))]
    assert _run("Size", []) == [(DType.INT64, ())]


def test_pad_tile_topk():
    assert shape_of("Pad", [np.array([0, 1, 0, 0, 2, 0])]) == (B, S + 3, 768)
    assert shape_of("Tile", [np.array([2, 1, 1])]) == (B * 2, S, 768)
    outs = _run("TopK", [np.array([5])], n_out=2)
    assert outs == [(DType.FLOAT32, (B, S, 5)), (DType.INT64, (B, S, 5))]


@pytest.mark.parametrize("op", ["Shape", "Reshape"])
def test_computed_shape_keeps_rank(op):
    """A Reshape whose shape is computed at run time still gets the right rank."""
    g = Graph()
    x = g.add_input("x", DType.FLOAT32, (B, S, 768))
    shp = g.add_node("Shape", [x], 1, name="s").outputs[0]
    y = g.add_node("Reshape", [x, shp], 1, name="r").outputs[0]
    infer_shapes(g)
    assert shp.shape == (3,) and y.rank == 3 and y.dtype == DType.FLOAT32
