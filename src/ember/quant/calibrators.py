"""Range collectors and calibrators, as NVIDIA's pytorch-quantization describes them.

A :class:`HistogramCollector` keeps a histogram of |x| over every calibration batch: 2048 bins over
[0, amax of the first batch], extended with bins of the same width when a later batch reaches
further (past MAX_BINS, neighbouring bins are merged into wider ones instead). From it a calibrator picks the ``amax`` the quantization range clips at:

- ``entropy``: the threshold whose 128-level quantized distribution is closest (Kullback-Leibler)
  to the clipped reference distribution, searched from bin 128 up (TensorRT's entropy calibrator);
- ``percentile``: the 99.99th percentile of |x|;
- ``mse``: the candidate amax (every bin centre from bin 128 up) whose fake-quantized histogram has
  the least mean squared error;
- ``minmax``: the largest |x| seen (a :class:`MaxCollector` suffices).

Weights are calibrated per output channel by their max (:func:`channel_amax`). INT8 scales are
``amax / 127`` (symmetric); FP8 (E4M3) scales ``amax / 448``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .data import CalibrationError

NUM_BINS = 2048
# a histogram that keeps widening (a first batch of tiny values, later ones far larger) merges
# neighbouring bins rather than grow past this: entropy and MSE search every bin (quadratic time)
MAX_BINS = 4 * NUM_BINS
START_BIN = 128
PERCENTILE = 99.99
METHODS = ("entropy", "minmax", "percentile", "mse")
QMAX = {"int8": 127.0, "fp8": 448.0}


@dataclass
class MaxCollector:
    """The largest |x| seen."""

    amax: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        if x.numel():
            self.amax = max(self.amax, float(x.detach().abs().max()))


@dataclass
class HistogramCollector:
    """A histogram of |x| with bins of one width, growing to the largest value seen."""

    num_bins: int = NUM_BINS
    hist: Optional[np.ndarray] = None
    width: float = 0.0
    amax: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        if not x.numel():
            return
        a = x.detach().abs().float().reshape(-1)
        top = float(a.max())
        if not math.isfinite(top):
            raise CalibrationError("a calibration batch gave an infinite or NaN activation; check the data's range "
                                   "and preprocessing")
        self.amax = max(self.amax, top)
        if self.hist is None:
            if top == 0.0:
                return  # all zero so far: nothing to place yet (amax stays 0)
            self.width = top / self.num_bins
            self.hist = np.zeros(self.num_bins, dtype=np.float64)
        n = len(self.hist)
        if top > n * self.width:  # extend with bins of the same width
            n = int(math.ceil(top / self.width))
            if n > MAX_BINS:  # merge each k neighbours into one bin (the edges stay edges): at most MAX_BINS
                k = int(math.ceil(n / MAX_BINS))
                old = np.zeros(int(math.ceil(len(self.hist) / k)) * k, dtype=np.float64)
                old[:len(self.hist)] = self.hist
                self.hist, self.width = old.reshape(-1, k).sum(axis=1), self.width * k
                n = min(int(math.ceil(top / self.width)), MAX_BINS)
            grown = np.zeros(n, dtype=np.float64)
            grown[:len(self.hist)] = self.hist
            self.hist = grown
        counts = torch.histc(a, bins=n, min=0.0, max=n * self.width)
        self.hist += counts.double().cpu().numpy()

    @property
    def edges(self) -> np.ndarray:
        return np.arange(len(self.hist) + 1, dtype=np.float64) * self.width


@dataclass
class ChannelMaxCollector:
    """The largest |x| per channel of the last axis (SmoothQuant's activation statistic)."""

    amax: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        if not x.numel():
            return
        m = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(dim=0).cpu()
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)


def entropy_amax(hist: np.ndarray, edges: np.ndarray, num_levels: int = 128, start_bin: int = START_BIN,
                 stride: int = 1) -> float:
    """The KL-divergence threshold (pytorch-quantization's ``_compute_amax_entropy``, vectorized)."""
    bins = hist.astype(np.float64).copy()
    if len(bins) < 2:
        return float(edges[-1])
    bins[0] = bins[1]  # zeros (ReLU's) are not information about the range
    divergences, arguments = [], []
    start = min(start_bin, len(bins))
    for i in range(start, len(bins) + 1, stride):
        space = np.linspace(0, i, num=num_levels + 1)
        quant = np.digitize(np.arange(i), space) - 1
        src = bins[:i]
        nonzero = src != 0
        sums = np.bincount(quant[nonzero], weights=src[nonzero], minlength=num_levels).astype(np.float64)
        members = np.bincount(quant[nonzero], minlength=num_levels)
        per_level = np.divide(sums, members, out=np.zeros_like(sums), where=members > 0)
        q = np.where(nonzero, per_level[quant], 0.0)  # each level spread evenly over its nonzero bins
        p = src.copy()
        p[-1] += bins[i:].sum()  # what the threshold clips lands in its last bin
        divergences.append(_kl(p, q))
        arguments.append(i)
    d = np.asarray(divergences)
    last_argmin = len(d) - 1 - int(np.argmin(d[::-1]))
    return float(edges[arguments[last_argmin]])


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        return math.inf
    p, q = p / ps, q / qs
    mask = p > 0
    if np.any(q[mask] == 0):
        return math.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def percentile_amax(hist: np.ndarray, edges: np.ndarray, percentile: float = PERCENTILE) -> float:
    total = hist.sum()
    if total <= 0:
        return float(edges[-1])
    cdf = np.cumsum(hist / total)
    idx = int(np.searchsorted(cdf, percentile / 100.0))
    return float(edges[min(idx, len(edges) - 1)])


