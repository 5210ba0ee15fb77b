"""Q/DQ scales stay fp32 in fp16 builds: ONNX Runtime computes a QuantizeLinear with a scale of 1e-8
exactly, and fp16 cannot hold it (its smallest subnormal is 6e-8). Found in the issue 13 review; the fix
belongs in passes/precision.py (a QuantizeLinear's scale input must keep fp32), so this is xfail until then."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ember


@pytest.mark.xfail(strict=True, reason="passes/precision.py casts QuantizeLinear's scale to fp16 (s:float16)")
def test_fp16_build_keeps_a_tiny_quantize_scale_in_fp32():
    g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
                           helper.make_node("DequantizeLinear", ["q", "s"], ["d"])], "qdq",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 8])],
                          [numpy_helper.from_array(np.array(1e-8, np.float32), "s")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    x = np.abs(np.random.default_rng(1).standard_normal((2, 8))).astype(np.float32) * 1e-6
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ember.build(model, device="cpu", precision="fp16").run({"x": x})["d"].astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05  # fp16 input rounding only
