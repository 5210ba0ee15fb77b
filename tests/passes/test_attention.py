"""Attention recognition in the shapes BERT, GPT-2 and Llama exports take."""
from __future__ import annotations

import math

import torch
from torch import nn

from .helpers import export, ops, optimized

B, S, H, D = 2, 5, 4, 8


def heads(x):
    return x.view(x.shape[0], x.shape[1], H, D).transpose(1, 2)


class BertSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(H * D, H * D) for _ in range(3))

    def forward(self, x, mask):
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        scores = scores + (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
        ctx = torch.matmul(scores.softmax(-1), v)
        return ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], H * D)


class Gpt2Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(H * D, 3 * H * D)
        self.register_buffer("bias", torch.tril(torch.ones(S, S, dtype=torch.bool)).view(1, 1, S, S))

    def forward(self, x):
        q, k, v = self.c_attn(x).split(H * D, dim=2)
        q, k, v = heads(q), heads(k), heads(v)
        w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], D ** 0.5)
        w = torch.where(self.bias, w, torch.full([], torch.finfo(w.dtype).min))
        return torch.matmul(nn.functional.softmax(w, dim=-1), v)


class SdpaAttention(nn.Module):
    def forward(self, q, k, v):
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)


def test_bert_attention():
    x, mask = torch.randn(B, S, H * D), torch.ones(B, S)
    mask[1, -2:] = 0
    g = optimized(export(BertSelfAttention(), x, mask), level=2)
    assert ops(g).count("Attention") == 1
    assert "Softmax" not in ops(g) and "MatMul" not in ops(g)


def test_gpt2_attention_with_where_mask():
    g = optimized(export(Gpt2Attention(), torch.randn(B, S, H * D)), level=2)
    assert ops(g).count("Attention") == 1 and "Softmax" not in ops(g)


def test_sdpa_decomposition_scales_both_sides():
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    g = optimized(export(SdpaAttention(), q, k, v, opset=18), level=2)
    assert ops(g).count("Attention") == 1 and "Softmax" not in ops(g)