def fake_quant(x: np.ndarray, amax: np.ndarray, qtype: str) -> np.ndarray:
    """``x`` quantized and dequantized with range ``amax`` (a column of candidates broadcasts)."""
    if qtype == "fp8":
        scale = amax / QMAX["fp8"]
        t = torch.from_numpy(np.clip(x / scale, -QMAX["fp8"], QMAX["fp8"]).astype(np.float32))
        return t.to(torch.float8_e4m3fn).float().numpy().astype(np.float64) * scale
    scale = amax / QMAX["int8"]
    return np.clip(np.round(x / scale), -127, 127) * scale


def mse_amax(hist: np.ndarray, edges: np.ndarray, qtype: str = "int8", start_bin: int = START_BIN,
             stride: int = 1) -> float:
    """The candidate amax (a bin centre) with the least histogram-weighted squared quantization error."""
    centers = (edges[1:] + edges[:-1]) / 2
    cand = np.arange(min(start_bin, len(centers) - 1), len(centers), stride)
    best, best_err = float(centers[-1]), math.inf
    for chunk in np.array_split(cand, max(1, len(cand) // 256)):  # candidates x bins at a time, bounded memory
        amax = centers[chunk][:, None]
        err = ((fake_quant(centers[None, :], amax, qtype) - centers[None, :]) ** 2 * hist[None, :]).mean(axis=1)
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = float(centers[chunk[i]]), float(err[i])
    return best


def compute_amax(method: str, collector: "HistogramCollector | MaxCollector", qtype: str = "int8") -> float:
    """The activation range ``method`` picks from a collector's statistics."""
    if method == "minmax" or isinstance(collector, MaxCollector):
        return collector.amax
    if collector.hist is None:  # every value was 0
        return 0.0
    if method == "entropy":
        if qtype == "fp8":
            raise CalibrationError("the entropy calibrator models 128 uniform levels, which FP8 does not have; "
                                   "use --calib-method minmax, percentile or mse with --fp8")
        return entropy_amax(collector.hist, collector.edges)
    if method == "percentile":
        return percentile_amax(collector.hist, collector.edges)
    if method == "mse":
        return mse_amax(collector.hist, collector.edges, qtype)
    raise CalibrationError(f"calibration method '{method}' is not one of {', '.join(METHODS)}")


def collector_for(method: str) -> Callable[[], "HistogramCollector | MaxCollector"]:
    if method not in METHODS:
        raise CalibrationError(f"calibration method '{method}' is not one of {', '.join(METHODS)}")
    return MaxCollector if method == "minmax" else HistogramCollector


def scale_of(amax: float, qtype: str) -> float:
    """The per-tensor scale of a range: amax / 127 (int8) or amax / 448 (E4M3); 1 for an all-zero tensor."""
    return amax / QMAX[qtype] if amax > 0 and math.isfinite(amax) else 1.0


@dataclass
class QuantizedWeight:
    """A weight quantized per output channel: the quantized array and one scale per channel."""

    data: np.ndarray  # int8, or float8_e4m3fn (ml_dtypes)
    scale: np.ndarray  # float32 [channels]
    axis: int
    error: float = field(default=0.0)  # relative L2 of the dequantized weight from the original


def channel_amax(w: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    return np.abs(w.astype(np.float64)).max(axis=other)


def quantize_weight(w: np.ndarray, axis: int, qtype: str) -> QuantizedWeight:
    """Per-channel max calibration: scale_c = max|W_c| / 127 (or / 448), values rounded to nearest
    (int8: symmetric, -127..127; fp8: E4M3, saturating)."""
    from ..ops.torch_types import tensor_to_numpy

    axis %= w.ndim
    amax = channel_amax(w, axis)
    scale = np.where(amax > 0, amax / QMAX[qtype], 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    s = scale.reshape(shape).astype(np.float64)
    x = w.astype(np.float64) / s
    if qtype == "fp8":
        t = torch.from_numpy(np.clip(x, -QMAX["fp8"], QMAX["fp8"]).astype(np.float32)).to(torch.float8_e4m3fn)
        data, deq = tensor_to_numpy(t), t.float().numpy().astype(np.float64) * s
    else:
        q = np.clip(np.round(x), -127, 127)
        data, deq = q.astype(np.int8), q * s
    norm = np.linalg.norm(w.astype(np.float64))
    err = float(np.linalg.norm(deq - w) / norm) if norm > 0 else 0.0
    return QuantizedWeight(data, scale, axis, err)
