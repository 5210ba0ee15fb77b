"""Symbolic shape rules of the neural-net layers (conv, pools, norms, Resize) over dims `batch`, `h`, `w`, `seq`."""
from __future__ import annotations

import numpy as np

from ember.ir.dtypes import DType
from ember.ir.graph import Graph
from ember.ir.shapes import Sym
from ember.ops.infer import infer_shapes

B, H, W, S = Sym.named("batch"), Sym.named("h"), Sym.named("w"), Sym.named("seq")


def _run(op: str, x_shape, const_inputs: list = (), attrs: dict | None = None, n_out: int = 1,
         dtype=DType.FLOAT32):
    g = Graph()
    x = g.add_input("x", dtype, tuple(x_shape))
    ins = [x] + [None if c is None else g.add_const(f"c{i}", np.asarray(c)) for i, c in enumerate(const_inputs)]
    node = g.add_node(op, ins, n_out, attrs or {}, name="n")
    infer_shapes(g)
    return [(o.dtype, o.shape) for o in node.outputs]


def shape_of(*args, **kw):
    return _run(*args, **kw)[0][1]


W3 = np.zeros((16, 3, 3, 3), np.float32)


def test_conv_same_size_and_strided():
    assert shape_of("Conv", (B, 3, H, W), [W3], {"pads": [1, 1, 1, 1]}) == (B, 16, H, W)
    assert shape_of("Conv", (B, 3, H, W), [W3], {"pads": [1, 1, 1, 1], "strides": [2, 2]}) == \
        (B, 16, (H - 1) // 2 + 1, (W - 1) // 2 + 1)
    assert shape_of("Conv", (B, 3, H, W), [W3], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}) == \
        (B, 16, (H + 1) // 2, (W + 1) // 2)
    assert shape_of("Conv", (B, 3, H, W), [W3], {"auto_pad": "VALID"}) == (B, 16, H - 2, W - 2)
    assert shape_of("Conv", (B, 3, 32, 32), [W3], {"dilations": [2, 2]}) == (B, 16, 28, 28)


def test_conv_1d_over_sequence():
    w = np.zeros((8, 4, 5), np.float32)
    assert shape_of("Conv", (B, 4, S), [w], {"pads": [2, 2]}) == (B, 8, S)


def test_conv_transpose_upsamples():
    w = np.zeros((16, 8, 4, 4), np.float32)  # (C_in, C_out / group, k, k)
    assert shape_of("ConvTranspose", (B, 16, H, W), [w], {"strides": [2, 2], "pads": [1, 1, 1, 1]}) == \
        (B, 8, 2 * H, 2 * W)
    assert shape_of("ConvTranspose", (B, 16, 5, 5), [w], {"strides": [2, 2], "output_shape": [11, 11]}) == \
        (B, 8, 11, 11)
    assert shape_of("ConvTranspose", (B, 16, H, W), [w], {"strides": [2, 2], "auto_pad": "SAME_UPPER"}) == \
        (B, 8, 2 * H, 2 * W)


def test_pools():
    assert shape_of("MaxPool", (B, 64, H, W), [], {"kernel_shape": [3, 3], "strides": [1, 1],
                                                   "pads": [1, 1, 1, 1]}) == (B, 64, H, W)
    out = _run("MaxPool", (B, 64, H, W), [], {"kernel_shape": [2, 2], "strides": [2, 2]}, n_out=2)
    assert out[0][1] == (B, 64, (H - 2) // 2 + 1, (W - 2) // 2 + 1)
    assert out[1] == (DType.INT64, out[0][1])
    assert shape_of("AveragePool", (B, 8, 7, 7), [], {"kernel_shape": [2, 2], "strides": [2, 2],
                                                      "ceil_mode": 1}) == (B, 8, 4, 4)
    assert shape_of("LpPool", (B, 8, H, W), [], {"kernel_shape": [3, 3], "auto_pad": "SAME_LOWER"}) == (B, 8, H, W)
    assert shape_of("GlobalAveragePool", (B, 2048, H, W)) == (B, 2048, 1, 1)
    assert shape_of("GlobalMaxPool", (B, 8, S)) == (B, 8, 1)


def test_norms_keep_shape():
    c = np.ones(768, np.float32)
    assert shape_of("LayerNormalization", (B, S, 768), [c, c]) == (B, S, 768)
    assert shape_of("RMSNormalization", (B, S, 768), [c]) == (B, S, 768)
    g = np.ones(64, np.float32)
    assert shape_of("GroupNormalization", (B, 64, H, W), [g, g], {"num_groups": 8}) == (B, 64, H, W)
    assert shape_of("BatchNormalization", (B, 64, H, W), [g, g, g, g]) == (B, 64, H, W)
    assert shape_of("InstanceNormalization", (B, 64, H, W), [g, g]) == (B, 64, H, W)


def test_layer_norm_statistics_outputs():
    c = np.ones(768, np.float32)
    out = _run("LayerNormalization", (B, S, 768), [c, c], n_out=3)
    assert out[1] == (DType.FLOAT32, (B, S, 1))
    assert out[2] == (DType.FLOAT32, (B, S, 1))


def test_resize_with_constant_scales_and_sizes():
    scales = np.array([1, 1, 2, 2], np.float32)
    assert shape_of("Resize", (B, 3, 32, 48), [None, scales]) == (B, 3, 64, 96)
    assert shape_of("Resize", (B, 3, 32, 48), [None, None, np.array([1, 3, 7, 9])]) == (1, 3, 7, 9)
    assert shape_of("Resize", (B, 3, 32, 48), [None, None, np.array([64, 64])], {"axes": [2, 3]}) == (B, 3, 64, 64)
    # keep_aspect_ratio_policy=not_larger: one scale for both axes, the smaller one
    assert shape_of("Resize", (1, 3, 20, 40), [None, None, np.array([10, 10])],
                    {"axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"}) == (1, 3, 5, 10)
