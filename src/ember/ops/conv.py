"""Convolutions: Conv, ConvTranspose, ConvInteger, QLinearConv, DeformConv, and Col2Im (the fold)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ir.dtypes import DType
from ..ir.graph import Node
from .nn import CONV_T_FN, compute_dtype, conv_fn, output_size, resolve_pads, same_pads, torch_pad_arg, window
from .registry import QuantSpec, op, shape_rule

# INT8/FP8: the input activation per tensor, the weight per output channel (axis 0)
CONV_QUANT = QuantSpec(activations=("x",), weight="w", weight_axis=lambda attrs: 0, quantized_op="ember.QConv")


def _conv_core(x: torch.Tensor, w: torch.Tensor, *, auto_pad: str, dilations, group: int, kernel_shape,
               pads, strides) -> torch.Tensor:
    """Convolution of x and w (same dtype) with ONNX padding rules; no bias."""
    n = x.dim() - 2
    win = window(n, kernel_shape or w.shape[2:], strides, dilations, pads, auto_pad)
    begin, end = resolve_pads(win, x.shape[2:])
    padding: "list[int] | int" = 0
    if begin == end:
        padding = begin  # symmetric: let the conv kernel pad (no copy of x)
    else:
        x = F.pad(x, torch_pad_arg(begin, end))
    return conv_fn(n)(x, w, None, stride=win.strides, padding=padding, dilation=win.dilations, groups=group)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector (or scalar) shaped to broadcast over (N, C, spatial...)."""
    return t.reshape(1, -1, *([1] * (ndim - 2))) if t.numel() > 1 else t.reshape(())


@op("Conv", kind="anchor", low_precision="all", quant=CONV_QUANT)
def conv(x, w, b=None, *, auto_pad: str = "NOTSET", dilations: list = None, group: int = 1,
         kernel_shape: list = None, pads: list = None, strides: list = None):
    ct = compute_dtype(x)
    y = _conv_core(x.to(ct), w.to(ct), auto_pad=auto_pad, dilations=dilations, group=group,
                   kernel_shape=kernel_shape, pads=pads, strides=strides)
    if b is not None:
        y = y + _channel_view(b.to(ct), y.dim())
    return y.to(x.dtype)


@op("ConvInteger", kind="anchor")
def conv_integer(x, w, x_zero_point=None, w_zero_point=None, *, auto_pad: str = "NOTSET", dilations: list = None,
                 group: int = 1, kernel_shape: list = None, pads: list = None, strides: list = None):
    # float64 holds every int32 accumulator of 8-bit products exactly
    xf, wf = x.to(torch.float64), w.to(torch.float64)
    if x_zero_point is not None:
        xf = xf - x_zero_point.to(torch.float64).reshape(())
    if w_zero_point is not None:
        wf = wf - w_zero_point.to(torch.float64).reshape(-1, *([1] * (w.dim() - 1)))
    y = _conv_core(xf, wf, auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape,
                   pads=pads, strides=strides)
    return y.round().to(torch.int32)


@op("QLinearConv", kind="anchor")
def qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, b=None, *,
                 auto_pad: str = "NOTSET", dilations: list = None, group: int = 1, kernel_shape: list = None,
                 pads: list = None, strides: list = None):
    acc = conv_integer(x, w, x_zero_point, w_zero_point, auto_pad=auto_pad, dilations=dilations, group=group,
                       kernel_shape=kernel_shape, pads=pads, strides=strides).to(torch.float64)
    if b is not None:
        acc = acc + _channel_view(b.to(torch.float64), acc.dim())
    scale = (x_scale.to(torch.float32).reshape(()) * w_scale.to(torch.float32)) / y_scale.to(torch.float32)
    y = torch.round(acc * _channel_view(scale.to(torch.float64), acc.dim()))
    y = y + y_zero_point.to(torch.float64).reshape(())
    info = torch.iinfo(y_zero_point.dtype)
    return y.clamp(info.min, info.max).to(y_zero_point.dtype)


