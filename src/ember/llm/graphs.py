"""Model steps as CUDA graphs, as the one run path pads a dynamic batch (DESIGN.md drift item 8).

Decode steps: one graph per batch-size bucket (runtime.buckets.bucket_size: 1, 2, 4, 8, then multiples of
8 to 128, of 32 to 512). The graphs read static input buffers (tokens, positions, KV slots, block tables,
context lengths) and the engine's KV pools, and write logits into a buffer of their own. A decode step of
``n`` sequences copies its inputs into the first ``n`` rows and replays the graph of the bucket ``b >= n``;
rows ``n..b`` are padding that attends to one token of a scratch block that no sequence owns (the KV cache
holds one block more than the block manager hands out), so padding never touches a real sequence's
cache. The attention kernels take the number of context splits from ``context_bound`` (the engine's
max_model_len), so one graph serves every context length.

Steps that prefill (a prompt, a chunk of one, decode tokens mixed in): one graph per (token bucket,
sequence bucket): tokens 16, 32, 64, ... up to ``max_tokens`` (EngineOptions.prefill_graph_tokens),
sequences 1, 4, 16, 64, 256 up to the token bucket and max_num_seqs. A step of ``T`` tokens over ``B``
sequences fills the first rows of the buffers; padding tokens write their keys to the scratch block and
belong to no sequence (``query_starts`` ends at ``T``), padding sequences have no tokens, padding tiles
of the prefill attention kernel do nothing, and padding logit rows read row 0. Larger steps run eagerly:
their kernels are long enough that launch time hides behind them (the step makes no host sync).

All graphs of the engine share one memory pool and are captured with the capture error mode set to
thread-local, under the run path's launch lock held for writing (runtime/graphs.py: no other thread
launches meanwhile), after one eager run of the same step has compiled every Triton kernel. ``emulate``
runs the same logic on the CPU for tests: "capture" runs the step once and keeps its output, "replay"
runs it again on the same buffers and writes into that same output, as a graph's kernels write to fixed
addresses.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch

from ..runtime.buckets import bucket_size
from ..runtime.graphs import LAUNCH
from .attention import StepInputs, TILE_NONE, prefill_tiles, tile_capacity
from .kv_cache import BLOCK_SIZE, KVCache
from .model import Transformer

log = logging.getLogger("ember.llm")


class _EmulatedGraph:
    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn = fn
        self.output = fn()

    def replay(self) -> None:
        fresh = self.fn()
        if fresh.data_ptr() != self.output.data_ptr():
            self.output.copy_(fresh)


class _CudaGraph:
    def __init__(self, fn: Callable[[], torch.Tensor], pool: Any, stream: torch.cuda.Stream):
        side = stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # compiles the Triton kernels of these shapes before capture
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            self.output = fn()

    def replay(self) -> None:
        self.graph.replay()


class DecodeGraphs:
    emulate = False  # tests: run the graph logic on the CPU

    @classmethod
    def supported(cls, device: torch.device) -> bool:
        return device.type == "cuda" or (cls.emulate and device.type == "cpu")

    def __init__(self, model: Transformer, kv: KVCache, max_blocks_per_seq: int, max_num_seqs: int,
                 pool: Any = None):
        self.model, self.kv = model, kv
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        top = bucket_size(max_num_seqs)
        self.sizes = sorted({bucket_size(n) for n in range(1, top + 1)})
        B, W = self.sizes[-1], max_blocks_per_seq
        self.width = W
        self.scratch = kv.scratch_block
        dev, i32, i64 = self.device, torch.int32, torch.long
        self.tokens = torch.zeros(B, dtype=i64, device=dev)
        self.positions = torch.zeros(B, dtype=i64, device=dev)
        self.slots = torch.full((B,), self.scratch * BLOCK_SIZE, dtype=i64, device=dev)
        self.block_tables = torch.full((B, W), self.scratch, dtype=i32, device=dev)
        self.seq_lens = torch.ones(B, dtype=i32, device=dev)
        self.query_starts = torch.arange(B + 1, dtype=i32, device=dev)
        self.logit_rows = torch.arange(B, dtype=i64, device=dev)
        self.context_bound = W * BLOCK_SIZE
        self.graphs: dict[int, Any] = {}
        self.pool = (pool or torch.cuda.graph_pool_handle()) if self.cuda else None
        self.stream = torch.cuda.Stream(dev) if self.cuda else None
        self.replays = 0

    def fits(self, step: StepInputs) -> bool:
        return step.num_seqs <= self.sizes[-1] and step.block_tables.shape[1] <= self.width

    def _inputs(self, b: int) -> StepInputs:
        return StepInputs(tokens=self.tokens[:b], positions=self.positions[:b], slots=self.slots[:b],
                          block_tables=self.block_tables[:b], seq_lens=self.seq_lens[:b],
                          query_starts=self.query_starts[:b + 1], logit_rows=self.logit_rows[:b], q_lens=[1] * b,
                          seq_lens_host=[1] * b, context_bound=self.context_bound)

    def ensure(self, n: int) -> None:
        """The graph of the bucket of ``n`` rows, captured now if missing: under the run path's launch lock
        for writing (no other thread launches while it records), outside any launch of this thread."""
        b = bucket_size(n)
        if b in self.graphs:
            return
        step = self._inputs(b)

        def fn() -> torch.Tensor:
            return self.model(step, self.kv)

        with LAUNCH.writing(), torch.inference_mode():
            # the warm-up run and the capture see padding only: the buffers may still hold the rows of an
            # earlier step, whose blocks may belong to another sequence by now
            self._pad(0)
            self.graphs[b] = _CudaGraph(fn, self.pool, self.stream) if self.cuda else _EmulatedGraph(fn)

    def capture_all(self) -> float:
        """Capture every bucket now (largest first, so the smaller ones reuse its memory); returns seconds."""
        t0 = time.perf_counter()
        for b in reversed(self.sizes):
            self.ensure(b)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        log.info("captured %d decode graphs (batch buckets %s) in %.1f s", len(self.sizes), self.sizes, took)
        return took

    def _pad(self, n: int) -> None:
        """Rows from ``n`` on: padding on the scratch block."""
        self.tokens[n:].zero_()
        self.positions[n:].zero_()
        self.slots[n:].fill_(self.scratch * BLOCK_SIZE)
        self.seq_lens[n:].fill_(1)
        self.block_tables[n:, 0].fill_(self.scratch)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [n, vocab] of a decode step: a view of the bucket graph's output, valid until the next run."""
        n = step.num_seqs
        b = bucket_size(n)
        nb = self.cuda
        self.tokens[:n].copy_(step.tokens, non_blocking=nb)
        self.positions[:n].copy_(step.positions, non_blocking=nb)
        self.slots[:n].copy_(step.slots, non_blocking=nb)
        self.block_tables[:n, : step.block_tables.shape[1]].copy_(step.block_tables, non_blocking=nb)
        self.seq_lens[:n].copy_(step.seq_lens, non_blocking=nb)
        self._pad(n)
        g = self.graphs[b]  # ensure()d before the step's launches began
        g.replay()
        self.replays += 1
        return g.output[:n]


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, ... below ``max_tokens``, then ``max_tokens`` itself."""
    sizes, b = [], 16
    while b < max_tokens:
        sizes.append(b)
        b *= 2
    return sizes + [max_tokens] if max_tokens > 0 else []


def seq_buckets(tokens: int, max_num_seqs: int) -> list[int]:
    """1, 4, 16, 64, ... below the most sequences a step of ``tokens`` tokens can have, then that."""
    cap = min(tokens, max_num_seqs)
    sizes, b = [], 1
    while b < cap:
        sizes.append(b)
        b *= 4
    return sizes + [cap]


class PrefillGraphs:
    """Steps that are not decode-only, as graphs per (token bucket, sequence bucket); see the module
    docstring."""

    emulate = False  # tests: run the graph logic on the CPU

    @classmethod
    def supported(cls, device: torch.device) -> bool:
        return device.type == "cuda" or (cls.emulate and device.type == "cpu")

    def __init__(self, model: Transformer, kv: KVCache, max_blocks_per_seq: int, max_num_seqs: int,
                 max_tokens: int, pool: Any = None):
        self.model, self.kv = model, kv
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.sizes = token_buckets(max_tokens)
        self.max_num_seqs = max_num_seqs
        self.buckets = [(t, s) for t in self.sizes for s in seq_buckets(t, max_num_seqs)]
        T, W = self.sizes[-1], max_blocks_per_seq
        S = max(s for _, s in self.buckets)
        self.width = W
        self.scratch_slot = kv.scratch_block * BLOCK_SIZE
        dev, i32, i64 = self.device, torch.int32, torch.long
        self.tokens = torch.zeros(T, dtype=i64, device=dev)
        self.positions = torch.zeros(T, dtype=i64, device=dev)
        self.slots = torch.full((T,), self.scratch_slot, dtype=i64, device=dev)
        self.block_tables = torch.full((S, W), kv.scratch_block, dtype=i32, device=dev)
        self.seq_lens = torch.zeros(S, dtype=i32, device=dev)
        self.query_starts = torch.zeros(S + 1, dtype=i32, device=dev)
        self.logit_rows = torch.zeros(S, dtype=i64, device=dev)
        self.tiles = prefill_tiles([], tile_capacity(T, S)).to(dev)
        self.context_bound = W * BLOCK_SIZE
        self.graphs: dict[tuple[int, int], Any] = {}
        self.pool = (pool or torch.cuda.graph_pool_handle()) if self.cuda else None
        self.stream = torch.cuda.Stream(dev) if self.cuda else None
        self.replays = 0
        self.last: Optional[tuple[int, int]] = None  # the bucket of the latest replay (benchmarks print it)

    def bucket(self, step: StepInputs) -> tuple[int, int]:
        """The (tokens, sequences) bucket of a step that fits (see ``fits``)."""
        n, b = step.tokens.shape[0], step.num_seqs
        t = next(t for t in self.sizes if t >= n)
        return t, next(s for s in seq_buckets(t, self.max_num_seqs) if s >= b)

    def fits(self, step: StepInputs) -> bool:
        return (step.tokens.shape[0] <= self.sizes[-1] and step.block_tables.shape[1] <= self.width
                and step.num_seqs <= self.max_num_seqs)

    def _inputs(self, t: int, s: int) -> StepInputs:
        return StepInputs(tokens=self.tokens[:t], positions=self.positions[:t], slots=self.slots[:t],
                          block_tables=self.block_tables[:s], seq_lens=self.seq_lens[:s],
                          query_starts=self.query_starts[:s + 1], logit_rows=self.logit_rows[:s], q_lens=[0] * s,
                          seq_lens_host=[0] * s, context_bound=self.context_bound,
                          prefill_tiles=self.tiles[:, :tile_capacity(t, s)], padded=True)

    def ensure(self, bucket: tuple[int, int]) -> None:
        """The graph of this bucket, captured now if missing (as DecodeGraphs.ensure)."""
        if bucket in self.graphs:
            return
        step = self._inputs(*bucket)

        def fn() -> torch.Tensor:
            return self.model(step, self.kv)

        with LAUNCH.writing(), torch.inference_mode():
            self._pad()  # the capture sees padding only (the buffers may hold an earlier step's rows)
            self.graphs[bucket] = _CudaGraph(fn, self.pool, self.stream) if self.cuda else _EmulatedGraph(fn)

    def capture_all(self) -> float:
        """Capture every bucket now (largest first, so the smaller ones reuse its memory); returns seconds."""
        t0 = time.perf_counter()
        for b in reversed(self.buckets):
            self.ensure(b)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        log.info("captured %d prefill graphs (token buckets %s) in %.1f s", len(self.buckets), self.sizes, took)
        return took

    def _pad(self) -> None:
        self.tokens.zero_()
        self.positions.zero_()
        self.slots.fill_(self.scratch_slot)
        self.seq_lens.zero_()
        self.query_starts.zero_()
        self.logit_rows.zero_()
        self.tiles.copy_(prefill_tiles([], self.tiles.shape[1]))

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [R, vocab] of the step: a view of the bucket graph's output, valid until the next run. The
        padded inputs are made on the host and copied once per buffer (no fill kernels)."""
        t, s = self.bucket(step)
        n, b, r = step.tokens.shape[0], step.num_seqs, step.logit_rows.shape[0]
        nb = self.cuda
        i64 = torch.long
        pad = t - n
        self.tokens[:t].copy_(torch.cat((step.tokens, torch.zeros(pad, dtype=i64))), non_blocking=nb)
        self.positions[:t].copy_(torch.cat((step.positions, torch.zeros(pad, dtype=i64))), non_blocking=nb)
        self.slots[:t].copy_(torch.cat((step.slots, torch.full((pad,), self.scratch_slot, dtype=i64))),
                             non_blocking=nb)
        self.block_tables[:b, : step.block_tables.shape[1]].copy_(step.block_tables, non_blocking=nb)
        self.seq_lens[:s].copy_(torch.cat((step.seq_lens, torch.zeros(s - b, dtype=torch.int32))), non_blocking=nb)
        self.query_starts[:s + 1].copy_(torch.cat((step.query_starts, step.query_starts[-1:].expand(s - b))),
                                        non_blocking=nb)
        self.logit_rows[:s].copy_(torch.cat((step.logit_rows, torch.zeros(s - r, dtype=i64))), non_blocking=nb)
        cap = tile_capacity(t, s)
        tiles = step.prefill_tiles if step.prefill_tiles is not None else prefill_tiles(step.q_lens)
        self.tiles[:, :cap].copy_(torch.cat((tiles.cpu(), prefill_tiles([], cap - tiles.shape[1])), dim=1),
                                  non_blocking=nb)
        g = self.graphs[(t, s)]  # ensure()d before the step's launches began
        g.replay()
        self.replays += 1
        self.last = (t, s)
        return g.output[:r]
