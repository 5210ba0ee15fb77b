"""A real CNN of the corpus (mtcnn_onet, in the CI subset) as an INT8 engine: close to fp32 with every layer
quantized, and the accuracy budget names the layers a tight budget keeps in floating point. (The seven-CNN
table of docs/quantization.md: benchmarks/quant_bench.py --numerics.)"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ember

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import corpus_models  # noqa: E402

pytestmark = pytest.mark.corpus


def smooth_images(n: int, seed: int) -> np.ndarray:
    """48x48 RGB in [-1, 1], NHWC, with the spatial correlation of photos (upsampled noise, not white)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    fine = torch.rand(n, 3, 48, 48, generator=g) * 0.15
    x = torch.nn.functional.interpolate(coarse, size=(48, 48), mode="bicubic", align_corners=False) + fine
    return ((x.clamp(0, 1) - 0.5) * 2).permute(0, 2, 3, 1).contiguous().numpy()


def test_mtcnn_onet_int8_and_its_budget():
    path = str(corpus_models.fetch(corpus_models.BY_NAME["mtcnn_onet"]))
    calib = [{"input_3": smooth_images(8, s)} for s in range(10)]
    test = {"input_3": smooth_images(32, 99)}
    ref = ember.build(path, device="cpu").run(test)
    engine = ember.build(path, device="cpu", quantize="int8", calibration=calib)
    assert engine.manifest["quantization"]["layers"] == 8
    got = engine.run(test)
    for name in ("dense_5", "dense_6"):  # box regression and landmarks
        a, b = got[name].astype(np.float64), ref[name].astype(np.float64)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.mean() >= 0.99, (name, cos.mean())
    tight = ember.build(path, device="cpu", quantize="int8", calibration=calib, accuracy_budget="0.5%")
    acc = tight.manifest["quantization"]["accuracy"]
    kept = tight.manifest["quantization"]["kept_layers"]
    assert acc["error_all_quantized"] > 0.005 >= acc["error"] and kept
    assert all(": sensitivity, output drift" in k for k in kept)
    assert tight.manifest["quantization"]["layers"] == 8 - len(kept)