@op("ConvTranspose", kind="anchor", low_precision="all")
def conv_transpose(x, w, b=None, *, auto_pad: str = "NOTSET", dilations: list = None, group: int = 1,
                   kernel_shape: list = None, output_padding: list = None, output_shape: list = None,
                   pads: list = None, strides: list = None):
    n = x.dim() - 2
    if n not in CONV_T_FN:
        raise NotImplementedError(f"ConvTranspose over {n} spatial axes (ember runs 1, 2 or 3)")
    win = window(n, kernel_shape or w.shape[2:], strides, dilations, pads, auto_pad)
    out_pad = list(output_padding or [0] * n)[:n]
    begin, end = _conv_transpose_pads(win, list(x.shape[2:]), out_pad, output_shape)
    ct = compute_dtype(x)
    # the full (unpadded) transposed convolution, then crop pads / extend by output_padding
    y = CONV_T_FN[n](x.to(ct), w.to(ct), None, stride=win.strides, padding=0, groups=group,
                     dilation=win.dilations)
    y = F.pad(y, torch_pad_arg([-p for p in begin], [op_ - p for p, op_ in zip(end, out_pad)]))
    if b is not None:
        y = y + _channel_view(b.to(ct), y.dim())
    return y.to(x.dtype)


def _conv_transpose_pads(win, in_sizes: list, out_pad: list, output_shape):
    n = win.n
    if output_shape is None and win.pads is None and win.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        output_shape = [in_sizes[i] * win.strides[i] for i in range(n)]
    if output_shape is None:
        pads = win.pads or [0] * (2 * n)
        return list(pads[:n]), list(pads[n:])
    output_shape = list(output_shape)[-n:]
    begin, end = [], []
    for i in range(n):
        total = win.strides[i] * (in_sizes[i] - 1) + out_pad[i] + win.span(i) - int(output_shape[i])
        # SAME_UPPER puts the smaller half first; every other mode puts it last
        bb, ee = same_pads(total, "SAME_UPPER" if win.auto_pad == "SAME_UPPER" else "SAME_LOWER")
        begin.append(bb)
        end.append(ee)
    return begin, end


