"""Weight-only quantization of the linear layers, and the one ``linear`` the model calls.

Schemes (``--weights``), per linear layer ``<name>``:

- ``dense``: ``<name>.weight`` in the engine's dtype;
- ``int8``: ``<name>.weight`` int8 [out, in], ``<name>.scale`` fp32 [out] (symmetric, per output channel);
- ``fp8``: ``<name>.weight`` float8_e4m3fn [out, in], ``<name>.scale`` fp32 [out];
- ``q4``: groups of 32 inputs, ``value = q * scale + min`` with q in 0..15 (GGUF's Q4_1 form; Q4_0 is the
  case ``min = -8 * scale``): ``<name>.qweight`` uint8 [out, in / 2] (byte j of a group holds elements j
  and j + 16 in its low and high nibbles, as GGUF stores them), ``<name>.scales`` and ``<name>.mins`` fp16
  [out, in / 32]. A GGUF file's 4-bit blocks are kept as they are.

Embeddings and norms stay dense. On a GPU, int8 and fp8 run through the Triton weight-only kernels
(kernels/): up to 16 rows (decode) the bandwidth-bound GEMV of ``kernels/w8_gemv.py``, with the scale and
bias applied in its epilogue; more rows (prefill) the tiled GEMM of ``kernels/weight_only.py``. Elsewhere the
weights are dequantized into the activation dtype per call.

Layout: int8/fp8 weights are kept [out, in] row-major (K-contiguous rows), as built into the engine file and
made so at load (``from_tensors``): the GEMV's threads read 16 contiguous bytes of a row each, a warp 512
bytes of one row, so every load is coalesced with no repacking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

SCHEMES = ("dense", "int8", "fp8", "q4")
Q4_GROUP = 32
LINEAR_SUFFIXES = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


@dataclass
class Q4Blocks:
    """A [rows, cols] weight as 4-bit groups (see the module docstring). Row operations (concatenation,
    permutation) apply to all three parts alike."""

    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.qweight.shape[1] * 2)

    def rows(self, index: torch.Tensor) -> "Q4Blocks":
        return Q4Blocks(self.qweight[index], self.scales[index], self.mins[index])

    @staticmethod
    def cat(parts: list["Q4Blocks"]) -> "Q4Blocks":
        return Q4Blocks(*(torch.cat([getattr(p, k) for p in parts]) for k in ("qweight", "scales", "mins")))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, half = self.qweight.shape
        groups = half * 2 // Q4_GROUP
        q = self.qweight.view(rows, groups, Q4_GROUP // 2)
        nibbles = torch.cat((q & 0x0F, q >> 4), dim=-1).to(torch.float32)  # low nibbles first: elements j, j+16
        w = nibbles * self.scales.float()[..., None] + self.mins.float()[..., None]
        return w.reshape(rows, half * 2).to(dtype)


Weight = Union[torch.Tensor, Q4Blocks]


@dataclass
class LinearWeights:
    """One linear layer's tensors in its scheme (see the module docstring)."""

    scheme: str
    weight: torch.Tensor  # dense, int8, fp8, or q4's packed bytes
    scale: Optional[torch.Tensor] = None  # int8/fp8: [out] fp32
    scales: Optional[torch.Tensor] = None  # q4: [out, in/32]
    mins: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scheme == "dense":
            return self.weight.to(dtype)
        if self.scheme == "q4":
            return Q4Blocks(self.weight, self.scales, self.mins).dequantize(dtype)
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The layer's tensors under their engine-file names."""
        key = "qweight" if self.scheme == "q4" else "weight"
        out = {f"{name}.{key}": self.weight}
        for k in ("scale", "scales", "mins", "bias"):
            t = getattr(self, k)
            if t is not None:
                out[f"{name}.{k}"] = t
        return out

    @classmethod
    def from_tensors(cls, weights: dict[str, torch.Tensor], name: str, scheme: str) -> "LinearWeights":
        if scheme == "q4":
            return cls("q4", weights[f"{name}.qweight"], scales=weights[f"{name}.scales"],
                       mins=weights[f"{name}.mins"], bias=weights.get(f"{name}.bias"))
        w, scale = weights[f"{name}.weight"], weights.get(f"{name}.scale")
        if scheme in ("int8", "fp8"):  # the kernels read K-contiguous rows and a contiguous fp32 scale
            w, scale = w.contiguous(), scale.to(torch.float32).contiguous() if scale is not None else None
        return cls(scheme, w, scale=scale, bias=weights.get(f"{name}.bias"))


def quantize(w: Weight, scheme: str, dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> LinearWeights:
    """A linear layer's weight in ``scheme``; dense and bias parts in ``dtype``."""
    b = bias.to(dtype) if bias is not None else None
    if scheme == "q4":
        blocks = w if isinstance(w, Q4Blocks) else quantize_q4(w)
        return LinearWeights("q4", blocks.qweight, scales=blocks.scales, mins=blocks.mins, bias=b)
    dense = w.dequantize(torch.float32) if isinstance(w, Q4Blocks) else w
    if scheme == "dense":
        return LinearWeights("dense", dense.to(dtype), bias=b)
    if scheme in ("int8", "fp8"):
        q, scale = quantize_int8(dense) if scheme == "int8" else quantize_fp8(dense)
        return LinearWeights(scheme, q, scale=scale, bias=b)
    raise ValueError(f"unknown weight scheme {scheme!r}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wf = w.to(torch.float32)
    scale = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wf = w.to(torch.float32)
    scale = (wf.abs().amax(dim=1) / 448.0).clamp_min(1e-12)
    return (wf / scale[:, None]).clamp_(-448, 448).to(torch.float8_e4m3fn), scale


def quantize_q4(w: torch.Tensor) -> Q4Blocks:
    """Asymmetric 4-bit groups of 32 (GGUF's Q4_1 rule: scale = (max - min) / 15)."""
    rows, cols = w.shape
    if cols % Q4_GROUP:
        raise ValueError(f"q4 needs the input size to be a multiple of {Q4_GROUP}, not {cols}")
    g = w.to(torch.float32).reshape(rows, cols // Q4_GROUP, Q4_GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).to(torch.float16)
    mins = lo.to(torch.float16)
    inv = torch.where(scale.float() > 0, 1.0 / scale.float(), torch.zeros_like(lo))
    q = torch.round((g - mins.float()[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    packed = q[..., : Q4_GROUP // 2] | (q[..., Q4_GROUP // 2:] << 4)
    return Q4Blocks(packed.reshape(rows, cols // 2).contiguous(), scale, mins)


def linear(x: torch.Tensor, layer: LinearWeights) -> torch.Tensor:
    """y = x W^T + b, whatever the scheme. The GPU kernels take over where kernels.dispatch says so."""
    from .kernels import dispatch

    if layer.scheme in ("int8", "fp8") and dispatch.use_triton(x):
        from .kernels import weight_only

        return weight_only.weight_only_matmul(x, layer.weight, layer.scale, bias=layer.bias)  # bias fused or added
    if layer.scheme == "dense":
        return F.linear(x, layer.weight, layer.bias)
    y = F.linear(x, layer.dense(x.dtype))
    return y if layer.bias is None else y + layer.bias
