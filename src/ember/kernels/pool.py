"""Pooling tactics for CUDA engines: channels-last max pooling in Triton, global average pooling in one
torch reduction; both in the storage type (fp16/bf16), with no widening copies.

The reference MaxPool widens half inputs to fp32 and pads a copy of the input with -inf: on ResNet-50
b256 (H200) that was 2.2 ms of 8.4 ms of kernel time around one 3x3/s2 pool. Max is exact in any
float type, so computing it in the storage type changes nothing; out-of-range window positions are
masked instead of padded.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ir.graph import Node
from ..ops.nn import pool_geometry, window
from .kernel_store import note
from . import tactic

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines without triton: the torch tactics still register
    triton = None


def _pool2d_node(node: Node, device: torch.device) -> bool:
    x = node.inputs[0]
    a = node.attrs
    return (device.type == "cuda" and len(node.outputs) == 1 and x is not None and x.rank == 4
            and x.dtype is not None and x.dtype.is_float and len(a.get("kernel_shape") or []) == 2)


def _geometry(x: torch.Tensor, attrs: dict) -> tuple:
    win = window(2, attrs["kernel_shape"], attrs.get("strides"), attrs.get("dilations"), attrs.get("pads"),
                 attrs.get("auto_pad", "NOTSET"))
    outs, begin, _, _ = pool_geometry(win, x.shape[2:], bool(attrs.get("ceil_mode", 0)))
    return outs, begin, win


if triton is not None:
    @triton.jit
    def _max_pool_nhwc_kernel(x_ptr, y_ptr, P, H, W, C, OH, OW,
                              sxn, sxh, sxw, sxc, syn, syh, syw, syc,
                              KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                              PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels, n-major
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        pm = p < P
        cm = c < C
        ow = p % OW
        oh = (p // OW) % OH
        n = p // (OW * OH)
        acc = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
        for kh in tl.static_range(KH):
            ih = oh * SH - PH + kh * DH
            hm = pm & (ih >= 0) & (ih < H)
            for kw in tl.static_range(KW):
                iw = ow * SW - PW + kw * DW
                m = hm & (iw >= 0) & (iw < W)
                ptr = x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :]
                v = tl.load(ptr, mask=m[:, None] & cm[None, :], other=float("-inf"))
                acc = tl.maximum(acc, v.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)
        out = y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + (c * syc)[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])


def max_pool_nhwc(x: torch.Tensor, attrs: dict) -> torch.Tensor:
    """ONNX MaxPool (2-D, values only) on a tensor of any layout; the result is channels-last."""
    (oh, ow), begin, win = _geometry(x, attrs)
    n, c, h, w = x.shape
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    p = n * oh * ow
    if p == 0 or c == 0:
        return y
    block_c = min(64, triton.next_power_of_2(c))
    block_p = max(16, 4096 // block_c // 4)
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    note(_max_pool_nhwc_kernel[grid](x, y, p, h, w, c, oh, ow, x.stride(0), x.stride(2), x.stride(3), x.stride(1),
                                y.stride(0), y.stride(2), y.stride(3), y.stride(1),
                                KH=win.kernel[0], KW=win.kernel[1], SH=win.strides[0], SW=win.strides[1],
                                PH=begin[0], PW=begin[1], DH=win.dilations[0], DW=win.dilations[1],
                                BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4))
    return y


def _is_max_pool_2d(node: Node, device: torch.device) -> bool:
    return triton is not None and _pool2d_node(node, device) and node.attrs.get("storage_order", 0) in (0, 1)


@tactic("triton.max_pool_nhwc", ("MaxPool",), _is_max_pool_2d,
        code=(max_pool_nhwc, _max_pool_nhwc_kernel) if triton is not None else ())
def triton_max_pool(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
    return max_pool_nhwc(args[0], attrs)


def _torch_pool_fits(node: Node, device: torch.device) -> bool:
    """torch's max_pool2d takes symmetric pads of at most half the window, floor mode, explicit pads."""
    if not _pool2d_node(node, device) or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return False
    k = node.attrs["kernel_shape"]
    pads = list(node.attrs.get("pads") or [0, 0, 0, 0])
    return (not node.attrs.get("ceil_mode", 0) and pads[:2] == pads[2:]
            and all(p <= kk // 2 for p, kk in zip(pads[:2], k)))


@tactic("torch.max_pool", ("MaxPool",), _torch_pool_fits)
def torch_max_pool(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
    x = args[0]
    (_, _), begin, win = _geometry(x, attrs)
    return torch.nn.functional.max_pool2d(x, win.kernel, win.strides, begin, win.dilations)


def _is_global_avg_pool(node: Node, device: torch.device) -> bool:
    x = node.inputs[0]
    return (device.type == "cuda" and x is not None and x.rank is not None and x.rank >= 3
            and x.dtype is not None and x.dtype.is_float)


@tactic("torch.global_avg_pool", ("GlobalAveragePool",), _is_global_avg_pool)
def torch_global_avg_pool(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
    x = args[0]
    # one reduction kernel: reads the storage type, accumulates in fp32, rounds once
    return torch.mean(x, dim=tuple(range(2, x.dim())), keepdim=True, dtype=torch.float32).to(x.dtype)

