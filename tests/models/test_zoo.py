"""The zoo's own opset 18 -> 17 conversion, on a small graph (the model tests cover it on real exports)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from .zoo import downgrade_opset_18_to_17

ort = pytest.importorskip("onnxruntime")


def _opset18_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 7, 4])
    shapes = {"a": ["batch", 3, 4], "b": ["batch", 3, 4], "c": ["batch", 1, 4], "mean": ["batch"], "mx": ["batch", 4]}
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()]
    nodes = [
        helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3),  # 3, 3, 1
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
        helper.make_node("Constant", [], ["max_axes"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("ReduceMax", ["x", "max_axes"], ["mx"], keepdims=0, noop_with_empty_axes=0),
    ]
    init = [numpy_helper.from_array(np.array([-1, 1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "g", [x], outs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _run(model: onnx.ModelProto, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_downgrade_keeps_results():
    model18 = _opset18_model()
    model17 = downgrade_opset_18_to_17(model18)
    onnx.checker.check_model(model17, full_check=True)
    assert [o.version for o in model17.opset_import if o.domain == ""] == [17]
    assert "axes" not in {init.name for init in model17.graph.initializer}
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 7, 4)).astype(np.float32)}
    for got, want in zip(_run(model17, feeds), _run(model18, feeds)):
        np.testing.assert_array_equal(got, want)


def test_downgrade_refuses_what_has_no_opset17_form():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 3])
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)
    init = [numpy_helper.from_array(np.ones(2, np.float32), name) for name in ("s", "b")]
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], init),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    with pytest.raises(ValueError, match="GroupNormalization"):
        downgrade_opset_18_to_17(model)
