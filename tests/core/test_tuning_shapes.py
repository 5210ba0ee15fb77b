"""Dynamic models without profiles: dims declared -1 are symbols, and the builder chooses tuning shapes
at which every node runs (warning which), or says which input, node and flag when none runs."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import ember
from ember.builder.builder import BuilderConfig, optimize
from ember.builder.profiles import TuningShapeWarning, opt_feeds, profile_feeds, tuning_profiles
from ember.errors import EmberError, ModelLoadError
from ember.frontend.onnx import import_onnx
from ember.ir.shapes import as_symbol
from ember.ops.infer import infer_shapes
from ember.runtime.interpreter import Interpreter


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _conv_model(dims, kernel=5) -> onnx.ModelProto:
    """x[dims] -> Conv(kernel x kernel, 3->4) -> Relu: needs both spatial sides >= kernel."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, kernel, kernel],
                           rng.standard_normal((4, 3, kernel, kernel)).astype(np.float32).ravel())
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"])]
    return _model(nodes, [x], [y], [w])


def _tuning(model: onnx.ModelProto, profiles=()):
    g = import_onnx(model)
    infer_shapes(g)
    optimize(g, BuilderConfig(device="cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = tuning_profiles(g, list(profiles))
    return g, tuned, [str(w.message) for w in caught if issubclass(w.category, TuningShapeWarning)]


def test_minus_one_and_placeholder_dims_are_fresh_symbols():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    x.type.tensor_type.shape.dim[0].dim_value = -1
    m = helper.make_tensor_value_info("m", TensorProto.FLOAT, [0, "", "seq-len"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = import_onnx(_model([helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["m"], ["z"])],
                           [x, m], [y, helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]))
    xs, ms = g.inputs[0].shape, g.inputs[1].shape
    assert [as_symbol(d) for d in xs] == ["x_dim0", None, "x_dim2", "x_dim3"] and xs[1] == 3
    assert [as_symbol(d) for d in ms] == ["m_dim0", "m_dim1", "seq-len"]


def test_paddle_style_minus_one_builds_with_and_without_shapes():
    model = _conv_model([-1, 3, -1, -1])
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 40)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    static = ember.build(model, device="cpu", shapes={"x": (1, 3, 32, 40)})  # was: "axis 0 is fixed to -1"
    np.testing.assert_allclose(static.run({"x": x})["y"], want, rtol=1e-4, atol=1e-5)
    with pytest.warns(TuningShapeWarning, match=r"x:1x3x320x320"):
        dynamic = ember.build(model, device="cpu")  # was: "negative dimensions are not allowed"
    np.testing.assert_allclose(dynamic.run({"x": x})["y"], want, rtol=1e-4, atol=1e-5)


def test_image_input_is_tuned_at_a_typical_size_and_the_feeds_run():
    g, tuned, warned = _tuning(_conv_model(["batch", 3, "h", "w"]))
    assert tuned[0]["x"][1] == (1, 3, 320, 320)
    assert len(warned) == 1 and "x:1x3x320x320" in warned[0] and "--opt-shapes" in warned[0] \
        and "--shapes" in warned[0] and "'x' (float32[batch,3,h,w])" in warned[0]
    Interpreter(g, "cpu").run(opt_feeds(g, tuned, torch.device("cpu")))


def test_a_dim_with_no_hint_grows_until_the_graph_runs():
    """A 1-D conv of kernel 5 over [batch, 3, L]: L = 1 fails, the search grows it to 8."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 5], rng.standard_normal(30).astype(np.float32))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "L"])
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv1d")], [x],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    g, tuned, warned = _tuning(model)
    assert tuned[0]["x"][1] == (1, 3, 8) and "x:1x3x8" in warned[0]
    Interpreter(g, "cpu").run(opt_feeds(g, tuned, torch.device("cpu")))


def test_recognizer_keeps_its_height_and_takes_a_typical_width():
    """Height must pool down to exactly 1 (squeezed), width is free: height stays small, width 320."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[32, 1], strides=[32, 1], name="pool"),
             helper.make_node("Squeeze", ["p", "axes"], ["y"], name="squeeze_height")]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    g, tuned, _ = _tuning(_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                 [w, axes]))
    assert tuned[0]["x"][1] == (1, 3, 32, 320)
    Interpreter(g, "cpu").run(opt_feeds(g, tuned, torch.device("cpu")))


