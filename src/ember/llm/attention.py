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
    the token rows whose next-token logits are wanted."""

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

    @property
    def max_seq_len(self) -> int:
        return self.context_bound or max(self.seq_lens_host, default=0)

    @property
    def decode_only(self) -> bool:
        return all(q == 1 for q in self.q_lens)

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)


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
