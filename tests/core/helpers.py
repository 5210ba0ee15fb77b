"""Small ONNX graphs for core tests, written with onnx.helper."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


def add_mul_model(opset: int = 17) -> onnx.ModelProto:
    """y = (x + w) * x with a dynamic batch dim; w is an initializer."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], np.array([0.5, -1.0, 2.0, 3.0], np.float32))
    nodes = [helper.make_node("Add", ["x", "w"], ["t"], name="add0"),
             helper.make_node("Mul", ["t", "x"], ["y"], name="mul0")]
    g = helper.make_graph(nodes, "add_mul", [x], [y], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)
