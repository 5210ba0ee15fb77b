"""RoPE fused into the QKV projection's output: one program per (token, head) reads its head of the fused
QKV row, rotates query and key heads (transformers' rotate_half pairing: element i with i + D/2) with the
cos/sin of the token's position, writes the query head out and the key and value heads straight into
their slot of the paged KV cache (the store of K and V needs no pass of its own)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qkv_rope_cache(qkv_ptr, pos_ptr, rope_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, row_stride, H, KVH,
                    HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    m = d < HALF
    src = qkv_ptr + t * row_stride + h * (2 * HALF)
    if h < H + KVH:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        c = tl.load(rope_ptr + pos * (2 * HALF) + d, mask=m, other=0.0)
        s = tl.load(rope_ptr + pos * (2 * HALF) + HALF + d, mask=m, other=0.0)
        x1 = tl.load(src + d, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + d, mask=m, other=0.0).to(tl.float32)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        if h < H:
            dst = q_ptr + (t * H + h) * (2 * HALF)
        else:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            dst = k_ptr + (slot * KVH + (h - H)) * (2 * HALF)
        tl.store(dst + d, o1.to(dst.dtype.element_ty), mask=m)
        tl.store(dst + HALF + d, o2.to(dst.dtype.element_ty), mask=m)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        dst = v_ptr + (slot * KVH + (h - H - KVH)) * (2 * HALF)
        tl.store(dst + d, tl.load(src + d, mask=m, other=0.0), mask=m)
        tl.store(dst + HALF + d, tl.load(src + HALF + d, mask=m, other=0.0), mask=m)


def qkv_rope_cache(qkv: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, slots: torch.Tensor,
                   k_pool: torch.Tensor, v_pool: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int) -> torch.Tensor:
    """q [T, H, D]; the rotated keys and the values written at ``slots`` of one layer's pools."""
    qkv = qkv.contiguous()
    T = qkv.shape[0]
    q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if T:
        half = head_dim // 2
        _qkv_rope_cache[(T, num_heads + 2 * num_kv_heads)](
            qkv, positions, rope, slots, q, k_pool, v_pool, qkv.shape[1], num_heads, num_kv_heads, HALF=half,
            BLOCK=triton.next_power_of_2(half), num_warps=1)
    return q
