"""A model ready to run: config, weights in the engine's dtype and weight scheme, tokenizer. Made from a
checkpoint (folder or GGUF) or read from an LLM engine file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .config import ModelConfig
from .errors import CheckpointError
from .quant import LINEAR_SUFFIXES, SCHEMES, Q4Blocks, quantize
from .tokenizer import TokenizerSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # engine form: linear layers in ``scheme``, the rest in ``dtype``
    tokenizer: TokenizerSpec
    dtype: torch.dtype
    scheme: str
    name: str
    source: str

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)


def dtype_of(name: "str | torch.dtype | None", device: torch.device) -> torch.dtype:
    """fp32 on the CPU and fp16 on a GPU unless asked otherwise."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise CheckpointError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def prepare(ckpt: Checkpoint, dtype: torch.dtype, scheme: str = "dense") -> LoadedModel:
    """The checkpoint's weights in ``dtype``, linear layers in ``scheme`` (quant.py)."""
    if scheme not in SCHEMES:
        raise CheckpointError(f"weight scheme '{scheme}' is not one of {', '.join(SCHEMES)}")
    cfg = ckpt.config
    out: dict[str, torch.Tensor] = {}
    linear_names = {f"layers.{i}.{s}" for i in range(cfg.num_layers) for s in LINEAR_SUFFIXES}
    for name, w in ckpt.weights.items():
        base, _, kind = name.rpartition(".")
        if base in linear_names:
            if kind == "bias":
                continue  # goes with its weight
            lw = quantize(w, scheme, dtype, ckpt.weights.get(f"{base}.bias"))
            out.update(lw.tensors(base))
        else:
            dense = w.dequantize() if isinstance(w, Q4Blocks) else w
            out[name] = dense.to(dtype).contiguous()
    return LoadedModel(cfg, out, ckpt.tokenizer, dtype, scheme, ckpt.name, ckpt.source)


def is_engine_file(path: "str | os.PathLike") -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".engine"


def load_model(src: "str | os.PathLike", dtype: "str | torch.dtype | None" = None, weights: Optional[str] = None,
               device: "torch.device | str" = "cpu", verify_key: "bytes | None" = None) -> LoadedModel:
    """An LLM engine file as it was built, or a checkpoint prepared in ``dtype`` and ``weights``."""
    dev = torch.device(device)
    if is_engine_file(src):
        from .engine_file import read_llm_engine

        return read_llm_engine(src, verify_key)
    scheme = weights or "dense"
    keep_q4 = scheme == "q4"
    p = Path(src)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from .gguf_file import load_gguf

        ckpt = load_gguf(p, keep_q4=keep_q4)
    else:
        ckpt = load_checkpoint(p)
    return prepare(ckpt, dtype_of(dtype, dev), scheme)
