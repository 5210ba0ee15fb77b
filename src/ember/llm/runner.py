"""Runs model steps on the engine's device: on a GPU, as captured CUDA graphs (graphs.py): decode steps
per batch-size bucket, steps that prefill per (token, sequence) bucket up to ``prefill_graph_tokens``
tokens; larger steps (and every step on the CPU) run eagerly.

Launches follow the run path's rule (runtime/graphs.py): work is launched under the process-wide launch
lock held for reading, and a capture holds it for writing, so a capture (of this engine or of any model
the same server runs) never records another thread's kernels. ``prepare`` captures what a step is missing
before the step's launches begin."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..runtime.graphs import LAUNCH

from .attention import StepInputs
from .kv_cache import KVCache
from .model import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVCache, max_blocks_per_seq: int, max_num_seqs: int,
                 cuda_graphs: bool = True, prefill_graph_tokens: int = 0):
        self.model, self.kv = model, kv
        self.device = model.device
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_num_seqs = max_num_seqs
        self.graphs = None
        self.prefill_graphs = None
        if cuda_graphs:
            from .graphs import DecodeGraphs, PrefillGraphs

            pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
            if DecodeGraphs.supported(self.device):
                self.graphs = DecodeGraphs(model, kv, max_blocks_per_seq, max_num_seqs, pool)
            if prefill_graph_tokens > 0 and PrefillGraphs.supported(self.device):
                self.prefill_graphs = PrefillGraphs(model, kv, max_blocks_per_seq, max_num_seqs,
                                                    prefill_graph_tokens, pool)

    def launching(self) -> Any:
        """Hold while launching a step's work (the model and the sampler)."""
        return LAUNCH.reading()

    def graphs_for(self, step: StepInputs) -> Any:
        """The graphs that run this step (DecodeGraphs, PrefillGraphs), or None: eager."""
        if step.decode_only:
            if self.graphs is not None and self.graphs.fits(step):
                return self.graphs
        elif self.prefill_graphs is not None and self.prefill_graphs.fits(step):
            return self.prefill_graphs
        return None

    def prepare(self, step: StepInputs) -> None:
        """Capture the graph this step will replay, if it is not there yet (outside any launch)."""
        g = self.graphs_for(step)
        if g is self.graphs and g is not None:
            g.ensure(step.num_seqs)
        elif g is not None:
            g.ensure(g.bucket(step))

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [R, vocab] fp32 of the step's logit rows (call under ``launching`` after ``prepare``)."""
        with torch.inference_mode():
            g = self.graphs_for(step)
            if g is not None:
                return g.run(step)
            return self.model(to_device(step, self.device), self.kv)


def to_device(step: StepInputs, device: torch.device) -> StepInputs:
    if device.type == "cpu":
        return step
    nb = device.type == "cuda"
    moved = {k: getattr(step, k).to(device, non_blocking=nb) for k in
             ("tokens", "positions", "slots", "block_tables", "seq_lens", "query_starts", "logit_rows")}
    if step.prefill_tiles is not None:
        moved["prefill_tiles"] = step.prefill_tiles.to(device, non_blocking=nb)
    return replace(step, **moved)
