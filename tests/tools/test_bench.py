"""`ember bench` and the per-layer profiler, on CPU: a tiny onnx.helper model and the digits CNN."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import ember
from ember.cli.main import main
from ember.runtime.profiler import profile_layers, summarize_ms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "examples", "digits", "digits_cnn.onnx")
FAST = ["--warmup", "5", "--duration", "0.05", "--iterations", "5"]


@pytest.fixture(autouse=True)
def one_thread():
    # small CPU ops on a shared 2-core machine: OpenMP spinning makes runs 100x slower and noisy
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(path) -> str:
    """y = relu(x @ w + b) * x[..., :4]: MatMul, Add, Relu, Slice (shape arithmetic), Mul; dynamic batch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [8, 4], rng.standard_normal((8, 4)).astype(np.float32).ravel()),
             helper.make_tensor("b", TensorProto.FLOAT, [4], rng.standard_normal(4).astype(np.float32)),
             helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [4]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["xs"], name="slice"),
             helper.make_node("Mul", ["r", "xs"], ["y"], name="mul")]
    g = helper.make_graph(nodes, "tiny", [x], [y], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _bench_json(tmp_path, *args) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", *args, *FAST, "--export-json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_tiny_model_json_fields(tmp_path, capsys):
    model = tiny_model(tmp_path / "tiny.onnx")
    r = _bench_json(tmp_path, model, "--device", "cpu", "--batch", "3", "--dump-profile")
    printed = capsys.readouterr().out
    assert "Throughput" in printed and "Per-layer profile" in printed and "relu" in printed
    assert r["device"] == "cpu" and r["batch"] == 3 and r["iterations"] >= 5
    assert r["inputs"] == {"x": {"shape": [3, 8], "dtype": "float32"}}
    assert r["throughput"]["inferences_per_s"] > 0
    assert r["throughput"]["samples_per_s"] == pytest.approx(3 * r["throughput"]["inferences_per_s"])
    for key in ("latency_ms", "compute_ms", "enqueue_ms"):
        s = r[key]
        assert set(s) >= {"min", "mean", "median", "p90", "p95", "p99", "max"}
        assert 0 < s["min"] <= s["median"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
    assert r["h2d_ms"] is None and r["d2h_ms"] is None  # CPU: no transfers to time
    assert r["config"]["data_transfers"] is True and r["engine"]["precision"] == "fp32"
    prof = r["profile"]
    ops = {layer["op"] for layer in prof["layers"]}
    assert ops & {"MatMul", "Gemm", "ember.Gemm"} and "Mul" in ops  # the Slice may be folded or not
    assert all(layer["tactic"] for layer in prof["layers"])
    assert sum(layer["percent"] for layer in prof["layers"]) == pytest.approx(100.0, abs=0.5)
    assert sum(layer["ms"] for layer in prof["layers"]) == pytest.approx(prof["layers_total_ms"])


def test_bench_digits_profile_sums_to_total(tmp_path):
    r = _bench_json(tmp_path, DIGITS, "--batch", "4", "--dump-profile", "--profile-runs", "9",
                    "--no-data-transfers", "--device", "cpu")
    assert r["inputs"]["image"]["shape"] == [4, 1, 8, 8]
    prof = r["profile"]
    assert {layer["op"] for layer in prof["layers"]} & {"Conv", "ember.Conv"}
    # per-layer medians add up to the profiled run (same runs) and roughly to the timed latency
    # (loose: a shared CPU makes single runs noisy)
    total, run, lat = prof["layers_total_ms"], prof["run_ms"], r["latency_ms"]["median"]
    assert total == pytest.approx(run, rel=0.5), (total, run)
    assert 0.1 < total / lat < 10.0, (total, lat)


def test_bench_engine_file_and_shapes(tmp_path, capsys):
    model = tiny_model(tmp_path / "tiny.onnx")
    eng = str(tmp_path / "tiny.engine")
    assert main(["build", model, "-o", eng]) == 0
    r = _bench_json(tmp_path, eng, "--shapes", "x:5x8", "--device", "cpu")
    assert r["inputs"]["x"]["shape"] == [5, 8] and r["batch"] is None
    assert "samples_per_s" not in r["throughput"]
    # a built engine's precision is fixed: asking for another is a message, not a traceback
    assert main(["bench", eng, "--precision", "fp16", *FAST]) == 1
    assert "fixed when it was built" in capsys.readouterr().err


def test_bench_batch_on_static_model_is_a_message(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "static", [x], [y])
    path = str(tmp_path / "static.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["bench", path, "--batch", "8", *FAST]) == 1
    assert "static dims" in capsys.readouterr().err
    r = _bench_json(tmp_path, path, "--batch", "2")  # its own batch is fine
    assert r["throughput"]["samples_per_s"] == pytest.approx(2 * r["throughput"]["inferences_per_s"])


def test_profile_layers_api_and_inputs_never_zero(tmp_path):
    engine = ember.build(tiny_model(tmp_path / "tiny.onnx"), device="cpu")
    from ember.cli.common import make_feeds

    feeds = make_feeds(engine, (), {"x": (6, 8)})
    assert np.count_nonzero(feeds["x"]) == feeds["x"].size
    prof = profile_layers(engine, feeds, runs=3, warmup=1)
    assert prof.runs == 3 and prof.device == "cpu" and prof.layers
    assert prof.layers_total_ms == pytest.approx(sum(layer.ms for layer in prof.layers))
    assert sum(d["count"] for d in prof.by_op.values()) == len(prof.layers)
    json.dumps(prof.to_json())


def test_summarize_ms_percentiles():
    s = summarize_ms([float(i) for i in range(1, 101)])
    assert (s["min"], s["median"], s["p90"], s["p99"], s["max"], s["count"]) == (1, 50.5, 90, 99, 100, 100)
    assert summarize_ms([]) == {}
