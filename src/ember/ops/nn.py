"""Geometry shared by the sliding-window ops (Conv, ConvTranspose, the pools, Col2Im, DeformConv).

ONNX spells a window by kernel_shape, strides, dilations, pads ([begin..., end...]) and auto_pad;
these helpers turn that into per-axis begin/end pads and output sizes, for concrete ints at run
time and for symbolic dims (``ember.ir.shapes.Sym``) in the shape rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..ir.shapes import Dim

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


@dataclass
class Window:
    """A normalized sliding window over ``n`` spatial axes."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: Optional[list[int]]  # explicit [begin..., end...], None when auto_pad decides
    auto_pad: str

    @property
    def n(self) -> int:
        return len(self.kernel)

    def span(self, i: int) -> int:
        """Extent of the dilated kernel along axis i."""
        return (self.kernel[i] - 1) * self.dilations[i] + 1


def window(n: int, kernel: Sequence[int], strides=None, dilations=None, pads=None,
           auto_pad: str = "NOTSET") -> Window:
    if auto_pad not in AUTO_PADS:
        raise ValueError(f"auto_pad '{auto_pad}' is not one of {AUTO_PADS}")
    kernel = [int(k) for k in kernel]
    if len(kernel) != n:
        raise ValueError(f"kernel_shape {kernel} has {len(kernel)} axes; the input has {n} spatial axes")
    strides = [int(s) for s in strides] if strides else [1] * n
    dilations = [int(d) for d in dilations] if dilations else [1] * n
    if auto_pad != "NOTSET":
        pads = None
    else:
        pads = [int(p) for p in pads] if pads else [0] * (2 * n)
    return Window(kernel, strides, dilations, pads, auto_pad)


def same_pads(total: int, auto_pad: str) -> tuple[int, int]:
    """Split a total padding between begin and end the way SAME_UPPER/SAME_LOWER say."""
    small = total // 2
    return (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)


def resolve_pads(w: Window, in_sizes: Sequence[int]) -> tuple[list[int], list[int]]:
    """Concrete begin and end pads per axis (Conv / pool forward direction)."""
    if w.pads is not None:
        return list(w.pads[: w.n]), list(w.pads[w.n:])
    if w.auto_pad == "VALID":
        return [0] * w.n, [0] * w.n
    begin, end = [], []
    for i, size in enumerate(in_sizes):
        out = -(-int(size) // w.strides[i])
        total = max(0, (out - 1) * w.strides[i] + w.span(i) - int(size))
        b, e = same_pads(total, w.auto_pad)
        begin.append(b)
        end.append(e)
    return begin, end


def output_size(w: Window, i: int, size: Dim, ceil_mode: bool = False) -> Optional[Dim]:
    """Output length along axis i for an input length ``size`` (int or symbolic); None if unknown."""
    s, span = w.strides[i], w.span(i)
    if w.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return (size + s - 1) // s
    if w.auto_pad == "VALID":
        return (size - span) // s + 1
    pb, pe = w.pads[i], w.pads[w.n + i]
    if not ceil_mode:
        return (size + pb + pe - span) // s + 1
    if isinstance(size, int):
        out = -(-(size + pb + pe - span) // s) + 1
        if (out - 1) * s >= size + pb:  # the last window may not start in the end padding
            out -= 1
        return out
    return None


def pool_geometry(w: Window, in_sizes: Sequence[int], ceil_mode: bool):
    """(output sizes, begin pads, end pads, extra end pads that make floor-mode windows fit)."""
    begin, end = resolve_pads(w, in_sizes)
    win = Window(w.kernel, w.strides, w.dilations, begin + end, "NOTSET")
    outs, extra = [], []
    for i, size in enumerate(in_sizes):
        out = output_size(win, i, int(size), ceil_mode)
        outs.append(out)
        extra.append(max(0, (out - 1) * w.strides[i] + w.span(i) - (int(size) + begin[i] + end[i])))
    return outs, begin, end, extra


def torch_pad_arg(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX begin/end per axis -> torch.nn.functional.pad's last-axis-first list."""
    out: list[int] = []
    for b, e in zip(reversed(list(begin)), reversed(list(end))):
        out += [int(b), int(e)]
    return out


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a reference kernel computes in: halves are widened to float32 (CPU kernels lack them)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if t.dtype.is_floating_point:
        return t.dtype
    return torch.float64


CONV_FN = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
CONV_T_FN = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
             3: torch.nn.functional.conv_transpose3d}


def conv_fn(n: int):
    try:
        return CONV_FN[n]
    except KeyError:
        raise NotImplementedError(f"convolution over {n} spatial axes (ember runs 1, 2 or 3)") from None
