"""Runs model steps on the engine's device: eager for steps that prefill, and (on a GPU) captured CUDA
graphs for decode steps, one per batch-size bucket (graphs.py).

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
                 cuda_graphs: bool = True):
        self.model, self.kv = model, kv
        self.device = model.device
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_num_seqs = max_num_seqs
        self.graphs = None
        if cuda_graphs:
            from .graphs import DecodeGraphs

            if DecodeGraphs.supported(self.device):
                self.graphs = DecodeGraphs(model, kv, max_blocks_per_seq, max_num_seqs)

    def launching(self) -> Any:
        """Hold while launching a step's work (the model and the sampler)."""
        return LAUNCH.reading()

    def prepare(self, step: StepInputs) -> None:
        """Capture the decode graph this step will replay, if it is not there yet (outside any launch)."""
        if self.graphs is not None and step.decode_only and self.graphs.fits(step):
            self.graphs.ensure(step.num_seqs)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [R, vocab] fp32 of the step's logit rows (call under ``launching`` after ``prepare``)."""
        with torch.inference_mode():
            if self.graphs is not None and step.decode_only and self.graphs.fits(step):
                return self.graphs.run(step)
            return self.model(to_device(step, self.device), self.kv)


def to_device(step: StepInputs, device: torch.device) -> StepInputs:
    if device.type == "cpu":
        return step
    nb = device.type == "cuda"
    return replace(step, **{k: getattr(step, k).to(device, non_blocking=nb) for k in
                            ("tokens", "positions", "slots", "block_tables", "seq_lens", "query_starts", "logit_rows")})
