"""Run-time input checking: wrong name, rank, dtype, static dim, inconsistent symbolic dims."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import ember
from ember.errors import InputError

from .helpers import add_mul_model, save


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ember.build(save(add_mul_model(), tmp_path_factory.mktemp("m") / "m.onnx"), device="cpu")


def test_numpy_and_torch_inputs(engine):
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    ref = (x + np.array([0.5, -1.0, 2.0, 3.0], np.float32)) * x
    np.testing.assert_allclose(engine.run({"x": x})["y"], ref, rtol=1e-6)
    out = engine.run({"x": torch.from_numpy(x)})["y"]
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("feeds, pattern", [
    ({"z": np.ones((1, 4), np.float32)}, "unknown input.*'z'.*x: float32\\[batch,4\\]"),
    ({}, "missing input.*'x'"),
    ({"x": np.ones((1, 4), np.float64)}, "dtype float64; the engine expects float32"),
    ({"x": np.ones((4,), np.float32)}, "rank 1.*expects rank 2"),
    ({"x": np.ones((2, 5), np.float32)}, "size 5 at axis 1; the engine expects 4"),
])
def test_bad_inputs(engine, feeds, pattern):
    with pytest.raises(InputError, match=pattern):
        engine.run(feeds)


def test_not_a_dict(engine):
    with pytest.raises(InputError, match="dict of input name"):
        engine.run([np.ones((1, 4), np.float32)])


def test_shared_symbolic_dim_must_agree(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    eng = ember.build(save(m, tmp_path / "two.onnx"))
    with pytest.raises(InputError, match="dim 'n' is 2 in input 'a' but 3 in input 'b'"):
        eng.run({"a": np.ones((2, 3), np.float32), "b": np.ones((3, 3), np.float32)})
