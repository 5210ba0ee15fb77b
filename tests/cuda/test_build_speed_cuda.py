"""Build speed and fp16 on the GPU (issue 10): kernels compiled by workers are the ones launches find,
template configurations are pruned by shape, a warm rebuild times nothing, fp16 stays within the
fidelity budget and is not slower than fp32. Runs only with a GPU (-m cuda)."""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import ember

pytestmark = pytest.mark.cuda


def conv_net(batch: int = 8, upsample: bool = False):
    """conv 3->32 s2, conv 32->64, conv 64->64 (+ ConvTranspose, Resize: ops without fp16 tactics)."""
    rng = np.random.default_rng(0)
    ws = {"w1": (32, 3, 3, 3), "w2": (64, 32, 3, 3), "w3": (64, 64, 1, 1), "wt": (64, 32, 2, 2)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32), n)
             for n, s in ws.items()]
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "w2"], ["b"], pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["br", "w3"], ["c"])]
    out = "c"
    if upsample:
        nodes += [helper.make_node("ConvTranspose", ["c", "wt"], ["t"], strides=[2, 2]),
                  helper.make_node("Resize", ["t", "", "scales"], ["y"], mode="nearest")]
        out = "y"
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 64, 64])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def fresh_triton_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    return tmp_path / "triton"


def _kernel_binaries(cache) -> dict[str, float]:
    """cubin files in Triton's cache: path -> modification time."""
    out = {}
    for d in os.listdir(cache):
        for f in os.listdir(os.path.join(cache, d)):
            if f.endswith(".cubin"):
                out[os.path.join(d, f)] = os.path.getmtime(os.path.join(cache, d, f))
    return out


def test_a_workers_kernel_is_the_one_the_launch_finds(fresh_triton_cache):
    from ember.kernels import compile_pool as cp
    from ember.kernels import triton_templates as tt

    pool = cp.CompilePool(cp.current_target(torch.device("cuda")), workers=2)
    try:
        a = torch.randn(300, 128, device="cuda", dtype=torch.float16)
        w = torch.randn(128, 192, device="cuda", dtype=torch.float16)
        c, launch = tt.gemm_launch(a, w, activation="Relu", config=tt.GEMM_CONFIGS[3])
        assert pool.submit(launch.spec()).result(timeout=300) > 0
    finally:
        pool.close()
    before = _kernel_binaries(fresh_triton_cache)
    assert len(before) == 1
    y = tt.gemm(a, w, activation="Relu", config=tt.GEMM_CONFIGS[3])
    torch.cuda.synchronize()
    # Triton may add its launcher stub (a .so) to the cache; the kernel itself must not be compiled again
    assert _kernel_binaries(fresh_triton_cache) == before, "the launch compiled its own kernel: the keys differ"
    torch.testing.assert_close(y.float(), torch.relu(a.float() @ w.float()), rtol=2e-2, atol=2e-2)


def test_fp16_build_prunes_compiles_ahead_and_a_warm_rebuild_times_nothing(tmp_path, fresh_triton_cache):
    model = conv_net().SerializeToString()
    cache = str(tmp_path / "timing.json")
    t = time.perf_counter()
    e16 = ember.build(model, device="cuda", precision="fp16", timing_cache=cache)
    cold = time.perf_counter() - t
    tune = e16.tuning
    assert tune.compiled > 0, "no template kernel was compiled by the workers"
    assert tune.pruned > 0, "no template configuration was pruned (Cout 32/64 rules out 256-wide tiles)"
    assert not tune.failures, tune.failures
    e32 = ember.build(model, device="cuda", timing_cache=cache)
    x = {"x": np.random.default_rng(1).standard_normal((8, 3, 64, 64)).astype(np.float32)}
    assert rel_l2(e16.run(x)["c"], e32.run(x)["c"]) < 1e-2
    assert e16.manifest["fidelity"]["within_budget"]
    t = time.perf_counter()
    again = ember.build(model, device="cuda", precision="fp16", timing_cache=cache)
    warm = time.perf_counter() - t
    assert again.tuning.timed == 0 and again.tuning.cached > 0
    assert warm < cold and warm < 10.0
    assert again.manifest["tactics"] == e16.manifest["tactics"]


def _ms(engine, feeds, runs: int = 50) -> float:
    for _ in range(5):
        engine.run(feeds)
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.run(feeds)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def test_fp16_is_not_slower_than_fp32(tmp_path):
    """ConvTranspose and Resize have no fp16 tactic: their references widen to fp32 inside. The tuner
    times them in fp32 too and keeps them there when that is faster, casts included."""
    model = conv_net(batch=16, upsample=True).SerializeToString()
    cache = str(tmp_path / "timing.json")
    e16 = ember.build(model, device="cuda", precision="fp16", timing_cache=cache)
    e32 = ember.build(model, device="cuda", timing_cache=cache)
    assert {n.name for n in e16.graph.nodes if n.op == "ConvTranspose"} <= set(e16.tuning.node_ms)
    x = {"x": np.random.default_rng(2).standard_normal((16, 3, 64, 64)).astype(np.float32)}
    assert rel_l2(e16.run(x)["y"], e32.run(x)["y"]) < 1e-2
    t16, t32 = _ms(e16, x), _ms(e32, x)
    assert t16 <= 1.1 * t32, f"fp16 {t16:.3f} ms vs fp32 {t32:.3f} ms; kept fp32: {e16.manifest['fp32_layers']}"
