"""Random ops and Dropout.

With a ``seed`` attribute the numbers come from numpy's ``RandomState(seed)`` (MT19937), drawn the
way the ONNX reference implementation draws them: a seeded node gives the same numbers on every
run and device, and the same numbers as the reference. Seeded draws are made on the host (these
ops are rare at inference and run once per call). Without a seed the device's torch generator is
used, which is fast and not reproducible, as ONNX allows.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .registry import op
from .shape import onnx_dtype
from .torch_types import to_torch


def _draw(kind: str, shape, seed: Optional[float], device: torch.device, wide: bool) -> torch.Tensor:
    """Standard uniform [0, 1) or normal samples, float64 if ``wide`` else float32."""
    shape = tuple(int(d) for d in shape)
    dtype = torch.float64 if wide else torch.float32
    if seed is not None and not np.isnan(seed):
        state = np.random.RandomState(int(seed))
        a = state.rand(*shape) if kind == "uniform" else state.randn(*shape)
        return torch.from_numpy(np.asarray(a, dtype=np.float64)).to(device=device, dtype=dtype)
    if kind == "uniform":
        return torch.rand(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=device)


def _uniform(shape, dtype: torch.dtype, low: float, high: float, seed, device) -> torch.Tensor:
    r = _draw("uniform", shape, seed, device, dtype == torch.float64)
    return (r * (high - low) + low).to(dtype)


def _normal(shape, dtype: torch.dtype, mean: float, scale: float, seed, device) -> torch.Tensor:
    r = _draw("normal", shape, seed, device, dtype == torch.float64)
    return (r * scale + mean).to(dtype)


@op("RandomUniform", kind="other", random=True)
def random_uniform(*, shape: list[int], dtype: int = 1, high: float = 1.0, low: float = 0.0,
                   seed: Optional[float] = None):
    return _uniform(shape, onnx_dtype(dtype), low, high, seed, torch.device("cpu"))


@op("RandomNormal", kind="other", random=True)
def random_normal(*, shape: list[int], dtype: int = 1, mean: float = 0.0, scale: float = 1.0,
                  seed: Optional[float] = None):
    return _normal(shape, onnx_dtype(dtype), mean, scale, seed, torch.device("cpu"))


@op("RandomUniformLike", kind="other", random=True)
def random_uniform_like(input, *, dtype: Optional[int] = None, high: float = 1.0, low: float = 0.0,
                        seed: Optional[float] = None):
    dt = onnx_dtype(dtype) if dtype is not None else input.dtype
    return _uniform(input.shape, dt, low, high, seed, input.device)


@op("RandomNormalLike", kind="other", random=True)
def random_normal_like(input, *, dtype: Optional[int] = None, mean: float = 0.0, scale: float = 1.0,
                       seed: Optional[float] = None):
    dt = onnx_dtype(dtype) if dtype is not None else input.dtype
    return _normal(input.shape, dt, mean, scale, seed, input.device)


@op("Bernoulli", kind="other", random=True)
def bernoulli(input, *, dtype: Optional[int] = None, seed: Optional[float] = None):
    dt = onnx_dtype(dtype) if dtype is not None else input.dtype
    if seed is not None and not np.isnan(seed):
        p = input.detach().to(torch.float64).cpu().numpy()
        draws = np.random.RandomState(int(seed)).binomial(1, p=p)
        return torch.from_numpy(np.asarray(draws)).to(device=input.device, dtype=dt)
    p = input.to(torch.float64 if input.dtype == torch.float64 else torch.float32)
    return torch.bernoulli(p).to(dt)


@op("Dropout", kind="pointwise")
def dropout(data, ratio=None, training_mode=None, *, seed: Optional[int] = None, ctx):
    training = training_mode is not None and bool(training_mode.reshape(()).item())
    r = float(ratio.reshape(()).item()) if ratio is not None else 0.5
    if not training or r == 0.0:
        out, mask = data, torch.ones(data.shape, dtype=torch.bool, device=data.device)
    else:
        keep = _draw("uniform", data.shape, seed, data.device, wide=True) >= r
        scaled = data * (1.0 / (1.0 - r))
        out = torch.where(keep, scaled, torch.zeros((), dtype=data.dtype, device=data.device)).to(data.dtype)
        mask = keep
    if ctx.num_outputs < 2:
        return out
    mask_dtype = ctx.output_dtypes[1] if len(ctx.output_dtypes) > 1 else None
    if mask_dtype is not None and to_torch(mask_dtype) != torch.bool:  # opsets < 10 typed the mask like data
        mask = mask.to(to_torch(mask_dtype))
    return out, mask
