"""Decode steps as CUDA graphs, one per batch-size bucket (runtime.buckets.bucket_size: 1, 2, 4, 8, then
multiples of 8 to 128, of 32 to 512), as the one run path pads a dynamic batch (DESIGN.md drift item 8).

The graphs read static input buffers (tokens, positions, KV slots, block tables, context lengths) and
the engine's KV pools, and write logits into a buffer of their own. A decode step of ``n`` sequences
copies its inputs into the first ``n`` rows and replays the graph of the bucket ``b >= n``; rows
``n..b`` are padding that attends to one token of a scratch block that no sequence owns (the KV cache
holds one block more than the block manager hands out), so padding never touches a real sequence's
cache. The attention kernels take the number of context splits from ``context_bound`` (the engine's
max_model_len), so one graph serves every context length. Steps that prefill run eagerly: their
shapes vary every step and their kernels are long enough that launch time does not matter.

All graphs of the engine share one memory pool and are captured with the capture error mode set to
thread-local, under the run path's launch lock held for writing (runtime/graphs.py: no other thread
launches meanwhile), after one eager run of the same step has compiled every Triton kernel. ``DecodeGraphs.emulate`` runs the same logic on the CPU for tests: "capture" runs the step once
and keeps its output, "replay" runs it again on the same buffers and writes into that same output, as a
graph's kernels write to fixed addresses.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from ..runtime.buckets import bucket_size
from ..runtime.graphs import LAUNCH
from .attention import StepInputs
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

    def __init__(self, model: Transformer, kv: KVCache, max_blocks_per_seq: int, max_num_seqs: int):
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
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
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
