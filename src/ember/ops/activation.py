"""Activations and the softmax family. Half-precision inputs are computed in fp32 and rounded once."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .elementwise import float_math, signed_unary
from .infer import same_as_input
from .lowering import Builder, Operand, fnum, need, template
from .registry import Epilogue, op, shape_rule


def _in_float(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return float_math(fn)(x)


def _alpha(code: int, default: float) -> Callable[[dict], tuple[int, float, float]]:
    """Epilogue parameters of an activation with one ``alpha`` attribute."""
    return lambda a: (code, float(a.get("alpha", default)), 0.0)


def _softplus_text(x: str) -> str:
    return f"tl.where({x} > 20.0, {x}, tm.log1p(tl.exp({x})))"  # torch's threshold of 20


@op("Relu", kind="pointwise", triton=signed_unary,
    epilogue=Epilogue(1, torch=lambda y, a: torch.relu_(y), vendor_conv=True))
def relu(x):
    return torch.relu(x) if x.dtype != torch.int8 else torch.clamp(x, min=0)


@op("LeakyRelu", kind="pointwise",
    triton=template(lambda a: "tl.where({0} >= 0.0, {0}, {0} * " + fnum(a.get("alpha", 0.01)) + ")"),
    epilogue=Epilogue(6, ("alpha",), params=_alpha(6, 0.01), vendor_conv=True))
def leaky_relu(x, *, alpha: float = 0.01):
    return _in_float(x, lambda v: torch.where(v >= 0, v, v * alpha))


@op("PRelu", kind="pointwise", triton="tl.where({0} < 0.0, {0} * {1}, {0})")
def prelu(x, slope):
    """slope broadcasts to x (unidirectionally)."""
    return torch.where(x < 0, x * slope.to(x.dtype), x)


@op("Elu", kind="pointwise",
    triton=template(lambda a: "tl.where({0} > 0.0, {0}, " + fnum(a.get("alpha", 1.0)) + " * tm.expm1({0}))"),
    epilogue=Epilogue(10, ("alpha",), params=_alpha(10, 1.0)))
def elu(x, *, alpha: float = 1.0):
    return _in_float(x, lambda v: torch.where(v > 0, v, alpha * torch.expm1(v)))


def _celu_text(a: dict) -> str:
    alpha = fnum(a.get("alpha", 1.0))
    return "(tl.maximum({0}, 0.0) + tl.minimum(" + alpha + " * tm.expm1({0} / " + alpha + "), 0.0))"


@op("Celu", kind="pointwise", triton=template(_celu_text))
def celu(x, *, alpha: float = 1.0):
    return _in_float(x, lambda v: torch.clamp(v, min=0) + torch.clamp(alpha * torch.expm1(v / alpha), max=0))


def _selu_text(a: dict) -> str:
    alpha = fnum(a.get("alpha", 1.67326319217681884765625))
    gamma = fnum(a.get("gamma", 1.05070102214813232421875))
    return "(" + gamma + " * tl.where({0} > 0.0, {0}, " + alpha + " * tm.expm1({0})))"


@op("Selu", kind="pointwise", triton=template(_selu_text))
def selu(x, *, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875):
    return _in_float(x, lambda v: gamma * torch.where(v > 0, v, alpha * torch.expm1(v)))


@op("HardSigmoid", kind="pointwise",
    triton=template(lambda a: "tl.minimum(tl.maximum(" + fnum(a.get("alpha", 0.2)) + " * {0} + "
                    + fnum(a.get("beta", 0.5)) + ", 0.0), 1.0)"),
    epilogue=Epilogue(9, ("alpha", "beta"),
                      params=lambda a: (9, float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))))
def hard_sigmoid(x, *, alpha: float = 0.2, beta: float = 0.5):
    return _in_float(x, lambda v: torch.clamp(alpha * v + beta, 0.0, 1.0))


@op("HardSwish", kind="pointwise", triton="({0} * tl.minimum(tl.maximum({0} / 6.0 + 0.5, 0.0), 1.0))",
    epilogue=Epilogue(8, vendor_conv=True))
def hard_swish(x):
    return _in_float(x, lambda v: v * torch.clamp(v / 6.0 + 0.5, 0.0, 1.0))


@op("Softplus", kind="pointwise", triton=_softplus_text("{0}"), epilogue=Epilogue(12))
def softplus(x):
    return _in_float(x, lambda v: F.softplus(v, beta=1.0, threshold=20.0))


@op("Softsign", kind="pointwise", triton="({0} / (1.0 + tl.abs({0})))")
def softsign(x):
    return _in_float(x, lambda v: v / (1 + v.abs()))


@op("Mish", kind="pointwise", triton="({0} * tm.tanh(" + _softplus_text("{0}") + "))", epilogue=Epilogue(13))
def mish(x):
    return _in_float(x, lambda v: v * torch.tanh(F.softplus(v)))


def _swish_text(a: dict) -> str:
    alpha = float(a.get("alpha", 1.0))
    return "({0} * tl.sigmoid({0}))" if alpha == 1.0 else "({0} * tl.sigmoid(" + fnum(alpha) + " * {0}))"


def _silu(y: torch.Tensor, a: dict) -> "torch.Tensor | None":
    return F.silu(y, inplace=True) if a.get("alpha", 1.0) == 1.0 else None


@op("Swish", kind="pointwise", triton=template(_swish_text),
    epilogue=Epilogue(7, ("alpha",), params=_alpha(7, 1.0), torch=_silu, vendor_conv=True))
def swish(x, *, alpha: float = 1.0):
    return _in_float(x, lambda v: v * torch.sigmoid(alpha * v))


def _swiglu_text(a: dict) -> str:
    alpha = float(a.get("alpha", 1.0))
    s = "{0}" if alpha == 1.0 else fnum(alpha) + " * {0}"
    return "({0} * tl.sigmoid(" + s + ") * {1})"


@op("SwiGLU", kind="pointwise", triton=template(_swiglu_text))
def swiglu(a, b, *, alpha: float = 1.0):
    """Swish_alpha(a) * b; a and b have one shape (no broadcasting)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        af = a.float()
        return ((af * torch.sigmoid(alpha * af)) * b.float()).to(a.dtype)
    return a * torch.sigmoid(alpha * a) * b


