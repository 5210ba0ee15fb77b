"""The CUDA path: tactics, precision, CUDA graphs, profiles. Runs only with a GPU (-m cuda)."""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

import ember
from ember.errors import InputError

pytestmark = pytest.mark.cuda
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "examples", "digits", "digits_cnn.onnx")


@pytest.fixture(scope="module")
def samples():
    z = np.load(os.path.join(ROOT, "examples", "digits", "samples.npz"))
    ref = ort.InferenceSession(DIGITS, providers=["CPUExecutionProvider"]).run(None, {"image": z["image"]})
    return z["image"], ref


def _rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("tf32", 5e-3), ("fp16", 1e-2), ("bf16", 3e-2)])
def test_digits_on_cuda_matches_onnxruntime(samples, tmp_path, precision, tol):
    images, (ref_logits, ref_digit) = samples
    eng = ember.build(DIGITS, device="cuda", precision=precision, timing_cache=str(tmp_path / "tc.json"))
    out = eng.run({"image": images})
    assert _rel(out["logits"], ref_logits) < tol
    assert (out["digit"] == ref_digit).mean() >= 15 / 16
    assert eng.manifest["tactics"], "the tuner chose no tactic for any conv/gemm"
    # the engine file keeps the tactics; a reload gives the same outputs
    p = tmp_path / f"d_{precision}.engine"
    eng.save(p)
    again = ember.Engine.load(p)
    np.testing.assert_array_equal(again.run({"image": images})["logits"], out["logits"])


def test_execution_context_cuda_graphs(samples, tmp_path):
    images, (ref_logits, _) = samples
    eng = ember.build(DIGITS, device="cuda", precision="fp16", timing_cache=None)
    ctx = eng.create_execution_context()
    x16 = torch.from_numpy(images).cuda()
    eager = eng.run({"image": x16})["logits"].float().cpu().numpy()
    for batch in (16, 16, 4):
        out = ctx.run_device({"image": x16[:batch]})["logits"].float().cpu().numpy()
        np.testing.assert_allclose(out, eager[:batch], rtol=1e-3, atol=1e-3)
    assert ctx.graphs == 2, ctx.graph_notes
    host = ctx.run({"image": images})
    assert _rel(host["logits"], ref_logits) < 1e-2
    # a fresh input tensor each call: the graph reads the new data, not the first call's
    other = torch.randn_like(x16)
    a = ctx.run_device({"image": other})["logits"]
    b = eng.run({"image": other})["logits"]
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_profile_violation_is_clear_on_cuda():
    eng = ember.build(DIGITS, device="cuda", precision="fp16", timing_cache=None,
                      profiles=[{"image": ((1, 1, 8, 8), (4, 1, 8, 8), (8, 1, 8, 8))}])
    eng.run({"image": np.random.rand(8, 1, 8, 8).astype(np.float32)})
    with pytest.raises(InputError, match="outside every optimization profile"):
        eng.run({"image": np.random.rand(9, 1, 8, 8).astype(np.float32)})


def test_timing_cache_makes_rebuild_skip_timing(tmp_path):
    cache = str(tmp_path / "tc.json")
    first = ember.build(DIGITS, device="cuda", precision="fp16", timing_cache=cache, builder_level=1)
    assert os.path.isfile(cache)
    second = ember.build(DIGITS, device="cuda", precision="fp16", timing_cache=cache, builder_level=1)
    assert second.manifest["tactics"] == first.manifest["tactics"]
