"""Calibrators as NVIDIA's pytorch-quantization defines them: the KL search over a 2048-bin histogram
from bin 128, the 99.99th percentile, MSE over candidate ranges, max; per-channel weight scales."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from ember.quant.calibrators import (HistogramCollector, MaxCollector, compute_amax, entropy_amax, fake_quant,
                                     mse_amax, percentile_amax, quantize_weight)
from ember.quant.data import CalibrationError


def pytorch_quantization_entropy(calib_hist, calib_bin_edges, num_bits=8, stride=1, start_bin=128):
    """pytorch-quantization's _compute_amax_entropy, loop for loop (scipy's entropy written out)."""
    bins = calib_hist.copy()
    bins[0] = bins[1]
    divergences, arguments = [], []
    nbins = 1 << (num_bits - 1)
    for i in range(start_bin, len(bins) + 1, stride):
        new_density_counts = np.zeros(nbins, dtype=np.float64)
        space = np.linspace(0, i, num=nbins + 1)
        digitized_space = np.digitize(range(i), space) - 1
        digitized_space[bins[:i] == 0] = -1
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density_counts[digitized] += bins[idx]
        counter = Counter(digitized_space)
        for key, val in counter.items():
            if key != -1:
                new_density_counts[key] = new_density_counts[key] / val
        new_density = np.zeros(i, dtype=np.float64)
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density[idx] = new_density_counts[digitized]
        reference = np.array(bins[:len(digitized_space)])
        reference[-1] += np.sum(bins[i:])
        p, q = reference / reference.sum(), new_density / new_density.sum()
        m = p > 0
        divergences.append(np.inf if np.any(q[m] == 0) else float(np.sum(p[m] * np.log(p[m] / q[m]))))
        arguments.append(i)
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return calib_bin_edges[last_argmin * stride + start_bin]


@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_is_pytorch_quantizations_search(seed):
    g = torch.Generator().manual_seed(seed)
    c = HistogramCollector(num_bins=300)  # fewer bins than 2048: the loop version is slow
    for scale in (1.0, 2.5):  # the second batch reaches further: the histogram grows
        c.update(torch.randn(20000, generator=g) * scale + (torch.rand(20000, generator=g) < 0.002) * 30)
    assert len(c.hist) > 300 and np.isclose(c.edges[1] - c.edges[0], c.edges[-1] / len(c.hist))
    assert entropy_amax(c.hist, c.edges) == pytorch_quantization_entropy(c.hist.copy(), c.edges)


def test_histogram_grows_with_one_bin_width_and_keeps_its_counts():
    c = HistogramCollector()
    c.update(torch.tensor([0.5, -1.0, 1.0]))
    width = c.width
    c.update(torch.tensor([3.0, -0.25]))
    assert c.width == width and len(c.hist) == 3 * 2048 and c.hist.sum() == 5 and c.amax == 3.0
    with pytest.raises(CalibrationError, match="infinite or NaN"):
        c.update(torch.tensor([float("nan")]))


def test_percentile_mse_and_max():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200000, generator=g)  # uniform on [0, 1)
    c, m = HistogramCollector(), MaxCollector()
    c.update(x)
    m.update(x)
    assert abs(percentile_amax(c.hist, c.edges) - 0.9999) < 2e-3
    assert compute_amax("minmax", m) == float(x.max())
    # a heavy tail: the calibrators clip it, the max does not
    t = torch.cat([torch.randn(100000, generator=g), torch.rand(100, generator=g) * 40])
    ct = HistogramCollector()
    ct.update(t)
    mse = mse_amax(ct.hist, ct.edges)
    for method in ("entropy", "percentile", "mse"):
        assert compute_amax(method, ct) < float(t.max())
    # MSE: pytorch-quantization's loop over candidate ranges (bin centres from bin 128), narrow-range int8
    centers = (ct.edges[1:] + ct.edges[:-1]) / 2
    errors = [((np.clip(np.round(centers * 127 / centers[i]), -127, 127) * centers[i] / 127 - centers) ** 2
               * ct.hist).mean() for i in range(128, len(centers))]
    assert mse == centers[128 + int(np.argmin(errors))]
    assert mse_amax(ct.hist, ct.edges, "fp8") != mse  # FP8's error is measured with E4M3 rounding
    with pytest.raises(CalibrationError, match="FP8"):
        compute_amax("entropy", ct, "fp8")


def test_fake_quant_int8_and_fp8():
    x = np.array([0.0, 0.3, -1.0, 2.0, 100.0])
    assert np.allclose(fake_quant(x, np.float64(1.0), "int8"), np.round(np.clip(x, -1, 1) * 127) / 127)
    f8 = fake_quant(x, np.float64(448.0), "fp8")
    assert f8[-1] == 96.0 and f8[1] == 0.3125  # E4M3: 3 mantissa bits
    assert fake_quant(np.array([1000.0]), np.float64(448.0), "fp8")[0] == 448.0  # saturates


@pytest.mark.parametrize("qtype, axis", [("int8", 0), ("int8", 1), ("fp8", 0)])
def test_weights_are_quantized_per_output_channel(qtype, axis):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32) * rng.uniform(0.01, 3, (6, 1, 1, 1)).astype(np.float32)
    if axis == 1:
        w = w[:, :, 0, 0].T.copy()  # [K, N]: channels on axis 1
    q = quantize_weight(w, axis, qtype)
    other = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=other)
    assert np.allclose(q.scale, amax / (127 if qtype == "int8" else 448))
    shape = [1] * w.ndim
    shape[axis] = -1
    deq = q.data.astype(np.float32) * q.scale.reshape(shape)
    if qtype == "int8":
        assert q.data.dtype == np.int8 and np.abs(q.data).max() == 127
        assert np.all(np.abs(deq - w) <= q.scale.reshape(shape) / 2 + 1e-7)
    else:
        assert q.data.dtype.name == "float8_e4m3fn"
        assert np.all(np.abs(deq - w) <= np.abs(w) / 16 + 1e-6)  # 3 mantissa bits: half an ulp
    assert q.error < (1e-2 if qtype == "int8" else 4e-2)


def test_a_widening_histogram_merges_bins_instead_of_growing_without_bound():
    c = HistogramCollector()
    g = torch.Generator().manual_seed(0)
    c.update(torch.rand(1000, generator=g) * 1e-3)  # a first batch of tiny values: bins 1e-3 / 2048 wide
    c.update(torch.rand(1000, generator=g) * 1.0)  # 1000x further: 2M bins of the first width
    c.update(torch.rand(1000, generator=g) * 3.0)
    assert len(c.hist) <= 4 * 2048 and c.hist.sum() == 3000  # bounded, and every value still counted once
    assert c.edges[-1] >= c.amax > 2.9 and c.edges[-1] - c.amax < c.width
    assert abs(compute_amax("percentile", c) - c.amax) <= 2 * c.width
    wide = HistogramCollector()
    wide.update(torch.tensor([1.0]))
    wide.update(torch.tensor([3.0]))  # a modest widening keeps the first width
    assert len(wide.hist) == 3 * 2048 and wide.width == 1.0 / 2048