def _gelu_text(a: dict) -> str:
    if a.get("approximate", "none") == "tanh":
        # 0.5 (1 + tanh u) = sigmoid(2u): the same function without 1 + tanh's cancellation for x << 0
        return "({0} * tl.sigmoid(1.5957691216057308 * ({0} + 0.044715 * {0} * {0} * {0})))"
    return "(0.5 * {0} * (1.0 + tl.erf({0} * 0.7071067811865476)))"


def _gelu_params(a: dict) -> tuple[int, float, float]:
    approx = a.get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise ValueError(f"Gelu approximate={approx!r}")
    return (3 if approx == "tanh" else 2), 0.0, 0.0


@op("Gelu", kind="pointwise", triton=template(_gelu_text),
    epilogue=Epilogue(2, ("approximate",), params=_gelu_params, vendor_conv=True,
                      torch=lambda y, a: F.gelu(y, approximate="tanh" if a.get("approximate") == "tanh" else "none")))
def gelu(x, *, approximate: str = "none"):
    return _in_float(x, lambda v: F.gelu(v, approximate="tanh" if approximate == "tanh" else "none"))


@op("ThresholdedRelu", kind="pointwise",
    triton=template(lambda a: "tl.where({0} > " + fnum(a.get("alpha", 1.0)) + ", {0}, 0.0)"))
def thresholded_relu(x, *, alpha: float = 1.0):
    return torch.where(x > alpha, x, torch.zeros_like(x))


def _shrink_text(a: dict) -> str:
    lam, bias = fnum(a.get("lambd", 0.5)), fnum(a.get("bias", 0.0))
    return "tl.where({0} < -" + lam + ", {0} + " + bias + ", tl.where({0} > " + lam + ", {0} - " + bias + ", 0.0))"


@op("Shrink", kind="pointwise", triton=template(_shrink_text))
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


def softmax_rows(b: Builder, node, args: list) -> Operand:
    """Softmax, LogSoftmax and ReduceLogSumExp over a row: max, exp, sum (the fused row kernels)."""
    x = args[0]
    need(node, [a for a in args if a is not None], "f")
    m = b.reduce("max", x)
    e = b.fmt("tl.exp({0} - {1})", "f", x, m)
    s = b.reduce("sum", e)
    if node.op == "Softmax":
        inv = b.fmt("(1.0 / {0})", "f", s)
        return b.fmt("({0} * {1})", "f", e, inv)
    lse = b.fmt("({0} + tl.log({1}))", "f", m, s)
    return lse if node.op == "ReduceLogSumExp" else b.fmt("({0} - {1})", "f", x, lse)


@op("Softmax", kind="reduction", triton=softmax_rows, low_precision="all")
def softmax(x, *, axis: int = -1):
    return _softmax_like(x, axis, lambda v, a: torch.softmax(v, a))


@op("LogSoftmax", kind="reduction", triton=softmax_rows, low_precision="all")
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
