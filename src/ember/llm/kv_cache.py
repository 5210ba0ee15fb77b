"""The paged KV cache: pools of fixed-size blocks owned by the engine, and the block manager that hands
blocks to sequences, with prefix caching.

A pool holds, per layer, ``[num_blocks, BLOCK_SIZE, kv_heads, head_dim]`` keys and values. A sequence's
*block table* lists its blocks in order; token ``t`` of the sequence lives in slot
``table[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE``. Block tables are inputs of each model step;
the pools are state the model writes and reads through them.

Prefix caching (as vLLM's): a *full* block is named by a hash of its tokens and of the hash of the block
before it, so equal hashes mean equal prefixes. A freed full block keeps its hash and contents; it is
reused by the next sequence whose prefix hashes the same, until the allocator needs it for something
else (least recently freed first).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .config import ModelConfig

BLOCK_SIZE = 16


class KVCache:
    """The engine's KV pools: one allocation each for keys and values, all layers. One block more than the
    block manager hands out: the scratch block, where the padding rows of a captured decode graph write."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, dtype: torch.dtype, device: "torch.device | str"):
        shape = (cfg.num_layers, num_blocks + 1, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def blocks_needed(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def hash_block(parent: Optional[bytes], tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


@dataclass
class _Block:
    id: int
    refs: int = 0
    hash: Optional[bytes] = None  # set once the block is full and its contents are final


@dataclass
class BlockManager:
    """Allocation, reference counts and the prefix cache of one pool's blocks. Not thread-safe: the engine's
    step loop owns it."""

    num_blocks: int
    prefix_caching: bool = True
    blocks: list[_Block] = field(init=False)
    free: "OrderedDict[int, None]" = field(init=False)  # refs == 0, least recently freed first
    cached: dict[bytes, int] = field(init=False)  # hash -> block id, for full blocks (in use or free)
    hits: int = field(default=0, init=False)  # tokens served from the prefix cache
    queries: int = field(default=0, init=False)  # prompt tokens looked up

    def __post_init__(self) -> None:
        self.blocks = [_Block(i) for i in range(self.num_blocks)]
        self.free = OrderedDict((i, None) for i in range(self.num_blocks))
        self.cached = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def usage(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix of these full-block hashes (not yet taken)."""
        found = []
        if self.prefix_caching:
            for h in hashes:
                b = self.cached.get(h)
                if b is None:
                    break
                found.append(b)
        return found

    def take(self, block_ids: Sequence[int]) -> None:
        """Share blocks found by cached_prefix."""
        for b in block_ids:
            blk = self.blocks[b]
            if blk.refs == 0:
                del self.free[b]
            blk.refs += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"{n} KV blocks asked, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            blk = self.blocks[b]
            if blk.hash is not None:  # evict its cached contents
                if self.cached.get(blk.hash) == b:
                    del self.cached[blk.hash]
                blk.hash = None
            blk.refs = 1
            out.append(b)
        return out

    def seal(self, block_id: int, block_hash: bytes) -> None:
        """A block is full and final: make it findable by its prefix hash."""
        if not self.prefix_caching:
            return
        blk = self.blocks[block_id]
        if blk.hash is None and block_hash not in self.cached:
            blk.hash = block_hash
            self.cached[block_hash] = block_id

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. Freed blocks keep cached contents; the last blocks of the
        sequence go to the free list first, so shared prefixes are evicted last."""
        for b in reversed(block_ids):
            blk = self.blocks[b]
            blk.refs -= 1
            if blk.refs == 0:
                self.free[b] = None
                if blk.hash is None:
                    self.free.move_to_end(b, last=False)  # nothing cached: reuse it first

    def reset_prefix_cache(self) -> None:
        for h, b in list(self.cached.items()):
            if self.blocks[b].refs == 0:
                self.blocks[b].hash = None
                del self.cached[h]
