"""Runs model steps on the engine's device: eager for steps that prefill, and (on a GPU) captured CUDA
graphs for decode steps, one per batch-size bucket (graphs.py)."""
from __future__ import annotations

from dataclasses import replace

import torch

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

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [R, vocab] fp32 of the step's logit rows."""
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
