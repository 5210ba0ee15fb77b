"""Attention over the paged KV cache (block size 16), in Triton.

decode: one query token per sequence. A program takes one (sequence, KV head, split) and all the query
heads that share the KV head (GQA: their keys are read once), and walks its split of the context in
steps of BLOCK_N tokens, each step gathering its blocks through the block table, with an online softmax.
Long contexts are cut into splits of PART tokens that run in parallel (split-K, as vLLM's paged attention
v2 and flash-decoding); a second kernel merges the splits' partial results. The number of splits comes
from the host (the longest context the step can have), so a captured CUDA graph serves any lengths up
to it: splits past a sequence's end do nothing.

prefill: any number of query tokens per sequence (a prompt, a chunk of one, decode tokens mixed in).
A program takes BLOCK_M queries of one sequence and one head; the tiles (sequence, first query row) are
a step input made with the others (attention.prefill_tiles), so a captured graph replays them; a padding
tile's first row is past every sequence's queries and it does nothing. Keys are read through the block
table too, so cached prefixes and earlier chunks are attended to like the step's own tokens (written
into the cache before this kernel runs).

Both: causal, an optional sliding window (a query at position p sees keys at positions > p - window),
fp32 softmax and accumulation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import triton
import triton.language as tl

from ..attention import PREFILL_TILE

if TYPE_CHECKING:
    from ..attention import StepInputs

PART = 512  # context tokens per split of the decode kernel
KV_BLOCK = 16


@triton.jit
def _decode_split(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, m_ptr, l_ptr, scale, bt_stride, H, KVH, S, window,
                  G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PART_TOKENS: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    start = s * PART_TOKENS
    if window > 0:
        start = tl.maximum(start, seq_len - window)
    end = tl.minimum(s * PART_TOKENS + PART_TOKENS, seq_len)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < D
    heads = kvh * G + g
    q = tl.load(q_ptr + (b * H + heads)[:, None] * D + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        blk = tl.load(bt_ptr + b * bt_stride + offs // 16, mask=valid, other=0).to(tl.int64)
        row = (blk * 16 + offs % 16) * KVH + kvh
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + row[:, None] * D + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + row[:, None] * D + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    part = (b * H + heads) * S + s
    tl.store(o_ptr + part[:, None] * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
    tl.store(m_ptr + part, m_i, mask=gmask)
    tl.store(l_ptr + part, l_i, mask=gmask)


@triton.jit
def _decode_merge(o_ptr, m_ptr, l_ptr, out_ptr, S, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < S
    m = tl.load(m_ptr + bh * S + s, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + bh * S + s, mask=smask, other=0.0)
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top)
    o = tl.load(o_ptr + (bh * S + s)[:, None] * D + d[None, :], mask=smask[:, None] & (d < D)[None, :], other=0.0)
    total = tl.sum(w * l, axis=0)
    y = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + bh * D + d, y.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _prefill(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, qstart_ptr, lens_ptr, tile_seq_ptr, tile_row_ptr, scale, bt_stride,
             H, KVH, window, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    seq = tl.load(tile_seq_ptr + tile).to(tl.int64)
    m0 = tl.load(tile_row_ptr + tile)
    q0 = tl.load(qstart_ptr + seq).to(tl.int64)
    q_len = tl.load(qstart_ptr + seq + 1) - q0
    seq_len = tl.load(lens_ptr + seq)
    first_pos = seq_len - q_len  # position of the sequence's first query of this step
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < q_len
    qpos = first_pos + rows
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + ((q0 + rows) * H + h)[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.where(window > 0, tl.maximum(first_pos + m0 - window + 1, 0), 0)
    hi = tl.minimum(seq_len, first_pos + m0 + BLOCK_M)
    hi = tl.where(m0 < q_len, hi, lo)  # a padding tile (rows past the queries) reads nothing
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        kmask = offs < hi
        blk = tl.load(bt_ptr + seq * bt_stride + offs // 16, mask=kmask, other=0).to(tl.int64)
        row = (blk * 16 + offs % 16) * KVH + kvh
        k = tl.load(k_ptr + row[:, None] * D + d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_ptr + row[:, None] * D + d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        ok = kmask[None, :] & (offs[None, :] <= qpos[:, None])
        if window > 0:
            ok = ok & (offs[None, :] > qpos[:, None] - window)
        scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet (window, padding)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + ((q0 + rows) * H + h)[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, window: Optional[int], max_seq_len: int,
                           block_n: int = 64) -> torch.Tensor:
    """q: [B, H, D] -> [B, H, D]; ``max_seq_len`` (host) bounds the contexts and sets the number of splits."""
    B, H, D = q.shape
    KVH = k_pool.shape[2]
    G = H // KVH
    S = max(1, triton.cdiv(max_seq_len, PART))
    out = torch.empty_like(q)
    if B == 0:
        return out
    o = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    bd = max(16, triton.next_power_of_2(D))
    _decode_split[(B, KVH, S)](q.contiguous(), k_pool, v_pool, block_tables, seq_lens, o, m, lsum, scale,
                               block_tables.stride(0), H, KVH, S, window or 0, G=G,
                               BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, BLOCK_D=bd, BLOCK_N=block_n,
                               PART_TOKENS=PART, PRECISION=_precision(q.dtype), num_warps=4)
    _decode_merge[(B * H,)](o, m, lsum, out, S, D=D, BLOCK_S=max(2, triton.next_power_of_2(S)), BLOCK_D=bd,
                            num_warps=1)
    return out


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step: "StepInputs",
                            scale: float, window: Optional[int], block_m: int = PREFILL_TILE,
                            block_n: int = 64) -> torch.Tensor:
    """The query tiles come from ``step.prefill_tiles`` (made with the step's inputs, device-resident: no copy
    and no host work per layer, and a captured graph replays them); padding tiles do nothing, and with
    padded inputs the token rows no tile covers are zeros."""
    T, H, D = q.shape
    KVH = k_pool.shape[2]
    tiles = step.prefill_tiles
    if tiles is None or block_m != PREFILL_TILE:
        tiles = _tiles(step.q_lens, block_m).to(q.device)
    out = torch.zeros_like(q) if step.padded else torch.empty_like(q)
    n = tiles.shape[1]
    if n == 0 or T == 0:
        return out
    _prefill[(n, H)](q.contiguous(), k_pool, v_pool, out, step.block_tables, step.query_starts, step.seq_lens,
                     tiles[0], tiles[1], scale, step.block_tables.stride(0), H, KVH, window or 0, G=H // KVH,
                     D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=block_n,
                     PRECISION=_precision(q.dtype), num_warps=4)
    return out


def _tiles(q_lens: list[int], block_m: int) -> torch.Tensor:
    seqs = [i for i, ql in enumerate(q_lens) for _ in range(0, ql, block_m)]
    rows = [r for ql in q_lens for r in range(0, ql, block_m)]
    return torch.tensor([seqs, rows], dtype=torch.int32)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step: "StepInputs", scale: float,
                    window: Optional[int]) -> torch.Tensor:
    if step.decode_only:
        return paged_decode_attention(q, k_pool, v_pool, step.block_tables, step.seq_lens, scale, window,
                                      step.max_seq_len)
    return paged_prefill_attention(q, k_pool, v_pool, step, scale, window)
