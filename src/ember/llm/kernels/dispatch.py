"""Kernel choice: Triton on CUDA tensors (when Triton is importable and not switched off), the torch
reference otherwise. The model calls these functions only, so CPU runs never touch Triton."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..attention import StepInputs
    from ..quant import LinearWeights

_FORCE = os.environ.get("EMBER_LLM_TRITON", "").lower()  # "0": torch path everywhere; "interpret": tests


@lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    if _FORCE == "0" or not _triton_available():
        return False
    return x.is_cuda or _FORCE == "interpret"


# -- the fused ops -------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); without a residual, (norm(x) * weight, x)."""
    if use_triton(x):
        from .norm import fused_add_rms_norm

        return fused_add_rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, from the fused projection's output [T, 2 * inter]."""
    if use_triton(gate_up):
        from .swiglu import swiglu as triton_swiglu

        return triton_swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def qkv_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor,
                   k_pool: torch.Tensor, v_pool: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int) -> torch.Tensor:
    """From the fused QKV projection [T, (H + 2 KVH) * D]: q [T, H, D] with RoPE applied at ``positions``
    (``rope``: [max_pos, 2, D / 2] cos/sin, fp32); k (with RoPE) and v written at ``slots`` of the pools."""
    if use_triton(qkv):
        from .rope import qkv_rope_cache as triton_qkv_rope_cache

        return triton_qkv_rope_cache(qkv, positions, rope, slots, k_pool, v_pool, num_heads, num_kv_heads, head_dim)
    from ..attention import write_kv
    from ..rope import apply_rope

    T = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    cs = rope[positions]
    cos, sin = cs[:, 0], cs[:, 1]
    q = apply_rope(q.reshape(T, num_heads, head_dim), cos, sin)
    k = apply_rope(k.reshape(T, num_kv_heads, head_dim), cos, sin)
    write_kv(k_pool, v_pool, k, v.reshape(T, num_kv_heads, head_dim), slots)
    return q


def attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step: "StepInputs", scale: float,
              window: Optional[int]) -> torch.Tensor:
    if use_triton(q):
        from .paged_attention import paged_attention

        return paged_attention(q, k_pool, v_pool, step, scale, window)
    from ..attention import paged_attention_reference

    return paged_attention_reference(q, k_pool, v_pool, step, scale, window)


def weight_only_linear(x: torch.Tensor, layer: "LinearWeights") -> torch.Tensor:
    from .weight_only import weight_only_matmul

    return weight_only_matmul(x, layer.weight, layer.scale)
