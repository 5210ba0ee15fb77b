"""Attention over the paged KV cache, in plain torch: the CPU path and the reference the Triton kernels are
tested against.

Every sequence of a step attends to its whole context (cached tokens and this step's), read through its
block table: the step's own keys and values are written into the pool first, so a fresh prompt, a chunk
of a long prompt, a prompt whose prefix came from the prefix cache, and a decode token are one case.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .kv_cache import BLOCK_SIZE, blocks_needed


@dataclass
class StepInputs:
    """One model step over a batch of sequences. Device tensors are the step's inputs (they are what a
    captured CUDA graph reads); the host lists plan the CPU path without reading the device.

    tokens, positions, slots: [T] int64, the step's tokens (sequences concatenated), their positions and
    their KV slots. block_tables: [B, W] int32. seq_lens: [B] int32, context length after this step.
    query_starts: [B + 1] int32, where each sequence's tokens start in ``tokens``. logit_rows: [R] int64,
    the token rows whose next-token logits are wanted. prefill_tiles: [2, N] int32, the query tiles of the
    prefill attention kernel (prefill_tiles()), made with the other inputs so the kernel reads them from
    the device without a copy per layer. padded: the inputs of a captured graph's bucket (graphs.py): the
    host lists are placeholders, lengths come from the device tensors only (bounded by context_bound),
    and token rows past ``query_starts[-1]`` belong to no sequence."""

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_starts: torch.Tensor
    logit_rows: torch.Tensor
    q_lens: list[int]
    seq_lens_host: list[int]
    context_bound: int = 0  # a bound on every context length when the host lengths are not the real ones (graphs)
    prefill_tiles: Optional[torch.Tensor] = None
    padded: bool = False

    @property
    def max_seq_len(self) -> int:
        return self.context_bound or max(self.seq_lens_host, default=0)

    @property
    def decode_only(self) -> bool:
        return all(q == 1 for q in self.q_lens)

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)


PREFILL_TILE = 64  # query rows per program of the prefill attention kernel
TILE_NONE = 1 << 30  # the first row of a padding tile: past every sequence's queries, so it does nothing


def prefill_tiles(q_lens: list[int], capacity: int = 0) -> torch.Tensor:
    """[2, max(N, capacity)] int32 on the host: (sequence, first query row) of each PREFILL_TILE-row tile of
    the step's queries; padding tiles (up to ``capacity``) are (0, TILE_NONE)."""
    seqs: list[int] = []
    rows: list[int] = []
    for i, ql in enumerate(q_lens):
        for r in range(0, ql, PREFILL_TILE):
            seqs.append(i)
            rows.append(r)
    pad = max(capacity - len(seqs), 0)
    return torch.tensor([seqs + [0] * pad, rows + [TILE_NONE] * pad], dtype=torch.int32)


