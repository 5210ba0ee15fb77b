"""`ember simplify` keeps the input's opset and never adds nodes; every output passes onnx.checker
and matches ONNX Runtime on the input model."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ember.cli.main import main
from ember.tools import simplify_model
from ember.tools.simplify import WROTE_INPUT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = "/work/corpus/models"  # real models on the development machine (not in the repository)
F = TensorProto.FLOAT


def mk(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, **attrs)


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def graph_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def ort_outputs(model: "onnx.ModelProto | str", feeds: dict) -> list[np.ndarray]:
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})


def check_simplified(tmp_path, m: onnx.ModelProto, feeds: dict, name: str = "m", rtol: float = 1e-5, **kw):
    """Simplify ``m``; the output keeps the opset, has no more nodes, passes the checker and gives
    ONNX Runtime's outputs of the input (relative L2 below ``rtol``). Returns (report, output model)."""
    src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}.sim.onnx"
    onnx.save(m, src)
    r = simplify_model(str(src), dst, **kw)
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    want_opset = kw.get("opset") or next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [want_opset]
    assert r.opset_out == want_opset and len(out.graph.node) == r.nodes_out <= len(m.graph.node)
    assert r.passed
    for got, want in zip(ort_outputs(str(dst), feeds), ort_outputs(m, feeds)):
        assert got.shape == want.shape
        assert np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30) < rtol
    return r, out


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- the graph from the issue: 5 nodes at opset 17 came out as 7 at opset 23 ------------------------------
def five_node_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [mk("Gemm", ["x", "W", "B"], ["h"], transB=1), mk("Relu", ["h"], ["r"]), mk("MatMul", ["r", "W2"], ["m"]),
             mk("ReduceMean", ["m"], ["mm"], axes=[1], keepdims=1), mk("Sub", ["m", "mm"], ["y"])]
    inits = [const("W", rng.standard_normal((4, 8)).astype(np.float32)),
             const("B", rng.standard_normal(4).astype(np.float32)),
             const("W2", rng.standard_normal((4, 4)).astype(np.float32))]
    return graph_model(nodes, [vi("x", ["batch", 8])], [vi("y", ["batch", 4])], inits, opset=17)


def test_five_node_graph_keeps_opset_17_and_its_size(tmp_path, capsys):
    r, out = check_simplified(tmp_path, five_node_model(), {"x": rand(3, 8)})
    assert r.wrote == "opt level 2" and r.nodes_out <= 5 and not r.notes
    assert "Transpose" not in r.op_counts_out  # the transposed weight is stored transposed, not transposed at run time
    reduce = next(n for n in out.graph.node if n.op_type == "ReduceMean")
    assert [a.name for a in reduce.attribute if a.name == "axes"] == ["axes"]  # opset 17 takes axes as an attribute
    assert main(["simplify", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "cli.onnx")]) == 0
    assert "opset 17" in capsys.readouterr().out


# -- ops the optimizer recognizes that are newer than the model's opset, spelled back out ----------------
def gelu_model(opset):  # the erf form torch exports: x * 0.5 * (1 + erf(x / sqrt(2)))
    nodes = [mk("Div", ["x", "sqrt2"], ["d"]), mk("Erf", ["d"], ["e"]), mk("Add", ["e", "one"], ["a"]),
             mk("Mul", ["x", "a"], ["m"]), mk("Mul", ["m", "half"], ["y"])]
    inits = [const("sqrt2", np.float32(np.sqrt(2))), const("one", np.float32(1)), const("half", np.float32(0.5))]
    return graph_model(nodes, [vi("x", ["n", 16])], [vi("y", ["n", 16])], inits, opset)


def silu_model(opset):
    return graph_model([mk("Sigmoid", ["x"], ["s"]), mk("Mul", ["x", "s"], ["y"])], [vi("x", ["n", 16])],
                       [vi("y", ["n", 16])], opset=opset)