def test_no_shape_runs_names_input_node_and_flag():
    """Reshape to a fixed [1, 7]: only L == 7 runs, which no search step reaches."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "L"])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 7])
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="fixed_reshape")], [x],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    with pytest.raises(EmberError) as e:
        ember.build(model, device="cpu")
    msg = str(e.value)
    assert "'x' (float32[batch,L])" in msg and "fixed_reshape" in msg and "--shapes x:" in msg \
        and "--opt-shapes" in msg
    ember.build(model, device="cpu", shapes={"x": (1, 7)})  # what the message says to do works


def test_inputs_a_profile_leaves_out_follow_the_symbols_it_binds():
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])
    model = _model([helper.make_node("Add", ["ids", "mask"], ["y"])], [ids, mask],
                   [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    profile = {"ids": ((1, 4), (2, 16), (4, 64))}
    g, tuned, warned = _tuning(model, [profile])
    assert tuned[0]["mask"] == tuned[0]["ids"] == profile["ids"] and warned
    runs = list(profile_feeds(g, tuned, torch.device("cpu")))
    assert [tuple(f["mask"].shape) for f in runs] == [(1, 4), (2, 16), (4, 64)]
    for feeds in runs:
        Interpreter(g, "cpu").run(feeds)


def test_token_inputs_get_a_typical_sequence_length_and_static_models_no_warning():
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    model = _model([helper.make_node("Identity", ["ids"], ["y"])], [ids],
                   [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    assert _tuning(model)[1][0]["ids"][1] == (1, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningShapeWarning)
        ember.build(model, device="cpu", shapes={"ids": (2, 5)})
        ember.build(model, device="cpu", profiles=[{"ids": ((1, 1), (2, 8), (4, 16))}])


def test_zero_d_bool_input_builds():
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    model = _model([helper.make_node("Where", ["flag", "x", "x"], ["y"])], [flag, x],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.warns(TuningShapeWarning):
        e = ember.build(model, device="cpu")
    out = e.run({"flag": np.array(True), "x": np.arange(3, dtype=np.float32)})["y"]
    np.testing.assert_array_equal(out, np.arange(3, dtype=np.float32))


def test_short_initializer_is_a_model_load_error():
    w = onnx.TensorProto(name="weights", data_type=TensorProto.FLOAT, dims=[4], float_data=[1.0, 2.0, 3.0])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    model = _model([helper.make_node("Add", ["x", "weights"], ["y"])], [x],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    with pytest.raises(ModelLoadError, match=r"tensor 'weights' declares shape \[4\] \(4 elements\)"):
        ember.build(model, device="cpu")


def test_nodes_out_of_topological_order_are_sorted():
    """ONNX requires topological order; some exporters break it and ONNX Runtime sorts: so do we."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["t"], ["y"], name="reads_later"),
             helper.make_node("Neg", ["x"], ["t"], name="defined_after")]
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    a = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(ember.build(model, device="cpu").run({"x": a})["y"], np.maximum(-a, 0))


def test_string_initializer_is_listed_as_unsupported():
    from ember.errors import UnsupportedOpError

    table = helper.make_tensor("table", TensorProto.STRING, [2], [b"a", b"b"])
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [2])
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [x],
                   [helper.make_tensor_value_info("y", TensorProto.INT64, [2])], [table])
    with pytest.raises(UnsupportedOpError, match=r"tensor 'table' holds strings"):
        ember.build(model, device="cpu")
