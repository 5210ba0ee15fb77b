"""The suite-wide round-trip fixture (tests/roundtrip.py) is on, and its comparison is strict."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import ember
from tests import roundtrip
from tests.core.helpers import add_mul_model


def test_built_engines_are_saved_loaded_and_rerun():
    before = dict(roundtrip.STATS)
    engine = ember.build(add_mul_model(), device="cpu")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    engine.run({"x": x})
    engine.run({"x": x[:1]})
    engine._interp.run({"x": torch.from_numpy(x)})
    assert roundtrip.STATS["engines"] == before["engines"] + 1  # loaded once
    assert roundtrip.STATS["runs"] == before["runs"] + 3


def test_random_ops_are_exempt_by_op():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("RandomNormalLike", ["x"], ["y"])], "r", [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    before = dict(roundtrip.STATS)
    ember.build(model, device="cpu").run({"x": np.zeros((2, 3), np.float32)})
    assert roundtrip.STATS["exempt"] == before["exempt"] + 1 and roundtrip.STATS["runs"] == before["runs"]


@pytest.mark.parametrize("a, b, msg", [
    (np.array([1.0, 2.0], np.float32), np.array([1.0, 2.0000002], np.float32), "1 of 2 elements differ"),
    (np.array([0.0], np.float32), np.array([-0.0], np.float32), "differ"),
    (np.array([np.nan, 1.0]), np.array([1.0, np.nan]), "NaN at different positions"),
    (np.array([1, 2]), np.array([1, 2], np.int32), "int64"),
    (np.zeros((2, 1)), np.zeros((1, 2)), r"\[2, 1\]"),
    ([np.ones(2)], [], "sequence"),
])
def test_comparison_is_bitwise(a, b, msg):
    with pytest.raises(AssertionError, match=msg):
        roundtrip._same(a, b, "out")


def test_identical_outputs_pass_nan_included():
    a = np.array([np.nan, 1.5, -0.0], np.float16)
    roundtrip._same(a, a.copy(), "out")
    roundtrip._same([torch.ones(2), None], [torch.ones(2), None], "out")
