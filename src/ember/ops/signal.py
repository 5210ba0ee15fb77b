"""Signal processing: DFT, STFT, window functions, MelWeightMatrix.

Complex tensors follow ONNX: a trailing dim of 2 (real, imaginary), or 1 for a real signal.
Sizes that shape an output (window size, dft_length, frame_step) are read from their tensors on
the host: the output shape depends on them, so the read cannot be avoided.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..ir.dtypes import ONNX_TO_DTYPE
from .registry import op
from .torch_types import to_torch

_HALF = (torch.float16, torch.bfloat16)


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """(..., 1|2) real tensor -> complex tensor without the last dim, in fp32 or fp64."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if x.shape[-1] == 1:
        return torch.complex(x[..., 0], torch.zeros_like(x[..., 0]))
    return torch.complex(x[..., 0], x[..., 1])


def _as_pair(z: torch.Tensor) -> torch.Tensor:
    return torch.stack([z.real, z.imag], dim=-1)


@op("DFT", kind="other", host_inputs=("dft_length", "axis"))
def dft(input, dft_length=None, axis=None, *, inverse: int = 0, onesided: int = 0):
    """(Inverse) discrete Fourier transform along ``axis`` (default -2, a signal axis of input).

    onesided forward keeps the n//2+1 unique bins; onesided inverse is irfft to a real signal
    (trailing dim 1) of dft_length, by default 2*(bins-1)."""
    ax = -2 if axis is None else int(axis.reshape(-1)[0])
    ax = ax % input.dim()
    n: Optional[int] = int(dft_length.reshape(-1)[0]) if dft_length is not None else None
    z = _as_complex(input)
    if inverse and onesided:
        n = n if n is not None else 2 * (input.shape[ax] - 1)
        y = torch.fft.irfft(z, n=n, dim=ax).unsqueeze(-1)
    elif inverse:
        y = _as_pair(torch.fft.ifft(z, n=n, dim=ax))
    else:
        f = torch.fft.fft(z, n=n, dim=ax)
        if onesided:
            f = f.narrow(ax, 0, f.shape[ax] // 2 + 1)
        y = _as_pair(f)
    return y.to(input.dtype)


@op("STFT", kind="other")
def stft(signal, frame_step, window=None, frame_length=None, *, onesided: int = 1):
    """Short-time Fourier transform of (B, L, 1|2) -> (B, frames, bins, 2)."""
    step = int(frame_step.reshape(-1)[0])
    if frame_length is not None:
        n = int(frame_length.reshape(-1)[0])
    else:
        n = window.shape[0] if window is not None else signal.shape[-2]
    size = window.shape[0] if window is not None else n
    frames_count = 1 + (signal.shape[-2] - n) // step
    z = _as_complex(signal)  # (B, L)
    frames = z.unfold(-1, size, step)[..., :frames_count, :]  # (B, frames, size)
    if window is not None:
        frames = frames * window.to(z.real.dtype)
    f = torch.fft.fft(frames, n=n, dim=-1)
    if onesided:
        f = f[..., : n // 2 + 1]
    return _as_pair(f).to(signal.dtype)


def _window(size, periodic: int, output_datatype: int, coefs: tuple[float, ...]) -> torch.Tensor:
    """Generalized cosine window: sum_k (-1)^k a_k cos(2 pi k n / N), computed in fp64."""
    count = int(size.reshape(-1)[0])
    denom = count if periodic else count - 1
    n = torch.arange(count, dtype=torch.float64, device=size.device)
    w = torch.zeros_like(n)
    for k, a in enumerate(coefs):
        w = w + ((-1) ** k) * a * torch.cos(2 * math.pi * k * n / denom)
    return w.to(to_torch(ONNX_TO_DTYPE[output_datatype]))


@op("HannWindow", kind="other")
def hann_window(size, *, output_datatype: int = 1, periodic: int = 1):
    return _window(size, periodic, output_datatype, (0.5, 0.5))


@op("HammingWindow", kind="other")
def hamming_window(size, *, output_datatype: int = 1, periodic: int = 1):
    alpha = 25.0 / 46.0
    return _window(size, periodic, output_datatype, (alpha, 1.0 - alpha))


@op("BlackmanWindow", kind="other")
def blackman_window(size, *, output_datatype: int = 1, periodic: int = 1):
    return _window(size, periodic, output_datatype, (0.42, 0.5, 0.08))


@op("MelWeightMatrix", kind="other")
def mel_weight_matrix(num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz, *,
                      output_datatype: int = 1):
    """(dft_length//2+1, num_mel_bins) triangular filters, equally spaced on the mel scale."""
    mels = int(num_mel_bins.reshape(-1)[0])
    n_dft = int(dft_length.reshape(-1)[0])
    rate = int(sample_rate.reshape(-1)[0])
    lo, hi = float(lower_edge_hertz.reshape(-1)[0]), float(upper_edge_hertz.reshape(-1)[0])

    def to_mel(hz: float) -> float:
        return 2595 * math.log1p(hz / 700) / math.log(10)

    lo_mel, hi_mel = to_mel(lo), to_mel(hi)
    step = (hi_mel - lo_mel) / (mels + 2)  # as the ONNX reference divides (by the number of edges)
    edges = []
    for i in range(mels + 2):
        hz = 700 * math.expm1((i * step + lo_mel) / 2595 * math.log(10))
        edges.append(int(((n_dft + 1) * hz) // rate))
    out = torch.zeros(n_dft // 2 + 1, mels, dtype=torch.float64)
    for i in range(mels):
        left, center, right = edges[i], edges[i + 1], edges[i + 2]
        if center == left:
            out[center, i] = 1
        else:
            for j in range(left, center + 1):
                out[j, i] = (j - left) / (center - left)
        for j in range(center, right):
            out[j, i] = (right - j) / (right - center)
    return out.to(device=num_mel_bins.device, dtype=to_torch(ONNX_TO_DTYPE[output_datatype]))
