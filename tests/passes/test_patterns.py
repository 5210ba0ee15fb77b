"""Pattern recognition on what exporters emit: norms, activations, softmax."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from .helpers import export, ops, optimized


class DecomposedLayerNorm(nn.Module):
    def __init__(self, h=16):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(h)), nn.Parameter(torch.randn(h))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.w + self.b


class LlamaRMSNorm(nn.Module):
    def __init__(self, h=16):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(h))

    def forward(self, x):
        x32 = x.to(torch.float32)
        var = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(var + 1e-6)).to(x.dtype)


class NewGelu(nn.Module):  # GPT-2's gelu_new
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class ErfGelu(nn.Module):
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _manual_softmax(x):
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("module, op", [
    (DecomposedLayerNorm(), "LayerNormalization"),
    (nn.LayerNorm(16), "LayerNormalization"),
    (LlamaRMSNorm(), "RMSNormalization"),
    (NewGelu(), "Gelu"),
    (ErfGelu(), "Gelu"),
    (Fn(nn.functional.gelu), "Gelu"),
    (Fn(lambda x: x * torch.sigmoid(x)), "Swish"),
    (Fn(nn.functional.silu), "Swish"),
    (Fn(lambda x: x * nn.functional.relu6(x + 3) / 6), "HardSwish"),
    (Fn(lambda x: nn.functional.relu6(x + 3) / 6), "HardSigmoid"),
    (Fn(nn.functional.hardswish), "HardSwish"),
    (Fn(_manual_softmax), "Softmax"),
], ids=["layernorm-decomposed", "layernorm", "rmsnorm-llama", "gelu-tanh", "gelu-erf", "gelu-torch", "silu-manual",
        "silu", "hardswish-manual", "hardsigmoid-manual", "hardswish", "softmax-manual"])
def test_recognized_as_one_op(module, op):
    g = optimized(export(module, torch.randn(2, 5, 16), dynamic={"x0": {0: "batch"}}), level=2)
    assert ops(g) == [op], ops(g)


def test_norm_with_affine_stays_one_op_and_keeps_symbolic_dims():
    g = optimized(export(DecomposedLayerNorm(), torch.randn(2, 5, 16), dynamic={"x0": {0: "batch", 1: "seq"}}),
                  level=3)
    assert ops(g) == ["LayerNormalization"]
    assert [str(d) for d in g.outputs[0].shape] == ["batch", "seq", "16"]


def test_unrelated_mul_is_not_gelu():
    g = optimized(export(Fn(lambda x: 0.5 * x * (1.0 + torch.erf(x / 3.0))), torch.randn(4, 8)), level=2)
    assert "Gelu" not in ops(g)
