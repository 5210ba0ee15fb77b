"""SwiGLU: silu(gate) * up from the fused gate/up projection [T, 2 I] -> [T, I], one pass (fp32 math)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu(x_ptr, out_ptr, inter, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    row, col = offs // inter, offs % inter
    gate = tl.load(x_ptr + row * 2 * inter + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * inter + inter + col, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    total = out.numel()
    if total:
        block = 1024
        _swiglu[(triton.cdiv(total, block),)](gate_up, out, inter, total, BLOCK=block, num_warps=4)
    return out
