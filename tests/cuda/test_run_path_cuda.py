"""The one run path on a GPU: Engine.run on CUDA graphs, Resize models captured, shape buckets,
segment splitting, per-engine math modes, the memory plan, loud fallbacks, the server's staging."""
from __future__ import annotations

import os
import threading

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import ember
from ember.runtime.engine import FallbackError
from tests.core.test_run_path import _if_model, _mlp, _nonzero_model, _ort

pytestmark = pytest.mark.cuda
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "examples", "digits", "digits_cnn.onnx")
F = TensorProto.FLOAT


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_engine_run_is_one_cuda_graph_with_numpy_in_and_out(tmp_path):
    z = np.load(os.path.join(ROOT, "examples", "digits", "samples.npz"))
    eng = ember.build(DIGITS, device="cuda", precision="fp16", timing_cache=None)
    rng = np.random.default_rng(0)
    for _ in range(3):  # fresh data each call: the graph reads this call's inputs
        x = rng.standard_normal(z["image"].shape).astype(np.float32)
        assert _rel(eng.run({"image": x})["logits"], _ort(DIGITS, {"image": x})["logits"]) < 1e-2
    report = eng.capture_report()
    assert report["one_graph"] and report["graphs"] == 1, report
    # the same engine from a file: same outputs, same path
    p = tmp_path / "d.engine"
    eng.save(p)
    again = ember.Engine.load(p)
    x = z["image"]
    np.testing.assert_array_equal(again.run({"image": x})["logits"], eng.run({"image": x})["logits"])


def _resize_model(tmp_path) -> str:
    """Conv -> Resize(x2, sizes computed from the input's shape at run time) -> Conv: the FPN
    pattern whose host->device copies stopped CUDA-graph capture."""
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", F, [8, 3, 3, 3], rng.standard_normal(8 * 27).astype(np.float32) * 0.2)
    w2 = helper.make_tensor("w2", F, [4, 8, 3, 3], rng.standard_normal(4 * 72).astype(np.float32) * 0.2)
    two = helper.make_tensor("two", TensorProto.INT64, [2], [2, 2])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c1"], ["s"]),
        helper.make_node("Slice", ["s", "st", "en"], ["hw"]),
        helper.make_node("Mul", ["hw", "two"], ["hw2"]),
        helper.make_node("Slice", ["s", "z0", "st"], ["nc"]),
        helper.make_node("Concat", ["nc", "hw2"], ["sizes"], axis=0),
        helper.make_node("Resize", ["c1", "", "", "sizes"], ["up"], mode="linear", name="resize"),
        helper.make_node("Conv", ["up", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [w1, w2, two, helper.make_tensor("st", TensorProto.INT64, [1], [2]),
             helper.make_tensor("en", TensorProto.INT64, [1], [4]), helper.make_tensor("z0", TensorProto.INT64, [1], [0])]
    g = helper.make_graph(nodes, "fpn", [helper.make_tensor_value_info("x", F, ["n", 3, "h", "w"])],
                          [helper.make_tensor_value_info("y", F, None)], inits)
    p = str(tmp_path / "resize.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), p)
    return p


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("fp16", 1e-2)])
def test_resize_from_computed_sizes_is_captured(tmp_path, precision, tol):
    path = _resize_model(tmp_path)
    eng = ember.build(path, device="cuda", precision=precision, timing_cache=None)
    rng = np.random.default_rng(1)
    for shape in ((1, 3, 32, 48), (2, 3, 32, 48), (1, 3, 40, 40)):
        x = rng.standard_normal(shape).astype(np.float32)
        assert _rel(eng.run({"x": x})["y"], _ort(path, {"x": x})["y"]) < tol
        assert eng.capture_report()["one_graph"], eng.capture_report()


def test_shape_buckets_on_the_gpu(tmp_path):
    path = _mlp(tmp_path)
    eng = ember.build(path, device="cuda", timing_cache=None)
    ctx = eng.create_execution_context()
    rng = np.random.default_rng(2)
    for n in (3, 4, 5, 8, 9, 16, 1):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        assert _rel(ctx.run({"x": x})["y"], _ort(path, {"x": x})["y"]) < 1e-5
    assert len(ctx._plans) == 4  # buckets 4, 8, 16 and the exact 1
    assert ctx.capture_report({"x": np.zeros((5, 8), np.float32)})["bucket"] == 8


def test_segments_split_at_data_dependent_steps(tmp_path):
    path = _nonzero_model(tmp_path)
    eng = ember.build(path, device="cuda", timing_cache=None)
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.standard_normal((4, 5)).astype(np.float32)
        got, want = eng.run({"x": x}), _ort(path, {"x": x})
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6)
    report = eng.capture_report()
    assert report["segments"] >= 1 and report["host_steps"] >= 1
    assert any(b["node"] == "nz" for b in report["breaks"]), report
    data_if = _if_model(tmp_path, cond_from_value_input=False)
    eng2 = ember.build(data_if, device="cuda", timing_cache=None)
    for sign in (1, -1):
        x = sign * np.abs(rng.standard_normal((2, 3))).astype(np.float32)
        np.testing.assert_allclose(eng2.run({"x": x})["y"], _ort(data_if, {"x": x})["y"], rtol=1e-6)
    assert [b["node"] for b in eng2.capture_report()["breaks"]] == ["branch"]
    value_if = _if_model(tmp_path, cond_from_value_input=True)
    eng3 = ember.build(value_if, device="cuda", timing_cache=None)
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32), "sr": np.array(16000, np.int64)}
    np.testing.assert_allclose(eng3.run(feeds)["y"], _ort(value_if, feeds)["y"], rtol=1e-6)
    assert eng3.capture_report()["one_graph"]


