"""RMSNorm fused with the residual add: one read of the row (and of the residual), the sum stored as the
next residual, the normalized row times the weight stored as the output. fp32 statistics, as
transformers' LlamaRMSNorm (the add itself in the activations' dtype, as the model does it)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, N, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * N + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * N + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w * (xf * inv).to(x.dtype)
    tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); without a residual, (norm(x) * weight, x)."""
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    res = residual.contiguous() if residual is not None else x
    if rows:
        _add_rms_norm[(rows,)](x, res, weight, out, res_out, n, eps, HAS_RES=residual is not None,
                               BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8)
    return out, res_out
