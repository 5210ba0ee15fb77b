"""BatchNorm / scale folding, MatMul+Add -> GEMM, epilogues, parallel GEMM merging."""
from __future__ import annotations

import torch
from torch import nn

from .helpers import export, ops, optimized


def _bn(c):
    bn = nn.BatchNorm2d(c) if c > 0 else None
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


class ResBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


def test_resnet_block_folds_to_two_fused_convs():
    g = optimized(export(ResBlock(), torch.randn(1, 8, 6, 6), dynamic={"x0": {0: "n"}}), level=2)
    assert "BatchNormalization" not in ops(g)
    assert ops(g).count("ember.Conv") == 2
    first = g.nodes[0]
    assert first.attrs["activation"] == "Relu"
    # the second conv carries bias + residual; its final relu follows the residual add
    assert any(len(n.inputs) > 3 and n.inputs[3] is not None for n in g.nodes if n.op == "ember.Conv")


def test_conv_transpose_and_gemm_fold_batchnorm():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ct, self.bn = nn.ConvTranspose2d(4, 6, 3, stride=2), _bn(6)
            self.fc, self.bn1 = nn.Linear(6, 5), nn.BatchNorm1d(5)
            with torch.no_grad():
                self.bn1.running_var.uniform_(0.5, 2)
                self.bn1.running_mean.uniform_(-1, 1)

        def forward(self, x):
            h = self.bn(self.ct(x)).mean((2, 3))
            return self.bn1(self.fc(h))

    g = optimized(export(M(), torch.randn(2, 4, 5, 5)), level=2)
    assert "BatchNormalization" not in ops(g)
    assert "ConvTranspose" in ops(g) and "ember.Gemm" in ops(g)


def test_constant_scale_and_shift_fold_into_conv():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.s, self.t = torch.randn(1, 4, 1, 1), torch.randn(4, 1, 1)

        def forward(self, x):
            return self.conv(x) * self.s + self.t

    g = optimized(export(M(), torch.randn(1, 3, 4, 4)), level=2)
    assert ops(g) == ["Conv"]


def test_matmul_add_gelu_residual_is_one_gemm():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(nn.functional.gelu(self.fc1(x))) + x

    g = optimized(export(M(), torch.randn(2, 3, 8), dynamic={"x0": {0: "b", 1: "s"}}), level=2)
    assert ops(g) == ["ember.Gemm", "ember.Gemm"]
    assert g.nodes[0].attrs["activation"] == "Gelu"
    assert g.nodes[1].inputs[3] is g.inputs[0]  # residual


def test_parallel_gemms_merge_at_level_3():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.q(x) * self.k(x) + self.v(x).sum(-1, keepdim=True)

    m = export(M(), torch.randn(2, 3, 8))
    assert ops(optimized(m, level=2)).count("ember.Gemm") == 3
    g = optimized(m, level=3)
    assert ops(g).count("ember.Gemm") == 1 and "Split" in ops(g)