def hardswish_model(opset):  # x * relu6(x + 3) / 6, as Clip with attributes at opset 10
    clip = mk("Clip", ["p"], ["c"], min=0.0, max=6.0) if opset < 11 else mk("Clip", ["p", "zero", "six"], ["c"])
    nodes = [mk("Add", ["x", "three"], ["p"]), clip, mk("Mul", ["x", "c"], ["m"]), mk("Div", ["m", "sixd"], ["y"])]
    inits = [const("three", np.float32(3)), const("sixd", np.float32(6))]
    if opset >= 11:
        inits += [const("zero", np.float32(0)), const("six", np.float32(6))]
    return graph_model(nodes, [vi("x", ["n", 16])], [vi("y", ["n", 16])], inits, opset)


def layernorm_model(opset):  # mean / sub / pow / mean / add / sqrt / div, then scale and bias
    rng = np.random.default_rng(1)
    nodes = [mk("ReduceMean", ["x"], ["mu"], axes=[-1]), mk("Sub", ["x", "mu"], ["d"]), mk("Pow", ["d", "two"], ["p"]),
             mk("ReduceMean", ["p"], ["var"], axes=[-1]), mk("Add", ["var", "eps"], ["ve"]), mk("Sqrt", ["ve"], ["s"]),
             mk("Div", ["d", "s"], ["n"]), mk("Mul", ["n", "g"], ["ng"]), mk("Add", ["ng", "b"], ["y"])]
    inits = [const("two", np.float32(2)), const("eps", np.float32(1e-5)),
             const("g", rng.standard_normal(16).astype(np.float32)), const("b", rng.standard_normal(16).astype(np.float32))]
    return graph_model(nodes, [vi("x", ["n", 5, 16])], [vi("y", ["n", 5, 16])], inits, opset)


@pytest.mark.parametrize("make, opset, gone", [
    (gelu_model, 13, "Gelu"), (gelu_model, 19, "Gelu"), (silu_model, 12, "Swish"), (silu_model, 23, "Swish"),
    (hardswish_model, 10, "HardSwish"), (layernorm_model, 13, "LayerNormalization"),
])
def test_recognized_ops_newer_than_the_opset_are_spelled_out(tmp_path, make, opset, gone):
    m = make(opset)
    x = rand(*[3 if isinstance(d, str) else d for d in
               (dim.dim_param or dim.dim_value for dim in m.graph.input[0].type.tensor_type.shape.dim)])
    r, out = check_simplified(tmp_path, m, {"x": x}, rtol=1e-5)
    assert r.wrote == "opt level 2" and gone not in r.op_counts_out


def test_opset_asked_for_keeps_the_fused_op(tmp_path):
    r, out = check_simplified(tmp_path, gelu_model(13), {"x": rand(3, 16)}, opset=20)
    assert r.op_counts_out == {"Gelu": 1} and r.opset_in == 13


