"""Rotary position embeddings: the inverse frequencies (with Llama 3 / linear scaling or GGUF's per-band
factors) and a cos/sin table indexed by position. Computed exactly as transformers does (fp32 inverse
frequencies, one fp32 product per position and frequency), so fp32 runs match it bit for bit."""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    rs = cfg.rope_scaling
    if rs.kind == "linear":
        inv = inv / rs.factor
    elif rs.kind == "llama3":
        old = rs.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    if cfg.rope_freq_factors is not None:
        inv = inv / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    return inv


def rope_table(cfg: ModelConfig, max_positions: int, device: "torch.device | str" = "cpu") -> torch.Tensor:
    """[max_positions, 2, head_dim // 2] fp32: cos and sin of each position's angles."""
    inv = inverse_frequencies(cfg)
    freqs = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)[:, None] * inv[None, :]
    return torch.stack((freqs.cos(), freqs.sin()), dim=1).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim // 2] (fp32). transformers' rotate_half form: the
    first and second halves of each head are the pairs rotated together."""
    c = torch.cat((cos, cos), dim=-1)[:, None, :].to(x.dtype)
    s = torch.cat((sin, sin), dim=-1)[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rotated * s
