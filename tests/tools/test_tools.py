"""inspect / check / compare / simplify, as functions and as `ember` subcommands."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ember.cli.main import main
from ember.tools import check_model, compare_models, inspect_model, simplify_model

from ..passes.helpers import init, model, tensor

mk = helper.make_node


def _mlp(tmp_path, name="mlp.onnx"):
    """x -> Identity -> MatMul+Add -> Relu -> MatMul+Add -> Dropout -> y, with a symbolic batch."""
    rng = np.random.default_rng(0)
    nodes = [mk("Identity", ["x"], ["xi"]), mk("MatMul", ["xi", "w1"], ["h0"], name="fc1"),
             mk("Add", ["h0", "b1"], ["h1"], name="fc1_bias"), mk("Relu", ["h1"], ["h2"], name="relu"),
             mk("MatMul", ["h2", "w2"], ["h3"], name="fc2"), mk("Add", ["h3", "b2"], ["h4"], name="fc2_bias"),
             mk("Dropout", ["h4"], ["y"], name="drop")]
    inits = [init("w1", rng.standard_normal((8, 16)).astype(np.float32)), init("b1", rng.standard_normal(16).astype(np.float32)),
             init("w2", rng.standard_normal((16, 4)).astype(np.float32)), init("b2", rng.standard_normal(4).astype(np.float32))]
    path = tmp_path / name
    onnx.save(model(nodes, [tensor("x", ["batch", 8])], [tensor("y", ["batch", 4])], inits), path)
    return str(path)


def test_inspect_json_counts_and_layers(tmp_path, capsys):
    path = _mlp(tmp_path)
    info = inspect_model(path)
    assert info["nodes_in"] == 7 and info["nodes_out"] == 2
    assert [r["op"] for r in info["layers"]] == ["ember.Gemm", "ember.Gemm"]
    assert info["layers"][0]["epilogue"] == ["bias", "Relu"]
    assert info["inputs"][0]["shape"] == ["batch", 8]
    assert main(["inspect", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nodes_in"] == 7 and out["nodes_out"] == 2 and len(out["layers"]) == 2
    assert main(["inspect", path]) == 0
    assert "ember.Gemm" in capsys.readouterr().out


def test_inspect_engine_shows_fusion_groups(tmp_path, capsys):
    import ember

    nodes = [mk("Mul", ["x", "x"], ["a"]), mk("Add", ["a", "x"], ["b"]), mk("Tanh", ["b"], ["y"])]
    path = tmp_path / "pw.onnx"
    onnx.save(model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])]), path)
    eng = tmp_path / "pw.engine"
    ember.build(str(path), device="cpu").save(eng)
    info = inspect_model(str(eng))
    assert info["kind"] == "engine" and info["fusion_groups"] == 1 and info["nodes_out"] == 1
    assert {r["group"] for r in info["layers"]} == {"fg0"}
    assert main(["inspect", str(eng)]) == 0
    assert "fg0" in capsys.readouterr().out


def test_check_ok_and_failing(tmp_path, capsys):
    path = _mlp(tmp_path)
    r = check_model(path)
    assert r.ok and any(f.category == "dynamic_dim" and "batch" in f.message for f in r.warnings)
    assert check_model(path, profile={"batch": (1, 4, 8)}).warnings == []
    assert not check_model(path, strict=True).ok
    assert main(["check", path, "--profile", "batch=1:4:8"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.onnx"
    onnx.save(model([mk("NoSuchOp", ["x"], ["y"], name="weird")], [tensor("x", [2])], [tensor("y", [2])]), bad)
    r = check_model(str(bad))
    assert not r.ok and r.errors[0].category == "unsupported_op" and r.errors[0].node == "weird"
    assert main(["check", str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_check_lists_fp16_risks(tmp_path):
    nodes = [mk("Pow", ["x", "two"], ["p"], name="square"), mk("ReduceMean", ["p", "axes"], ["m"], name="mean"),
             mk("Exp", ["m"], ["y"], name="exp")]
    path = tmp_path / "risky.onnx"
    onnx.save(model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 1])],
                    [init("two", np.float32(2)), init("axes", np.array([0], np.int64))]), path)
    risks = {f.node for f in check_model(str(path)).findings if f.category == "fp16_risk"}
    assert {"square", "mean", "exp"} <= risks


def test_compare_passes_and_reports_stats(tmp_path, capsys):
    path = _mlp(tmp_path)
    for stat in ("elemwise", "max", "mean", "median", "quantile"):
        r = compare_models(path, error_stat=stat, dims={"batch": 3})
        assert r.passed and r.outputs[0].shape == [3, 4] and r.outputs[0].cosine > 0.99999
    assert main(["compare", path, "--json", "--error-stat", "max"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and out["outputs"][0]["name"] == "y"


@pytest.mark.parametrize("opt_level", [0, 2])
def test_compare_all_layers_names_planted_wrong_weight(tmp_path, capsys, opt_level):
    import ember

    path = _mlp(tmp_path)
    engine = ember.build(path, device="cpu", opt_level=opt_level)
    # plant a wrong weight: the second layer's weight, as the engine holds it
    w2 = next(v for v in engine.graph.initializers.values() if v.data.shape == (16, 4))
    w2.data = w2.data.copy()
    w2.data[:, 1] += 0.5
    eng = tmp_path / "bad.engine"
    engine.save(eng)
    r = compare_models(path, str(eng), all_layers=True)
    assert not r.passed
    fd = r.first_divergent
    if opt_level == 0:
        assert fd["node"] == "fc2" and fd["op"] == "MatMul"
    else:  # fc2, its bias and the Dropout became one GEMM: the report names the fused nodes upstream
        assert fd["node"] == "drop" and "fc2 (MatMul)" in fd["fused_upstream"]
        assert not any("fc1" in s for s in fd["fused_upstream"])
    assert main(["compare", path, str(eng), "--all-layers"]) == 1
    assert "first divergent node" in capsys.readouterr().out


def test_compare_all_layers_of_good_model(tmp_path):
    r = compare_models(_mlp(tmp_path), all_layers=True)
    assert r.passed and r.first_divergent is None and len(r.layers) >= 6


def test_simplify_writes_loadable_onnx(tmp_path, capsys):
    import onnxruntime as ort

    path = _mlp(tmp_path)
    out = tmp_path / "out.onnx"
    r = simplify_model(path, out)
    assert r.passed and r.nodes_in == 7
    m = onnx.load(out)
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    assert "Identity" not in ops and "Dropout" not in ops
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert main(["simplify", path, "-o", str(tmp_path / "o2.onnx")]) == 0
    assert "agree" in capsys.readouterr().out


def test_simplify_spells_out_fused_conv(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [mk("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), mk("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
             mk("Clip", ["n", "lo", "hi"], ["r"]), mk("Add", ["r", "x"], ["y"])]
    inits = [init("w", rng.standard_normal((3, 3, 3, 3)).astype(np.float32))] + [
        init(k, (rng.random(3) + 0.5).astype(np.float32)) for k in "gbmv"] + [
        init("lo", np.float32(0)), init("hi", np.float32(6))]
    path = tmp_path / "c.onnx"
    onnx.save(model(nodes, [tensor("x", ["n", 3, 5, 5])], [tensor("y", ["n", 3, 5, 5])], inits, opset=13), path)
    r = simplify_model(str(path), tmp_path / "c2.onnx")
    assert r.passed and "BatchNormalization" not in r.op_counts_out and r.op_counts_out.get("Conv") == 1


def test_compare_without_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    from ember.tools.compare import CompareError

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(CompareError, match="pip install onnxruntime"):
        compare_models(_mlp(tmp_path))
