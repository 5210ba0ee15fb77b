"""Vendor tactics compute the same function as the ops' reference implementations.

The tactics call torch APIs that also run on CPU, so their math is checked here; on a GPU the
same tests run through cuDNN/cuBLAS/flash kernels (tests/cuda).
"""
from __future__ import annotations

import pytest
import torch

from ember.kernels.vendor import cublas_linear, sdpa_attention
from ember.ops import get


@pytest.mark.parametrize("heads, kv_heads, mask, causal", [
    (4, 4, "bool", 0), (8, 2, "float", 0), (4, 4, None, 1), (4, 1, None, 0)])
def test_sdpa_matches_reference_attention(heads, kv_heads, mask, causal):
    g = torch.Generator().manual_seed(0)
    b, s, d = 2, 16, 8
    q = torch.randn(b, heads, s, d, generator=g)
    k = torch.randn(b, kv_heads, s, d, generator=g)
    v = torch.randn(b, kv_heads, s, d, generator=g)
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, s, s, generator=g) > 0.3
        m[..., 0] = True  # no fully masked row
    elif mask == "float":
        m = torch.randn(1, 1, s, s, generator=g)
    ref = get("Attention").fn(q, k, v, m, is_causal=causal)[0]
    got = sdpa_attention([q, k, v, m], {"is_causal": causal}, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sdpa_three_d_inputs():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 16, generator=g), torch.randn(2, 16, 16, generator=g)
    ref = get("Attention").fn(q, k, v, q_num_heads=4, kv_num_heads=2)[0]
    got = sdpa_attention([q, k, v], {"q_num_heads": 4, "kv_num_heads": 2}, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act, trans_b, residual, after", [("", 0, False, 0), ("Relu", 1, True, 0),
                                                          ("Gelu", 0, False, 0), ("Relu", 0, True, 1)])
def test_linear_matches_fused_gemm(act, trans_b, residual, after):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 5, 16, generator=g)
    w = torch.randn(8, 16, generator=g) if trans_b else torch.randn(16, 8, generator=g)
    bias = torch.randn(8, generator=g)
    r = torch.randn(3, 5, 8, generator=g) if residual else None
    attrs = {"trans_b": trans_b, "activation": act, "act_after_residual": after}
    ref = get("ember.Gemm").fn(a, w, bias, r, **attrs)
    w_nk = (w if trans_b else w.t()).contiguous()
    got = cublas_linear([a, w_nk, bias, r], attrs, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sdpa_falls_back_to_reference_when_shapes_do_not_fit():
    """Causal attention with different query and key lengths: ONNX aligns the frontier differently."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    ref = get("Attention").fn(q, k, v, is_causal=1)[0]
    got = sdpa_attention([q, k, v], {"is_causal": 1}, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_low_precision_gelu_epilogue_is_close_to_exact_gelu():
    """fp16/bf16 engines fold GELU into the GEMM epilogue (tanh form): within storage precision."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    w = (torch.randn(32, 16, generator=g) / 6).to(torch.bfloat16)
    bias = torch.randn(16, generator=g).to(torch.bfloat16)
    attrs = {"activation": "Gelu"}
    exact = get("ember.Gemm").fn(a.float(), w.float(), bias.float(), **attrs)
    got = cublas_linear([a, w.t().contiguous(), bias], attrs, None).float()
    assert float((got - exact).norm() / exact.norm()) < 1e-2
