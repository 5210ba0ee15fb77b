"""Weight-only GEMM / GEMV: y = x W^T * scale, with W int8 (or fp8 e4m3) [N, K] and one fp32 scale per output
channel; x in fp16/bf16/fp32. W is read at one byte per weight and converted in registers, so a decode
step (M of 1 to a few dozen rows: a GEMV in all but name) reads half the bytes of fp16 weights.

Decode sizes (M <= 16 rows, tiles not given) go to the bandwidth-bound GEMV of ``w8_gemv.py`` (autotuned
per shape at engine load). The tiles below are the prefill path (and what M <= 16 used before).

Small M: narrow output tiles keep every SM busy; where a layer is too small even for that, the K dimension
is split across programs that add their partial sums into an fp32 buffer (split-K), scaled and cast
after. Large M: plain tiles. The tile sizes are chosen by rule (the decode shapes are few and known), not autotuned: an
autotuner cannot run inside CUDA-graph capture, and the interpreter cannot time anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from .w8_gemv import MAX_M, w8_gemv


@triton.jit
def _w8_matmul(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        kmask = kk < k_hi
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + kk[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + kk[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    out = rm.to(tl.int64)[:, None] * N + rn[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT == 1:
        scale = tl.load(s_ptr + rn, mask=nmask, other=0.0)
        tl.store(y_ptr + out, (acc * scale[None, :]).to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(y_ptr + out, acc, mask=omask)


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    split: int
    warps: int
    stages: int


@lru_cache(maxsize=None)
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_tiles(M: int, N: int, K: int, sms: int) -> Tiles:
    """Tiles by rule. Decode sizes (M <= 16) narrow the N tiles (64 down to 16 rows of W) until there are
    two programs per SM; split-K only when even then there is not one per SM (small layers), because its
    zeroing, atomics and final scaling are three more kernels per layer, which a decode step feels."""
    if M <= 16:
        bm, bn, bk, warps, stages = 16, 64, 256, 4, 4
        while bn > 16 and triton.cdiv(N, bn) < 2 * sms:
            bn //= 2
    elif M <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = 1
    while tiles * split < sms and K // (bk * split * 2) >= 2:
        split *= 2
    return Tiles(bm, bn, bk, split, warps, stages)


def weight_only_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, tiles: Optional[Tiles] = None,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ (w [N, K] * scale[N, None])^T (+ bias) -> [..., N] in x's dtype. Up to 16 rows (and no
    ``tiles`` asked for): the decode GEMV; otherwise the tiled kernel below."""
    if tiles is None and x.numel() // max(x.shape[-1], 1) <= MAX_M:
        return w8_gemv(x, w, scale, bias)
    y = _tiled(x, w, scale, tiles)
    return y if bias is None else y + bias


def _tiled(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, tiles: Optional[Tiles]) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    M, K = x2.shape
    N = w.shape[0]
    if tiles is None:
        sms = _sms(x.device.index or 0) if x.is_cuda else 4
        tiles = choose_tiles(M, N, K, sms)
    k_per = triton.cdiv(triton.cdiv(K, tiles.split), tiles.block_k) * tiles.block_k
    split = triton.cdiv(K, k_per)
    grid = (triton.cdiv(M, tiles.block_m), triton.cdiv(N, tiles.block_n), split)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    if split == 1:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        _w8_matmul[grid](x2, w, scale, y, M, N, K, k_per, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                         BLOCK_K=tiles.block_k, SPLIT=1, PRECISION=prec, num_warps=tiles.warps,
                         num_stages=tiles.stages)
    else:
        acc = torch.zeros(M, N, dtype=torch.float32, device=x.device)
        _w8_matmul[grid](x2, w, scale, acc, M, N, K, k_per, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                         BLOCK_K=tiles.block_k, SPLIT=split, PRECISION=prec, num_warps=tiles.warps,
                         num_stages=tiles.stages)
        y = (acc * scale[None, :]).to(x.dtype)
    return y.reshape(*shape[:-1], N)
