"""Continuous batching: which requests run in the next model step, and how many of their tokens.

Every step has a token budget. Running requests come first (a decoding request needs one token, a
request whose prompt is being prefilled in chunks takes what is left of the budget), then waiting requests
in arrival order, each taking its prompt (or a chunk of it) while the budget, the sequence limit and the
free KV blocks allow. Prefill and decode tokens share one step, so a long prompt never stalls the
requests that are decoding (chunked prefill).

When the KV pool runs out, the most recently arrived running request is *preempted by recompute*: its
blocks are freed and it goes back to the front of the waiting queue; when it runs again, its prompt and
the tokens it already produced are prefilled anew (with the prefix cache, mostly from cached blocks).
"""
from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import QueueFullError, RequestError
from .kv_cache import BLOCK_SIZE, BlockManager, blocks_needed, hash_block
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys and values are in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full, computed blocks
    cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    preemptions: int = 0
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    generator: Optional[torch.Generator] = None
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    logprobs: list = field(default_factory=list)
    state: Any = None  # the engine's per-request output state (detokenizer, stop-string window)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        return (self.prompt_ids[start:] if start < n else []) + self.output_ids[max(start - n, 0):stop - n]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class Scheduled:
    request: Request
    num_tokens: int  # computed in this step, from request.num_computed on

    @property
    def samples(self) -> bool:
        """The step reaches the end of the request's tokens: its next token is sampled."""
        return self.request.num_computed + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 max_waiting: int = 1024):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    # -- requests in and out ---------------------------------------------------------------------------------
    def check(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise RequestError("the prompt is empty: give at least one token")
        if prompt_len >= self.max_model_len:
            raise RequestError(f"the prompt has {prompt_len} tokens; this engine runs at most {self.max_model_len} "
                               "tokens per sequence (prompt and output), so the prompt must be shorter")
        if blocks_needed(prompt_len + 1) > self.blocks.num_blocks:
            raise RequestError(f"the prompt needs {blocks_needed(prompt_len + 1)} KV blocks; the cache has "
                               f"{self.blocks.num_blocks}")

    def add(self, req: Request) -> None:
        self.check(len(req.prompt_ids))
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting, the engine's limit; retry with backoff")
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        """Remove a request (finished or aborted) and free its blocks."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self._free(req)
        req.status, req.finish_reason = Status.FINISHED, reason

    def _free(self, req: Request) -> None:
        self.blocks.release(req.block_ids)
        req.block_ids = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------------------------
    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            while not self._grow(req, req.num_computed + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                out.append(Scheduled(req, n))
                budget -= n
                i += 1
                continue
            break
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            if req.num_computed == 0:
                self._use_prefix_cache(req)
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._grow(req, req.num_computed + n):
                self._free(req)  # let go of the prefix blocks it found while it waits
                req.num_computed = req.cached_tokens = 0
                req.block_hashes = []
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            if req.first_scheduled is None:
                req.first_scheduled = time.monotonic()
            self.running.append(req)
            out.append(Scheduled(req, n))
            budget -= n
        return out

    def _grow(self, req: Request, tokens: int) -> bool:
        """Blocks for ``tokens`` tokens of ``req``; False (and nothing taken) when the pool is short."""
        need = blocks_needed(tokens) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.blocks.num_free:
            return False
        req.block_ids += self.blocks.allocate(need)
        return True

    def _preempt(self, req: Request) -> None:
        self._free(req)
        req.num_computed = req.cached_tokens = 0
        req.block_hashes = []
        req.status = Status.WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _use_prefix_cache(self, req: Request) -> None:
        """Start the request after the longest cached prefix of its full blocks (at least one token is always
        left to compute: its logits are needed)."""
        full = (req.num_tokens - 1) // BLOCK_SIZE
        hashes: list[bytes] = []
        parent: Optional[bytes] = None
        for b in range(full):
            parent = hash_block(parent, req.tokens(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE))
            hashes.append(parent)
        found = self.blocks.cached_prefix(hashes)
        self.blocks.queries += len(req.prompt_ids)
        if found:
            self.blocks.take(found)
            req.block_ids = list(found)
            req.block_hashes = hashes[: len(found)]
            req.num_computed = req.cached_tokens = len(found) * BLOCK_SIZE
            self.blocks.hits += req.cached_tokens

    def computed(self, s: Scheduled) -> None:
        """After the step: the scheduled tokens are in the cache; full blocks become findable."""
        req = s.request
        req.num_computed += s.num_tokens
        while (len(req.block_hashes) + 1) * BLOCK_SIZE <= req.num_computed:
            b = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else None
            h = hash_block(parent, req.tokens(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE))
            req.block_hashes.append(h)
            self.blocks.seal(req.block_ids[b], h)