# -- an older signature: parameters that were attributes, inputs that were renamed ----------------------
def test_opset_9_attributes_and_renamed_inputs(tmp_path):
    rng = np.random.default_rng(2)
    c = 4
    nodes = [mk("Pad", ["x"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.5),
             mk("Clip", ["p"], ["c"], min=-1.0, max=1.5),
             mk("Slice", ["c"], ["s"], starts=[1], ends=[5], axes=[2]),
             mk("Unsqueeze", ["s"], ["u"], axes=[0]), mk("Squeeze", ["u"], ["q"], axes=[0]),
             mk("Mul", ["q", "k"], ["qk"]),
             mk("BatchNormalization", ["qk", "gamma", "beta", "mean", "var"], ["bn"]),
             mk("ReduceSum", ["bn"], ["y"], axes=[3], keepdims=0)]
    inits = [const("k", rng.standard_normal((1, c, 1, 1)).astype(np.float32))] + [
        const(n, (rng.random(c) + 0.5).astype(np.float32)) for n in ("gamma", "beta", "mean", "var")]
    m = graph_model(nodes, [vi("x", ["n", c, 4, 4])], [vi("y", ["n", c, 4])], inits, opset=9)
    check_simplified(tmp_path, m, {"x": rand(2, c, 4, 4)})


# -- fewer nodes or the input; the opset's fallbacks ------------------------------------------------------
def attention_model(opset=17):
    q, k, v = (vi(n, [2, 4, 5, 8]) for n in "qkv")
    nodes = [mk("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), mk("MatMul", ["q", "kt"], ["s"]),
             mk("Mul", ["s", "scale"], ["ss"]), mk("Softmax", ["ss"], ["p"], axis=-1), mk("MatMul", ["p", "v"], ["y"])]
    return graph_model(nodes, [q, k, v], [vi("y", [2, 4, 5, 8])], [const("scale", np.float32(1 / np.sqrt(8)))], opset)


def test_attention_at_an_opset_without_it_falls_back_to_cleanup(tmp_path, capsys):
    feeds = {n: rand(2, 4, 5, 8, seed=i) for i, n in enumerate("qkv")}
    r, _ = check_simplified(tmp_path, attention_model(17), feeds)
    assert r.wrote == "opt level 1" and "Attention" not in r.op_counts_out
    assert len(r.notes) == 1 and "Attention exists from ONNX opset 23" in r.notes[0]
    assert main(["simplify", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "cli.onnx")]) == 0
    assert "--opset N" in capsys.readouterr().out
    r, _ = check_simplified(tmp_path, attention_model(17), feeds, name="new", opset=23)
    assert r.op_counts_out == {"Attention": 1}


def test_a_larger_optimized_graph_is_not_written(tmp_path, monkeypatch):
    """Whatever the optimizer does, the output has at most the input's nodes: here every level
    comes out one node larger, so the input is written unchanged and the report says why."""
    import ember.tools.simplify as simplify

    real = simplify._optimized

    def grown(proto, level, opset):
        out, passes = real(proto, level, opset)
        first = out.graph.input[0].name
        out.graph.node.insert(0, helper.make_node("Identity", [first], [first + "_copy"]))
        for _ in range(len(proto.graph.node) - len(out.graph.node) + 1):
            out.graph.node.insert(0, helper.make_node("Identity", [first], [first + f"_copy{len(out.graph.node)}"]))
        return out, passes

    monkeypatch.setattr(simplify, "_optimized", grown)
    m = five_node_model()
    r, out = check_simplified(tmp_path, m, {"x": rand(3, 8)})
    assert r.wrote == WROTE_INPUT and r.nodes_out == 5
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in m.graph.node]
    assert len(r.notes) == 2 and all("more than the input's 5" in n for n in r.notes)


def test_digits_example_simplified(tmp_path):
    """The shipped example (a real PyTorch export, opset 17) on its own sample images."""
    m = onnx.load(os.path.join(ROOT, "examples", "digits", "digits_cnn.onnx"))
    images = np.load(os.path.join(ROOT, "examples", "digits", "samples.npz"))["image"]
    r, out = check_simplified(tmp_path, m, {"image": images})
    assert r.opset_out == 17 and r.nodes_out <= 11 and "Transpose" not in r.op_counts_out


# -- real models, where the development machine has them ----------------------------------------------------
CORPUS_CASES = {  # name -> input shapes; each exercises a different way down to its opset
    "ppocr_cls": {"x": (2, 3, 48, 192)},  # opset 10: HardSwish and renamed BatchNormalization inputs
    "ppocrv6_rec_small": {"x": (1, 3, 48, 320)},  # opset 11: attention falls back to cleanup
    "yolov8n_doclaynet": {},  # opset 12 (static 1x3x1024x1024): SiLU fused into convolutions
    "magika": {"bytes": (2, 2048)},  # opset 15: Gelu
    "age": {"images": (2, 3, 64, 64)},  # opset 18
}


@pytest.mark.parametrize("name", sorted(CORPUS_CASES))
def test_corpus_model_keeps_opset_and_matches_onnxruntime(tmp_path, name):
    path = os.path.join(CORPUS, f"{name}.onnx")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is on the development machine only")
    m = onnx.load(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = CORPUS_CASES[name].get(i.name) or tuple(d if isinstance(d, int) else 1 for d in i.shape)
        feeds[i.name] = (rand(*shape) if "float" in i.type else
                         np.random.default_rng(0).integers(0, 8, shape).astype(np.int64 if "int64" in i.type else np.int32))
    check_simplified(tmp_path, m, feeds, rtol=1e-4, check=False)
