"""INT8/FP8 builds from calibration data (ember build --int8 / --fp8): the digits CNN keeps its accuracy
with every calibrator, the accuracy budget names the layers it keeps in float and why, the calibration
cache is reused while the graph is the same, and SmoothQuant tames outlier channels."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ember
from ember.cli.main import main
from ember.errors import EmberError

DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                      "digits")
MODEL = os.path.join(DIGITS, "digits_cnn.onnx")


@pytest.fixture(scope="module")
def digits():
    """The split examples/digits/train.py trained on (digits_data.npz): pixel values 0..16, images = pixels / 16."""
    d = np.load(os.path.join(DIGITS, "digits_data.npz"))
    train = d["train_pixels"].astype(np.float32) / 16
    test, labels = d["test_pixels"].astype(np.float32) / 16, d["test_label"]
    fp32 = ember.build(MODEL, device="cpu").run({"image": test})
    return train, test, labels, fp32


def calibration(train, n=512):
    return [{"image": train[i:i + 64]} for i in range(0, n, 64)]


@pytest.mark.parametrize("qtype, method", [("int8", "entropy"), ("int8", "minmax"), ("int8", "percentile"),
                                           ("int8", "mse"), ("fp8", "minmax")])
def test_digits_accuracy_within_one_point_of_fp32(digits, qtype, method):
    train, test, labels, fp32 = digits
    engine = ember.build(MODEL, device="cpu", quantize=qtype, calibration=calibration(train), calib_method=method)
    ops = [n.op for n in engine.graph.nodes]
    assert ops.count("ember.QConv") == 3 and ops.count("ember.QGemm") == 1, ops
    out = engine.run({"image": test})
    acc32, acc = (fp32["digit"] == labels).mean(), (out["digit"] == labels).mean()
    assert acc32 > 0.97 and abs(acc - acc32) <= 0.01, (acc, acc32)
    rel = np.linalg.norm(out["logits"] - fp32["logits"]) / np.linalg.norm(fp32["logits"])
    assert 1e-4 < rel < (0.05 if qtype == "int8" else 0.12), rel  # quantized, and close
    q = engine.manifest["quantization"]
    assert q["type"] == qtype and q["layers"] == 4 and q["calibration"]["method"] == method
    assert q["calibration"]["samples"] == 512


def test_the_accuracy_budget_keeps_the_most_sensitive_layers_and_says_why(digits, tmp_path):
    train, test, labels, fp32 = digits
    engine = ember.build(MODEL, device="cpu", quantize="int8", calibration=calibration(train, 640),
                         accuracy_budget="1%", calib_cache=str(tmp_path / "digits.calib"))
    q = engine.manifest["quantization"]
    acc = q["accuracy"]
    assert acc["error_all_quantized"] > 0.01 >= acc["error"] and acc["within_budget"]
    assert acc["held_out_samples"] == 128 and q["calibration"]["samples"] == 512  # 20% held out, never calibrated
    assert q["kept_layers"] and q["layers"] == 4 - len(q["kept_layers"])
    worst = max(acc["most_sensitive"], key=acc["most_sensitive"].get)
    assert q["kept_layers"][0].startswith(f"{worst} (ember.Conv): sensitivity, output drift")
    kept = {n.name: n.op for n in engine.graph.nodes}
    assert kept[worst] == "ember.Conv"  # computed in float
    out = engine.run({"image": test})["logits"]
    assert np.linalg.norm(out - fp32["logits"]) / np.linalg.norm(fp32["logits"]) < 0.015  # on other data too
    # the cache: a second build calibrates nothing; another graph (static shapes) calibrates again
    again = ember.build(MODEL, device="cpu", quantize="int8", calibration=calibration(train, 640),
                        accuracy_budget="1%", calib_cache=str(tmp_path / "digits.calib"))
    assert again.manifest["quantization"]["calibration"]["cached"] is True
    assert again.manifest["quantization"]["kept_layers"] == q["kept_layers"]
    text = (tmp_path / "digits.calib").read_text()
    assert "method mse" in text and text.count("\namax ") == 4
    other = ember.build(MODEL, device="cpu", quantize="int8", calibration=calibration(train),
                        shapes={"image": (64, 1, 8, 8)}, calib_cache=str(tmp_path / "digits.calib"))
    assert other.manifest["quantization"]["calibration"]["cached"] is False


def test_cli_flags_and_report(digits, tmp_path, capsys):
    train = digits[0]
    np.savez(tmp_path / "calib.npz", image=train[:256])
    eng = str(tmp_path / "d.engine")
    assert main(["build", MODEL, "-o", eng, "--device", "cpu", "--int8", "--calib", str(tmp_path / "calib.npz"),
                 "--calib-method", "percentile", "--calib-samples", "200", "--accuracy-budget", "1%"]) == 0
    err = capsys.readouterr().err
    assert "int8: " in err and "layers quantized; calibration percentile on 200 samples" in err
    assert "held-out samples" in err
    loaded = ember.Engine.load(eng, device="cpu")
    assert loaded.manifest["quantization"]["type"] == "int8"
    assert main(["build", MODEL, "-o", eng, "--device", "cpu", "--calib", str(tmp_path / "calib.npz")]) == 1
    assert "add --int8 or --fp8" in capsys.readouterr().err
    assert main(["build", MODEL, "-o", eng, "--device", "cpu", "--int8"]) == 1
    assert "needs calibration data" in capsys.readouterr().err
    assert main(["build", MODEL, "-o", str(tmp_path / "again.engine"), "--rebuild-from", eng]) == 1
    assert "is an INT8 engine, whose calibration data it does not hold" in capsys.readouterr().err


def outlier_mlp() -> onnx.ModelProto:
    """x [N, 32] -> Linear(32, 32) -> Relu -> Linear(32, 8); the calibration data has outlier channels."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((32, 32)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((32, 8)).astype(np.float32) * 0.2
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def outlier_data(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    x[:, [3, 17]] *= 60.0  # the outlier channels LLM and BERT activations have
    return x


def test_smoothquant_migrates_outlier_channels_into_the_weights():
    model = outlier_mlp()
    cal = [{"x": outlier_data(64, s)} for s in range(4)]
    test = outlier_data(256, 9)
    want = ember.build(model, device="cpu").run({"x": test})["y"]

    def error(**kw):
        e = ember.build(model, device="cpu", quantize="int8", calibration=cal, calib_method="minmax", **kw)
        return np.linalg.norm(e.run({"x": test})["y"] - want) / np.linalg.norm(want), e

    plain, _ = error(smooth_alpha=None)
    smoothed, engine = error(smooth_alpha=0.5)
    assert smoothed < 0.5 * plain, (smoothed, plain)
    assert error()[0] < plain  # the default ("auto", alpha 0.8) smooths too
    first = next(n for n in engine.graph.nodes if n.op == "ember.QGemm")
    assert len(first.inputs) == 10 and first.inputs[9] is not None  # the factor, applied as it quantizes
    assert engine.manifest["quantization"]["calibration"]["smoothed_layers"] == 2
    with pytest.raises(EmberError, match="between 0 and 1"):
        ember.build(model, device="cpu", quantize="int8", calibration=cal, smooth_alpha=1.5)


def test_fp8_refuses_the_entropy_calibrator(digits):
    with pytest.raises(EmberError, match="FP8"):
        ember.build(MODEL, device="cpu", quantize="fp8", calibration=calibration(digits[0], 64),
                    calib_method="entropy")
