"""Random ops and Dropout.

A ``seed`` attribute makes an op reproducible: it seeds a private generator for that call, so the
same node gives the same numbers on every run. Without a seed the global torch generator is used.
"""
from __future__ import annotations

from typing import Optional

import torch

from .registry import op
from .shape import onnx_dtype
from .torch_types import to_torch


def _generator(seed: Optional[float], device: torch.device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _uniform(shape, dtype: torch.dtype, low: float, high: float, seed, device) -> torch.Tensor:
    r = torch.rand(tuple(shape), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                   device=device, generator=_generator(seed, device))
    return (r * (high - low) + low).to(dtype)


def _normal(shape, dtype: torch.dtype, mean: float, scale: float, seed, device) -> torch.Tensor:
    r = torch.randn(tuple(shape), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                    device=device, generator=_generator(seed, device))
    return (r * scale + mean).to(dtype)


@op("RandomUniform", kind="other")
def random_uniform(*, shape: list[int], dtype: int = 1, high: float = 1.0, low: float = 0.0,
                   seed: Optional[float] = None):
    return _uniform(shape, onnx_dtype(dtype), low, high, seed, torch.device("cpu"))


@op("RandomNormal", kind="other")
def random_normal(*, shape: list[int], dtype: int = 1, mean: float = 0.0, scale: float = 1.0,
                  seed: Optional[float] = None):
    return _normal(shape, onnx_dtype(dtype), mean, scale, seed, torch.device("cpu"))


@op("RandomUniformLike", kind="other")
def random_uniform_like(input, *, dtype: Optional[int] = None, high: float = 1.0, low: float = 0.0,
                        seed: Optional[float] = None):
    dt = onnx_dtype(dtype) if dtype is not None else input.dtype
    return _uniform(input.shape, dt, low, high, seed, input.device)


@op("RandomNormalLike", kind="other")
def random_normal_like(input, *, dtype: Optional[int] = None, mean: float = 0.0, scale: float = 1.0,
                       seed: Optional[float] = None):
    dt = onnx_dtype(dtype) if dtype is not None else input.dtype
    return _normal(input.shape, dt, mean, scale, seed, input.device)


@op("Bernoulli", kind="other")
def bernoulli(input, *, dtype: Optional[int] = None, seed: Optional[float] = None):
    dt = onnx_dtype(dtype) if dtype is not None else input.dtype
    p = input.to(torch.float64 if input.dtype == torch.float64 else torch.float32)
    return torch.bernoulli(p, generator=_generator(seed, input.device)).to(dt)


@op("Dropout", kind="pointwise")
def dropout(data, ratio=None, training_mode=None, *, seed: Optional[int] = None, ctx):
    training = training_mode is not None and bool(training_mode.reshape(()).item())
    r = float(ratio.reshape(()).item()) if ratio is not None else 0.5
    if not training or r == 0.0:
        out, mask = data, torch.ones(data.shape, dtype=torch.bool, device=data.device)
    else:
        keep = _uniform(data.shape, torch.float32, 0.0, 1.0, seed, data.device) >= r
        out = torch.where(keep, data * (1.0 / (1.0 - r)), torch.zeros((), dtype=data.dtype, device=data.device))
        out, mask = out.to(data.dtype), keep
    if ctx.num_outputs < 2:
        return out
    mask_dtype = ctx.output_dtypes[1] if len(ctx.output_dtypes) > 1 else None
    if mask_dtype is not None and to_torch(mask_dtype) != torch.bool:  # opsets < 10 typed the mask like data
        mask = mask.to(to_torch(mask_dtype))
    return out, mask