def _matmul_model(tmp_path, n: int = 512) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((n, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", F, [n, n])], [helper.make_tensor_value_info("y", F, [n, n])],
                          [helper.make_tensor("w", F, [n, n], w.ravel())])
    p = str(tmp_path / "mm.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), p)
    return p, w


def test_two_engines_keep_their_own_tf32_settings(tmp_path):
    path, w = _matmul_model(tmp_path)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    ieee = ember.build(path, device="cuda", precision="fp32", timing_cache=None)
    tf32 = ember.build(path, device="cuda", precision="tf32", timing_cache=None)
    x = np.random.default_rng(5).standard_normal((512, 512)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    errors = {}

    def run(name, eng):
        for _ in range(5):
            errors.setdefault(name, []).append(_rel(eng.run({"x": x})["y"], ref))

    threads = [threading.Thread(target=run, args=a) for a in (("ieee", ieee), ("tf32", tf32), ("ieee2", ieee))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(errors["ieee"] + errors["ieee2"]) < 1e-5, errors  # true fp32, whatever ran beside it
    assert min(errors["tf32"]) > 1e-5 and max(errors["tf32"]) < 5e-3, errors  # TF32 tensor cores
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        c = [3, 32, 64, 128, 128]
        layers = []
        for i in range(4):
            layers += [torch.nn.Conv2d(c[i], c[i + 1], 3, padding=1), torch.nn.ReLU()]
        self.body = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x).mean((2, 3))


def test_memory_plan_matches_the_measured_peak(tmp_path):
    path = str(tmp_path / "convnet.onnx")
    torch.onnx.export(_ConvNet().eval(), (torch.randn(16, 3, 128, 128),), path, input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    eng = ember.build(path, device="cuda", precision="fp16", timing_cache=None)
    planned = eng.manifest["memory"]["activations_peak_mib"] * (1 << 20)
    x = np.random.default_rng(6).standard_normal((16, 3, 128, 128)).astype(np.float32)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    eng.run({"x": x})
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    ctx = eng.context()
    arena = ctx.arena_bytes()
    print(f"planned {planned / 2**20:.1f} MiB, measured peak {measured / 2**20:.1f} MiB, "
          f"arena {'n/a' if arena is None else f'{arena / 2**20:.1f}'} MiB")
    # the peak holds the plan's live activations plus the inputs, outputs and vendor workspaces
    assert 0.5 * planned <= measured <= 1.5 * planned + (64 << 20), (planned, measured)


def test_a_kernel_that_cannot_run_here_is_an_error_unless_allowed(tmp_path):
    eng = ember.build(DIGITS, device="cuda", precision="fp16", timing_cache=None)
    assert eng.manifest["tactics"]
    p = tmp_path / "d.engine"
    eng.save(p)
    with pytest.raises(FallbackError, match="cannot run with the kernels it was built with"):
        ember.Engine.load(p, device="cpu")
    cpu = ember.Engine.load(p, device="cpu", allow_fallback=True)
    assert cpu.fallbacks
    z = np.load(os.path.join(ROOT, "examples", "digits", "samples.npz"))
    assert _rel(cpu.run({"image": z["image"]})["logits"], _ort(DIGITS, {"image": z["image"]})["logits"]) < 1e-2


def test_staged_runs_for_the_server(tmp_path):
    path = _mlp(tmp_path)
    eng = ember.build(path, device="cuda", timing_cache=None)
    ctx = eng.create_execution_context()
    rng = np.random.default_rng(7)
    pending = []
    for n in (3, 5, 3, 7, 3):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        run = ctx.stage({"x": ((n, 8), np.float32)})
        run.inputs["x"][...] = x
        run.submit()
        pending.append((x, run))
        if len(pending) == 2:
            x0, r0 = pending.pop(0)
            assert _rel(r0.wait()["y"], _ort(path, {"x": x0})["y"]) < 1e-5
    for x0, r0 in pending:
        assert _rel(r0.wait()["y"], _ort(path, {"x": x0})["y"]) < 1e-5


def test_a_capture_that_syncs_recovers_and_leaves_the_allocator_sound(tmp_path):
    """An op that synchronizes inside capture invalidates it; the step becomes a host step, the run is
    right, and the caching allocator is not left mid-capture (empty_cache would assert)."""
    path = _mlp(tmp_path)
    eng = ember.build(path, device="cuda", timing_cache=None)
    orig = eng._interp.invoke

    def invoke(step, bound, args, run_sub=None):
        out = orig(step, bound, args, run_sub)
        if torch.cuda.is_current_stream_capturing() and isinstance(out, torch.Tensor):
            float(out.reshape(-1)[0])  # .item(): a sync inside capture
        return out

    eng._interp.invoke = invoke
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert _rel(eng.run({"x": x})["y"], _ort(path, {"x": x})["y"]) < 1e-5
    assert eng.capture_report()["host_steps"] >= 1
    torch.cuda.empty_cache()  # asserts inside torch if a capture were left under way
    eng._interp.invoke = orig
    fresh = ember.build(path, device="cuda", timing_cache=None)
    assert fresh.capture_report({"x": x})["one_graph"]


def test_contexts_are_bounded_and_report_their_arena(tmp_path):
    path = _mlp(tmp_path)
    eng = ember.build(path, device="cuda", timing_cache=None)
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    errors = []

    def worker():
        try:
            for _ in range(5):
                assert _rel(eng.run({"x": x})["y"], _ort(path, {"x": x})["y"]) < 1e-5
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert eng._made <= eng.max_contexts
    arena = eng.context().arena_bytes()
    print(f"contexts made: {eng._made}; arena bytes of one: {arena}")
    assert arena is None or arena > 0