# -- DeformConv -----------------------------------------------------------------------------------
def _bilinear_zero_outside(img: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Sample img (N, C, H, W) at float points ys/xs (N, P): bilinear, corners outside read as 0 -> (N, C, P)."""
    N, C, H, W = img.shape
    flat = img.reshape(N, C, H * W)
    y0, x0 = torch.floor(ys), torch.floor(xs)
    out = torch.zeros(N, C, ys.shape[1], dtype=img.dtype, device=img.device)
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            wgt = (1 - (ys - yy).abs()) * (1 - (xs - xx).abs())
            ok = (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
            idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).long()
            vals = torch.gather(flat, 2, idx.unsqueeze(1).expand(N, C, -1))
            out = out + vals * (wgt * ok).unsqueeze(1)
    return out


@op("DeformConv", kind="anchor")
def deform_conv(x, w, offset, b=None, mask=None, *, dilations: list = None, group: int = 1,
                kernel_shape: list = None, offset_group: int = 1, pads: list = None, strides: list = None):
    if x.dim() != 4:
        raise NotImplementedError("DeformConv over other than 2 spatial axes")
    ct = compute_dtype(x)
    xf, wf, off = x.to(ct), w.to(ct), offset.to(ct)
    N, C, H, W_ = x.shape
    M = w.shape[0]
    kh, kw = kernel_shape or w.shape[2:]
    win = window(2, [kh, kw], strides, dilations, pads)
    oh, ow = offset.shape[2:]
    G = offset_group
    off = off.reshape(N, G, kh, kw, 2, oh, ow)
    dev = x.device
    base_h = (torch.arange(oh, device=dev, dtype=ct) * win.strides[0] - win.pads[0]).view(1, 1, oh, 1)
    base_w = (torch.arange(ow, device=dev, dtype=ct) * win.strides[1] - win.pads[1]).view(1, 1, 1, ow)
    k_h = (torch.arange(kh, device=dev, dtype=ct) * win.dilations[0]).view(kh, 1, 1, 1)
    k_w = (torch.arange(kw, device=dev, dtype=ct) * win.dilations[1]).view(1, kw, 1, 1)
    ys = (base_h + k_h) + off[:, :, :, :, 0]  # (N, G, kh, kw, oh, ow)
    xs = (base_w + k_w) + off[:, :, :, :, 1]
    cg = C // G
    cols = []
    for g in range(G):
        s = _bilinear_zero_outside(xf[:, g * cg:(g + 1) * cg], ys[:, g].reshape(N, -1), xs[:, g].reshape(N, -1))
        s = s.reshape(N, cg, kh, kw, oh, ow)
        if mask is not None:
            s = s * mask.to(ct).reshape(N, G, kh, kw, oh, ow)[:, g].unsqueeze(1)
        cols.append(s)
    cols = torch.cat(cols, 1).reshape(N, group, C // group * kh * kw, oh * ow)
    wg = wf.reshape(group, M // group, -1)
    y = torch.einsum("gmk,ngkp->ngmp", wg, cols).reshape(N, M, oh, ow)
    if b is not None:
        y = y + b.to(ct).view(1, -1, 1, 1)
    return y.to(x.dtype)


# -- Col2Im ---------------------------------------------------------------------------------------
@op("Col2Im", kind="other", host_inputs=("image_shape", "block_shape"))
def col2im(x, image_shape, block_shape, *, dilations: list = None, pads: list = None, strides: list = None):
    img = [int(v) for v in image_shape.tolist()]
    blk = [int(v) for v in block_shape.tolist()]
    n = len(img)
    win = window(n, blk, strides, dilations, pads)
    begin, end = win.pads[:n], win.pads[n:]
    padded = [img[i] + begin[i] + end[i] for i in range(n)]
    outs = [(padded[i] - win.span(i)) // win.strides[i] + 1 for i in range(n)]
    N, CK, L = x.shape
    if n == 2 and x.is_floating_point():  # torch's fold gathers per output pixel: deterministic on CUDA
        return _crop(F.fold(x, padded, blk, dilation=win.dilations, stride=win.strides), begin, img)
    K = math.prod(blk)
    C = CK // K
    # target flat index (in the padded image) of every (kernel offset, block position) pair
    dev = x.device
    idx = torch.zeros([1] * (2 * n), dtype=torch.int64, device=dev)
    for i in range(n):
        k_pos = torch.arange(blk[i], device=dev) * win.dilations[i]
        o_pos = torch.arange(outs[i], device=dev) * win.strides[i]
        shape_k = [1] * (2 * n)
        shape_k[i] = blk[i]
        shape_o = [1] * (2 * n)
        shape_o[n + i] = outs[i]
        idx = idx * padded[i] + k_pos.view(shape_k) + o_pos.view(shape_o)
    idx = idx.reshape(K * math.prod(outs))
    cols = x.reshape(N, C, K * L)
    y = torch.zeros(N, C, math.prod(padded), dtype=x.dtype, device=dev)
    y.index_add_(2, idx, cols)
    return _crop(y.reshape(N, C, *padded), begin, img)


def _crop(y: torch.Tensor, begin: list, size: list) -> torch.Tensor:
    return y[(slice(None), slice(None), *(slice(b, b + s) for b, s in zip(begin, size)))]


# -- shape rules ----------------------------------------------------------------------------------
def _conv_like_rule(out_dtype=None):
    def rule(node: Node):
        x, w = node.inputs[0], node.inputs[1] if node.op != "QLinearConv" else node.inputs[3]
        dt = out_dtype or (node.inputs[7].dtype if node.op == "QLinearConv" else x.dtype)
        if x.shape is None or w.shape is None:
            return [(dt, None)]
        n = len(x.shape) - 2
        a = node.attrs
        win = window(n, a.get("kernel_shape") or w.shape[2:], a.get("strides"), a.get("dilations"),
                     a.get("pads"), a.get("auto_pad", "NOTSET"))
        return [(dt, (x.shape[0], w.shape[0], *(output_size(win, i, x.shape[2 + i]) for i in range(n))))]
    return rule


shape_rule("Conv", "QLinearConv")(_conv_like_rule())
shape_rule("ConvInteger")(_conv_like_rule(DType.INT32))


@shape_rule("ConvTranspose")
def _conv_transpose_rule(node: Node):
    x, w = node.inputs[0], node.inputs[1]
    if x.shape is None or w.shape is None:
        return [(x.dtype, None)]
    n = len(x.shape) - 2
    a = node.attrs
    group = a.get("group", 1)
    win = window(n, a.get("kernel_shape") or w.shape[2:], a.get("strides"), a.get("dilations"),
                 a.get("pads"), a.get("auto_pad", "NOTSET"))
    out_pad = list(a.get("output_padding") or [0] * n)
    if a.get("output_shape"):
        spatial = tuple(int(d) for d in a["output_shape"][-n:])
    elif win.pads is None and win.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        spatial = tuple(x.shape[2 + i] * win.strides[i] for i in range(n))
    else:
        pads = win.pads or [0] * (2 * n)
        spatial = tuple(win.strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + win.span(i) - pads[i] - pads[n + i]
                        for i in range(n))
    return [(x.dtype, (x.shape[0], w.shape[1] * group, *spatial))]


@shape_rule("DeformConv")
def _deform_conv_rule(node: Node):
    x, w, off = node.inputs[0], node.inputs[1], node.inputs[2]
    if x.shape is None or w.shape is None or off.shape is None:
        return [(x.dtype, None)]
    return [(x.dtype, (x.shape[0], w.shape[0], *off.shape[2:]))]
