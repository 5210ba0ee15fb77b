"""Activations and the softmax family. Half-precision inputs are computed in fp32 and rounded once."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .elementwise import float_math
from .infer import same_as_input
from .registry import op, shape_rule


def _in_float(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return float_math(fn)(x)


@op("Relu", kind="pointwise")
def relu(x):
    return torch.relu(x) if x.dtype != torch.int8 else torch.clamp(x, min=0)


@op("LeakyRelu", kind="pointwise")
def leaky_relu(x, *, alpha: float = 0.01):
    return _in_float(x, lambda v: torch.where(v >= 0, v, v * alpha))


@op("PRelu", kind="pointwise")
def prelu(x, slope):
    """slope broadcasts to x (unidirectionally)."""
    return torch.where(x < 0, x * slope.to(x.dtype), x)


@op("Elu", kind="pointwise")
def elu(x, *, alpha: float = 1.0):
    return _in_float(x, lambda v: torch.where(v > 0, v, alpha * torch.expm1(v)))


@op("Celu", kind="pointwise")
def celu(x, *, alpha: float = 1.0):
    return _in_float(x, lambda v: torch.clamp(v, min=0) + torch.clamp(alpha * torch.expm1(v / alpha), max=0))


@op("Selu", kind="pointwise")
def selu(x, *, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875):
    return _in_float(x, lambda v: gamma * torch.where(v > 0, v, alpha * torch.expm1(v)))


@op("HardSigmoid", kind="pointwise")
def hard_sigmoid(x, *, alpha: float = 0.2, beta: float = 0.5):
    return _in_float(x, lambda v: torch.clamp(alpha * v + beta, 0.0, 1.0))


@op("HardSwish", kind="pointwise")
def hard_swish(x):
    return _in_float(x, lambda v: v * torch.clamp(v / 6.0 + 0.5, 0.0, 1.0))


@op("Softplus", kind="pointwise")
def softplus(x):
    return _in_float(x, lambda v: F.softplus(v, beta=1.0, threshold=20.0))


@op("Softsign", kind="pointwise")
def softsign(x):
    return _in_float(x, lambda v: v / (1 + v.abs()))


@op("Mish", kind="pointwise")
def mish(x):
    return _in_float(x, lambda v: v * torch.tanh(F.softplus(v)))


@op("Swish", kind="pointwise")
def swish(x, *, alpha: float = 1.0):
    return _in_float(x, lambda v: v * torch.sigmoid(alpha * v))


@op("SwiGLU", kind="pointwise")
def swiglu(a, b, *, alpha: float = 1.0):
    """Swish_alpha(a) * b; a and b have one shape (no broadcasting)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        af = a.float()
        return ((af * torch.sigmoid(alpha * af)) * b.float()).to(a.dtype)
    return a * torch.sigmoid(alpha * a) * b


@op("Gelu", kind="pointwise")
def gelu(x, *, approximate: str = "none"):
    return _in_float(x, lambda v: F.gelu(v, approximate="tanh" if approximate == "tanh" else "none"))


@op("ThresholdedRelu", kind="pointwise")
def thresholded_relu(x, *, alpha: float = 1.0):
    return torch.where(x > alpha, x, torch.zeros_like(x))


@op("Shrink", kind="pointwise")
def shrink(x, *, bias: float = 0.0, lambd: float = 0.5):
    def fn(v):
        return torch.where(v < -lambd, v + bias, torch.where(v > lambd, v - bias, torch.zeros_like(v)))
    return fn(x) if not x.is_floating_point() else _in_float(x, fn)


# -- softmax family (opset-13 semantics: one axis; older flatten-to-2D forms are converted) ---------
def _softmax_like(x: torch.Tensor, axis: int, fn) -> torch.Tensor:
    if x.dim() == 0:
        return fn(x.reshape(1), 0).reshape(())
    if x.numel() == 0:
        return x.clone()
    if x.dtype in (torch.float16, torch.bfloat16):
        return fn(x.float(), axis).to(x.dtype)
    return fn(x, axis)


@op("Softmax", kind="reduction")
def softmax(x, *, axis: int = -1):
    return _softmax_like(x, axis, lambda v, a: torch.softmax(v, a))


@op("LogSoftmax", kind="reduction")
def log_softmax(x, *, axis: int = -1):
    return _softmax_like(x, axis, lambda v, a: torch.log_softmax(v, a))


@op("Hardmax", kind="reduction")
def hardmax(x, *, axis: int = -1):
    """1 at the first maximum along axis, 0 elsewhere."""
    if x.numel() == 0:
        return x.clone()
    axis = axis % x.dim()
    idx = torch.argmax(x, dim=axis, keepdim=True)
    return torch.zeros_like(x).scatter_(axis, idx, torch.ones_like(idx, dtype=x.dtype))


for _name in ("Relu", "LeakyRelu", "PRelu", "Elu", "Celu", "Selu", "HardSigmoid", "HardSwish", "Softplus",
              "Softsign", "Mish", "Swish", "SwiGLU", "Gelu", "ThresholdedRelu", "Shrink", "Softmax",
              "LogSoftmax", "Hardmax"):
    shape_rule(_name)(same_as_input(0))
