"""The model: one decoder-only transformer in plain PyTorch (Llama 2/3, Mistral, Qwen2, Baichuan2-7B),
readable before clever, as gpt-fast.

A step reads a batch of sequences' new tokens (StepInputs) and the engine's KV pools, writes the new keys
and values into the pools, and returns the next-token logits of the rows asked for. The fused ops
(residual add + RMSNorm, QKV split + RoPE, SwiGLU, paged attention, weight-only GEMMs) go through
kernels.dispatch: Triton on a GPU, torch on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .attention import StepInputs
from .config import ModelConfig
from .errors import CheckpointError
from .kernels import dispatch
from .kv_cache import KVCache
from .quant import LINEAR_SUFFIXES, Q4_GROUP, LinearWeights, linear
from .rope import rope_table


@dataclass
class Layer:
    attention_norm: torch.Tensor
    wqkv: LinearWeights
    wo: LinearWeights
    ffn_norm: torch.Tensor
    w13: LinearWeights
    w2: LinearWeights


class Transformer:
    """Weights in ember's names (checkpoint.py) in their scheme (quant.py), on one device."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], scheme: str, max_positions: int,
                 device: "torch.device | str" = "cpu"):
        self.cfg = cfg
        self.scheme = scheme
        self.device = torch.device(device)
        check_weights(cfg, weights, scheme)
        w = {k: t.to(self.device) for k, t in weights.items()}
        self.tok_embeddings = w["tok_embeddings.weight"]
        self.dtype = self.tok_embeddings.dtype
        self.norm = w["norm.weight"]
        self.output = (LinearWeights("dense", self.tok_embeddings) if cfg.tie_word_embeddings
                       else LinearWeights("dense", w["output.weight"]))
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}"
            lin = {s.split(".")[1]: LinearWeights.from_tensors(w, f"{p}.{s}", scheme) for s in LINEAR_SUFFIXES}
            self.layers.append(Layer(w[f"{p}.attention_norm.weight"], lin["wqkv"], lin["wo"],
                                     w[f"{p}.ffn_norm.weight"], lin["w13"], lin["w2"]))
        self.rope = rope_table(cfg, max_positions, self.device)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, step: StepInputs, kv: KVCache) -> torch.Tensor:
        """Logits [R, vocab] (fp32) for ``step.logit_rows``."""
        cfg = self.cfg
        x = self.tok_embeddings[step.tokens]
        residual: Optional[torch.Tensor] = None
        for i, layer in enumerate(self.layers):
            h, residual = dispatch.rms_norm(x, layer.attention_norm, cfg.rms_norm_eps, residual)
            q = dispatch.qkv_rope_cache(linear(h, layer.wqkv), step.positions, self.rope, step.slots, kv.k[i],
                                        kv.v[i], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            attn = dispatch.attention(q, kv.k[i], kv.v[i], step, self.scale, cfg.sliding_window)
            x = linear(attn.reshape(attn.shape[0], cfg.q_size), layer.wo)
            h, residual = dispatch.rms_norm(x, layer.ffn_norm, cfg.rms_norm_eps, residual)
            x = linear(dispatch.swiglu(linear(h, layer.w13)), layer.w2)
        rows = step.logit_rows
        h, _ = dispatch.rms_norm(x[rows], self.norm, cfg.rms_norm_eps, residual[rows])
        return linear(h, self.output).float()

    __call__ = forward


def expected_shapes(cfg: ModelConfig, scheme: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this config needs in this weight scheme, with its shape."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = (cfg.vocab_size, h)
    linears = {"attention.wqkv": (q + 2 * kv, h, cfg.qkv_bias), "attention.wo": (h, q, cfg.o_bias),
               "feed_forward.w13": (2 * inter, h, cfg.mlp_bias), "feed_forward.w2": (h, inter, cfg.mlp_bias)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        out[f"{p}.attention_norm.weight"] = out[f"{p}.ffn_norm.weight"] = (h,)
        for name, (rows, cols, bias) in linears.items():
            if scheme == "q4":
                out.update({f"{p}.{name}.qweight": (rows, cols // 2), f"{p}.{name}.scales": (rows, cols // Q4_GROUP),
                            f"{p}.{name}.mins": (rows, cols // Q4_GROUP)})
            else:
                out[f"{p}.{name}.weight"] = (rows, cols)
                if scheme in ("int8", "fp8"):
                    out[f"{p}.{name}.scale"] = (rows,)
            if bias:
                out[f"{p}.{name}.bias"] = (rows,)
    return out


def check_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], scheme: str) -> None:
    want = expected_shapes(cfg, scheme)
    for name, shape in want.items():
        t = weights.get(name)
        if t is None:
            raise CheckpointError(f"weight '{name}' is missing ({scheme} weights of a {cfg.architecture} model)")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"weight '{name}' has shape {list(t.shape)}; the config implies {list(shape)}")
    extra = sorted(set(weights) - set(want))
    if extra:
        raise CheckpointError(f"weight '{extra[0]}' is not part of a {cfg.architecture} model with {scheme} weights")
