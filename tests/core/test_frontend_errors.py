"""Bad models get one clear error naming the thing, never a traceback from deep inside."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import ember
from ember.errors import ModelLoadError, UnsupportedOpError

from .helpers import add_mul_model, save


def test_corrupt_protobuf(tmp_path):
    p = tmp_path / "bad.onnx"
    good = add_mul_model().SerializeToString()
    p.write_bytes(b"\x0a\xff\xff\xff" + good[:40])
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        ember.build(str(p))


def test_not_onnx_text_file(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not a model")
    with pytest.raises(ModelLoadError):
        ember.build(str(p))


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ember.build(str(tmp_path / "nope.onnx"))


def test_missing_external_data(tmp_path):
    m = add_mul_model()
    w = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w.reshape(4096)[:4], "w"))
    big = onnx.numpy_helper.from_array(w, "big")
    m.graph.initializer.append(big)
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    eng = ember.build(str(tmp_path / "ext.onnx"))  # loads fine with its data file
    assert eng.run({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 4)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="ext.onnx.data"):
        ember.build(str(tmp_path / "ext.onnx"))


def test_unknown_ops_all_listed(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("FancyOp", ["x"], ["a"], name="first_fancy"),
             helper.make_node("Add", ["a", "a"], ["b"], name="ok_add"),
             helper.make_node("OtherOp", ["b"], ["c"], name="second", domain="com.example"),
             helper.make_node("FancyOp", ["c"], ["y"], name="third_fancy")]
    g = helper.make_graph(nodes, "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError) as ei:
        ember.build(save(m, tmp_path / "u.onnx"))
    msg = str(ei.value)
    assert "3 unsupported node(s)" in msg
    for name in ("first_fancy", "second", "third_fancy"):
        assert name in msg
    assert "com.example::OtherOp" in msg and "ai.onnx::FancyOp (opset 17)" in msg
    assert len(ei.value.nodes) == 3