def tile_capacity(tokens: int, seqs: int) -> int:
    """The most tiles a step of ``tokens`` tokens over ``seqs`` sequences can have."""
    return -(-tokens // PREFILL_TILE) + seqs


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store the step's keys and values ([T, kv_heads, head_dim]) at their slots of one layer's pools."""
    kvh, d = k.shape[1], k.shape[2]
    k_pool.view(-1, kvh, d).index_copy_(0, slots, k)
    v_pool.view(-1, kvh, d).index_copy_(0, slots, v)


def _context(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, kv_heads, head_dim]: a sequence's cached entries in order."""
    blocks = pool[table[: blocks_needed(length)].long()]
    return blocks.reshape(-1, pool.shape[2], pool.shape[3])[:length]


def paged_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step: StepInputs,
                              scale: float, window: Optional[int] = None) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim]. Causal within each sequence; with ``window``, a
    query at position p sees keys at positions > p - window only (Mistral's sliding window)."""
    if step.decode_only:
        return _decode_batched(q, k_pool, v_pool, step, scale, window)
    if step.padded:
        return _prefill_batched(q, k_pool, v_pool, step, scale, window)
    out = torch.empty_like(q)
    start = 0
    for i, (ql, sl) in enumerate(zip(step.q_lens, step.seq_lens_host)):
        k = _context(k_pool, step.block_tables[i], sl)
        v = _context(v_pool, step.block_tables[i], sl)
        qi = q[start:start + ql].transpose(0, 1)[None]  # [1, heads, ql, d]
        ki, vi = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if window is None and ql == sl:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        elif window is None and ql == 1:
            o = F.scaled_dot_product_attention(qi, ki, vi, scale=scale, enable_gqa=True)
        else:
            qpos = torch.arange(sl - ql, sl, device=q.device)[:, None]
            kpos = torch.arange(sl, device=q.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + ql] = o[0].transpose(0, 1)
        start += ql
    return out


def _decode_batched(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step: StepInputs,
                    scale: float, window: Optional[int]) -> torch.Tensor:
    """One query per sequence: the contexts gathered into one padded batch, padding masked. Reads the
    lengths from the device tensor only (the host bound sizes the gather), so a graph can replay it."""
    B, H, D = q.shape
    kvh = k_pool.shape[2]
    nb = min(blocks_needed(step.max_seq_len), step.block_tables.shape[1])
    table = step.block_tables[:, :nb].long()
    k = k_pool[table].reshape(B, nb * BLOCK_SIZE, kvh, D)
    v = v_pool[table].reshape(B, nb * BLOCK_SIZE, kvh, D)
    qg = q.view(B, kvh, H // kvh, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qg.float(), k.float()) * scale
    kpos = torch.arange(nb * BLOCK_SIZE, device=q.device)[None, :]
    valid = kpos < step.seq_lens[:, None]
    if window is not None:
        valid &= kpos >= step.seq_lens[:, None] - window
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = torch.einsum("bkgl,blkd->bkgd", p, v.float())
    return o.reshape(B, H, D).to(q.dtype)


def _prefill_batched(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step: StepInputs,
                     scale: float, window: Optional[int]) -> torch.Tensor:
    """Any number of queries per sequence, reading the lengths from the device tensors only (the graphs'
    padded inputs): each token finds its sequence in ``query_starts`` and attends to that sequence's
    context gathered up to the host bound; rows past the last sequence's tokens are padding (zeros).
    Gathers [T, context, kv_heads, head_dim]: the CPU emulation of a graph on small models, not a fast path."""
    T, H, D = q.shape
    kvh = k_pool.shape[2]
    starts = step.query_starts.long()
    B = starts.shape[0] - 1
    out = torch.zeros_like(q)
    if T == 0 or B == 0:
        return out
    nb = min(blocks_needed(step.max_seq_len), step.block_tables.shape[1])
    L = nb * BLOCK_SIZE
    rows = torch.arange(T, device=q.device)
    seq = torch.searchsorted(starts[1:], rows, right=True).clamp_(max=B - 1)
    real = rows < starts[-1]
    qpos = step.seq_lens.long()[seq] - starts[1:][seq] + rows  # context length - (end - row)
    table = step.block_tables[seq, :nb].long()
    k = k_pool[table].reshape(T, L, kvh, D).float()
    v = v_pool[table].reshape(T, L, kvh, D).float()
    scores = torch.einsum("tkgd,tlkd->tkgl", q.view(T, kvh, H // kvh, D).float(), k) * scale
    kpos = torch.arange(L, device=q.device)[None, :]
    valid = (kpos <= qpos[:, None]) & real[:, None]
    if window is not None:
        valid &= kpos > qpos[:, None] - window
    valid[:, 0] |= ~real  # padding rows: one (ignored) key, so their softmax stays finite
    p = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    o = torch.einsum("tkgl,tlkd->tkgd", p, v).reshape(T, H, D).to(q.dtype)
    return torch.where(real[:, None, None], o, out)
