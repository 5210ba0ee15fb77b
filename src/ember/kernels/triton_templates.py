"""Triton GEMM and implicit-GEMM convolution templates with fused epilogues, as tactics.

    triton.gemm[128x256x64,w8,s3]       ember.Gemm: A [.., K] @ B [K, N], leading dims folded into M
    triton.conv_nhwc[128x64x64,w4,s4]   Conv / ember.Conv 2-D, groups 1: implicit GEMM over NHWC,
                                        M = N*OH*OW, N = Cout, K = KH*KW*Cin (ordered kh, kw, c)

Each tile configuration (BLOCK_M x BLOCK_N x BLOCK_K, warps, pipeline stages) is its own tactic,
so the builder's tuner times them against cuBLAS/cuDNN and keeps the fastest per node. Every
configuration is correct for every shape: M, N and K edges are masked. Accumulation is fp32 and the
epilogue (alpha, bias, activation, residual in either order) runs on the accumulator before the
one rounding to the output dtype.

Kernels take every stride as an argument: Triton specializes a stride of 1 to a constant, so the
contiguous dimension vectorizes and any other layout is still correct. Prepared weights keep the
op's logical shape (the run functions accept unprepared weights too) with memory laid out for the
kernel: GEMM B as K x N row-major, conv W as [KH][KW][Cin][Cout].

Without triton the module imports and registers nothing. Under TRITON_INTERPRET=1 the kernels run
on CPU tensors (how the tests run on a machine without a GPU).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from ..ir.dtypes import DType
from ..ir.graph import Node
from .kernel_store import note
from .template_choice import CONV_CONFIGS, GEMM_CONFIGS, TEMPLATES, TileConfig  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from . import Choice
    from .compile_pool import CompileSpec

try:
    import triton
    import triton.language as tl

    from . import triton_math as tm
except ImportError:  # CPU machines without triton: nothing to register
    triton = tl = tm = None


def _jit(fn: Callable) -> Callable:
    return fn if triton is None else triton.jit(fn)


# -- epilogue -----------------------------------------------------------------------------------------
# Each activation's ACT code and parameters are stated on its op (OpDef.epilogue, ember.ops); the
# codes are the cases of _activation below (3 is Gelu's tanh form, chosen by its attributes).
def activation_code(act: str, keys: Optional[list], values: Optional[list]) -> Optional[tuple[int, float, float]]:
    """(ACT code, p0, p1) for the kernel, or None when the activation or one of its attributes is not supported."""
    try:  # cached: the run functions ask on every call
        return _activation_code(act or "", tuple(keys or ()), tuple(values or ()))
    except TypeError:  # an unhashable attribute value: not one the kernel knows
        return None


@functools.lru_cache(maxsize=256)
def _activation_code(act: str, keys: tuple, values: tuple) -> Optional[tuple[int, float, float]]:
    from ..ops import get, known_ops

    a = dict(zip(keys, values))
    if not act:
        return None if a else (0, 0.0, 0.0)
    spec = get(act).epilogue if act in known_ops() else None
    if spec is None or any(k not in spec.attrs for k in a):
        return None
    try:
        return spec.kernel_params(a)
    except (TypeError, ValueError):
        return None


@_jit
def _activation(y, ACT: tl.constexpr, p0, p1):
    if ACT == 1:
        y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, as in torch.relu
    elif ACT == 2:  # Gelu, erf form
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 3:  # Gelu, tanh form
        y = 0.5 * y * (1.0 + tm.tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
    elif ACT == 4:
        y = tl.sigmoid(y)
    elif ACT == 5:
        y = tm.tanh(y)
    elif ACT == 6:  # LeakyRelu(alpha=p0)
        y = tl.where(y >= 0.0, y, y * p0)
    elif ACT == 7:  # Swish(alpha=p0)
        y = y * tl.sigmoid(p0 * y)
    elif ACT == 8:  # HardSwish
        y = y * tl.minimum(tl.maximum(y / 6.0 + 0.5, 0.0), 1.0)
    elif ACT == 9:  # HardSigmoid(alpha=p0, beta=p1)
        y = tl.minimum(tl.maximum(p0 * y + p1, 0.0), 1.0)
    elif ACT == 10:  # Elu(alpha=p0)
        y = tl.where(y > 0.0, y, p0 * tm.expm1(y))
    elif ACT == 11:  # Clip(min=p0, max=p1)
        y = tl.minimum(tl.maximum(y, p0, propagate_nan=tl.PropagateNan.ALL), p1, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 12:  # Softplus with torch's threshold of 20
        y = tl.where(y > 20.0, y, tm.log1p(tl.exp(tl.minimum(y, 20.0))))
    elif ACT == 13:  # Mish
        y = y * tm.tanh(tl.where(y > 20.0, y, tm.log1p(tl.exp(tl.minimum(y, 20.0)))))
    return y


@_jit
def _epilogue(y, res_ptrs, mask, HAS_RES: tl.constexpr, ACT: tl.constexpr, AFTER: tl.constexpr, p0, p1):
    """act(y) + residual, or act(y + residual) with AFTER; all in fp32."""
    if HAS_RES:
        r = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        if AFTER:
            y = _activation(y + r, ACT, p0, p1)
        else:
            y = _activation(y, ACT, p0, p1) + r
    else:
        y = _activation(y, ACT, p0, p1)
    return y


@_jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's interpreter multiplies bf16 as its raw uint16 bits: widen first (tests only)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@_jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles sweep the columns together, so B tiles stay in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    group = pid // width
    size = tl.minimum(grid_m - group * GROUP_M, GROUP_M)
    pid_m = group * GROUP_M + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


# -- GEMM ---------------------------------------------------------------------------------------------
@_jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, M, N, K,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_bias,
                 stride_rm, stride_rn, alpha, p0, p1,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, AFTER: tl.constexpr,
                 EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n_mask = offs_n < N
    # rows wrap around M: every A load is in bounds without a mask (the store masks them)
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            if EVEN_N:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_ok = rk < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, PREC, UPCAST)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    y = acc * alpha
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    y = _epilogue(y, res_ptr + rows * stride_rm + offs_n[None, :] * stride_rn, mask, HAS_RES, ACT, AFTER, p0, p1)
    tl.store(c_ptr + rows * stride_cm + offs_n[None, :] * stride_cn, y.to(c_ptr.dtype.element_ty), mask=mask)


# -- implicit-GEMM convolution ----------------------------------------------------------------------
@_jit
def _conv_kernel(x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr, M, COUT, H, W, OH, OW,
                 sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw, srn, src, srh, srw,
                 stride_bias, p0, p1,
                 CIN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                 PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, AFTER: tl.constexpr,
                 FLAT_K: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, COUT, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_mask = offs_m < M
    n_mask = offs_n < COUT
    img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_rows = x_ptr + img.to(tl.int64) * sxn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if FLAT_K:
        # few input channels (a first layer's Cin=3): K = KH*KW*Cin gathered as one flat range
        KTOT: tl.constexpr = KH * KW * CIN
        for k0 in range(0, (KTOT + BK - 1) // BK):
            kk = k0 * BK + rk
            k_ok = kk < KTOT
            c = kk % CIN
            kw = (kk // CIN) % KW
            kh = kk // (CIN * KW)
            ih = ih0[:, None] + kh[None, :] * DH
            iw = iw0[:, None] + kw[None, :] * DW
            ok = m_mask[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_rows[:, None] + ih * sxh + iw * sxw + c[None, :] * sxc, mask=ok, other=0.0)
            w_off = kh * swh + kw * sww + c * swc
            b = tl.load(w_ptr + w_off[:, None] + offs_n[None, :] * swo, mask=k_ok[:, None] & n_mask[None, :],
                        other=0.0)
            acc = _dot(a, b, acc, PREC, UPCAST)
    else:
        # one loop over (tap, channel chunk), so the pipeliner overlaps loads across taps
        CHUNKS: tl.constexpr = (CIN + BK - 1) // BK
        for it in range(0, KH * KW * CHUNKS):
            tap = it // CHUNKS
            c = (it % CHUNKS) * BK + rk
            c_ok = c < CIN
            kh = tap // KW
            kw = tap % KW
            ih = ih0 + kh * DH
            iw = iw0 + kw * DW
            row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_rows[:, None] + (ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc
            b_ptrs = w_ptr + kh * swh + kw * sww + c[:, None] * swc + offs_n[None, :] * swo
            if CIN % BK == 0:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                if EVEN_N:
                    b = tl.load(b_ptrs)
                else:
                    b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_ok[:, None] & n_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, PREC, UPCAST)
    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    img64 = img.to(tl.int64)
    mask = m_mask[:, None] & n_mask[None, :]
    res_ptrs = res_ptr + (img64 * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src
    y = _epilogue(y, res_ptrs, mask, HAS_RES, ACT, AFTER, p0, p1)
    y_ptrs = y_ptr + (img64 * syn + oh * syh + ow * syw)[:, None] + offs_n[None, :] * syc
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


# -- tile configurations (kernels/template_choice.py: the lists, and which of them a shape gets) ------
@dataclass
class Launch:
    """One planned kernel launch. Calling it launches; :meth:`spec` says what its compile needs, so
    the builder can compile it ahead of time in another process (kernels/compile_pool.py)."""

    kernel: Any  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    meta: dict[str, Any]  # constexprs and launch options

    def __call__(self) -> None:
        note(self.kernel[self.grid](*self.args, **self.meta))

    def spec(self) -> "CompileSpec":
        from .compile_pool import CompileSpec

        return CompileSpec.of(self.kernel, self.args, self.meta)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_I32 = 2 ** 31 - 1


def _dot_modes(dtype: torch.dtype) -> dict[str, Any]:
    # fp32 (tests only: applies never claims it) multiplies exactly; 16-bit inputs ignore PREC
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return {"PREC": "ieee" if dtype == torch.float32 else "tf32", "UPCAST": upcast}


def _reference(op: str, args: list, attrs: dict) -> torch.Tensor:
    """The op's reference function: for inputs a template does not cover (still correct)."""
    from ..ops import get

    od = get(op)
    return od.fn(*args, **{k: v for k, v in attrs.items() if k in od.attrs})


def _bias_vector(bias: Optional[torch.Tensor], n: int) -> "tuple[Optional[torch.Tensor], int] | None":
    """(flat bias, its stride: 0 for a broadcast scalar), or None when it is not a per-column vector."""
    if bias is None:
        return None, 0
    if bias.numel() not in (1, n) or bias.dim() > 1 and any(d != 1 for d in bias.shape[:-1]):
        return None
    flat = bias.reshape(-1)
    return flat, (0 if flat.numel() == 1 and n != 1 else flat.stride(0))


def gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
         residual: Optional[torch.Tensor] = None, *, trans_b: int = 0, alpha: float = 1.0, activation: str = "",
         act_keys: Optional[list] = None, act_values: Optional[list] = None, act_after_residual: int = 0,
         config: TileConfig = GEMM_CONFIGS[0], **_: Any) -> torch.Tensor:
    """ember.Gemm with a 2-D ``b`` ([N, K] with trans_b) in one Triton kernel."""
    attrs = dict(trans_b=trans_b, alpha=alpha, activation=activation, act_keys=act_keys, act_values=act_values,
                 act_after_residual=act_after_residual)
    planned = gemm_launch(a, b, bias, residual, config=config, **attrs)
    if planned is None:
        return _reference("ember.Gemm", [a, b, bias, residual], attrs)
    c, launch = planned
    if launch is not None:
        launch()
    return c


def gemm_launch(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, *, trans_b: int = 0, alpha: float = 1.0,
                activation: str = "", act_keys: Optional[list] = None, act_values: Optional[list] = None,
                act_after_residual: int = 0, config: TileConfig = GEMM_CONFIGS[0],
                **_: Any) -> "tuple[torch.Tensor, Optional[Launch]] | None":
    """(output, the launch that fills it; None when empty), or None when the template does not cover
    these inputs. Plans without running: the builder compiles a plan's kernel ahead of time."""
    act = activation_code(activation, act_keys, act_values)
    k = a.shape[-1] if a.dim() >= 1 else -1
    n = b.shape[0] if trans_b else b.shape[-1]
    bv = _bias_vector(bias, n) if b.dim() == 2 and (bias is None or bias.dim() <= a.dim()) else None
    if (act is None or a.dim() < 2 or b.dim() != 2 or (b.shape[1] if trans_b else b.shape[0]) != k or bv is None
            or a.dtype not in _DTYPES or b.dtype != a.dtype or a.numel() > _I32
            or (residual is not None and tuple(residual.shape) != tuple(a.shape[:-1]) + (n,))):
        return None
    lead = a.shape[:-1]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c.view(*lead, n), None
    sbk, sbn = (b.stride(1), b.stride(0)) if trans_b else (b.stride(0), b.stride(1))
    r2 = residual.reshape(m, n) if residual is not None else c
    code, p0, p1 = act
    cfg = config
    grid = (-(-m // cfg.bm) * -(-n // cfg.bn),)  # not triton.cdiv: a jit function, slow to call from Python
    launch = Launch(_gemm_kernel, grid, (
        a2, b, c, bv[0] if bias is not None else c, r2, m, n, k,
        a2.stride(0), a2.stride(1), sbk, sbn, c.stride(0), c.stride(1), bv[1], r2.stride(0), r2.stride(1),
        float(alpha), p0, p1), dict(
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=code, AFTER=bool(act_after_residual),
        EVEN_K=k % cfg.bk == 0, EVEN_N=n % cfg.bn == 0, **_dot_modes(a.dtype),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, num_warps=cfg.warps, num_stages=cfg.stages))
    return c.view(*lead, n), launch


def conv_geometry(attrs: dict, w_shape: tuple, in_hw: tuple) -> "tuple[tuple[int, ...], ...] | None":
    """(strides, begin pads, dilations, output size) of a 2-D conv with ONNX padding rules, or None."""
    def t(v: Any) -> Any:
        return tuple(v) if isinstance(v, (list, tuple)) else v

    return _conv_geometry(attrs.get("auto_pad", "NOTSET") or "NOTSET", t(attrs.get("kernel_shape")),
                          t(attrs.get("strides")), t(attrs.get("dilations")), t(attrs.get("pads")),
                          tuple(w_shape), tuple(int(d) for d in in_hw))


@functools.lru_cache(maxsize=4096)
def _conv_geometry(auto_pad: str, kernel: Any, strides: Any, dilations: Any, pads: Any, w_shape: tuple,
                   in_hw: tuple) -> "tuple[tuple[int, ...], ...] | None":
    from ..ops.nn import AUTO_PADS, resolve_pads, window

    if auto_pad not in AUTO_PADS:
        return None
    win = window(2, kernel or w_shape[2:], strides, dilations, pads, auto_pad)
    if (list(win.kernel) != list(w_shape[2:]) or len(win.strides) != 2 or len(win.dilations) != 2
            or (win.pads is not None and len(win.pads) != 4)):
        return None
    begin, end = resolve_pads(win, in_hw)
    out = [(int(in_hw[i]) + begin[i] + end[i] - win.span(i)) // win.strides[i] + 1 for i in range(2)]
    if min(win.strides + win.dilations) < 1 or min(begin) < 0 or min(out) < 1:
        return None
    return tuple(win.strides), tuple(begin), tuple(win.dilations), tuple(out)


def conv2d(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None, *, config: TileConfig = CONV_CONFIGS[0],
           **attrs: Any) -> torch.Tensor:
    """Conv / ember.Conv (2-D, group 1) as one implicit-GEMM Triton kernel; output channels_last."""
    planned = conv_launch(x, w, bias, residual, config=config, **attrs)
    if planned is None:
        return _reference("ember.Conv", [x, w, bias, residual], attrs)
    y, launch = planned
    if launch is not None:
        launch()
    return y


def conv_launch(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, *, config: TileConfig = CONV_CONFIGS[0],
                **attrs: Any) -> "tuple[torch.Tensor, Optional[Launch]] | None":
    """(output, the launch that fills it; None when empty), or None when the template does not cover
    these inputs (the reference function then runs, and raises the error that names what is wrong)."""
    act = activation_code(attrs.get("activation", ""), attrs.get("act_keys"), attrs.get("act_values"))
    try:
        geom = conv_geometry(attrs, tuple(w.shape), tuple(x.shape[2:])) if x.dim() == 4 and w.dim() == 4 else None
    except (ValueError, TypeError, IndexError):
        geom = None
    cout = w.shape[0]
    bv = _bias_vector(bias, cout)
    if (act is None or geom is None or attrs.get("group", 1) != 1 or x.shape[1] != w.shape[1] or bv is None
            or x.dtype not in _DTYPES or w.dtype != x.dtype or x.numel() > _I32):
        return None
    (sh, sw), (ph, pw), (dh, dw), (oh, ow) = geom
    nb, cin, h, wd = x.shape
    if residual is not None and tuple(residual.shape) != (nb, cout, oh, ow):
        return None
    cfg = config
    flat = 2 * cin <= cfg.bk
    if not flat and x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)  # channel loads vectorize along C
    y = torch.empty((nb, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    m = nb * oh * ow
    if m == 0 or cout == 0:
        return y, None
    r = residual if residual is not None else y
    code, p0, p1 = act
    grid = (-(-m // cfg.bm) * -(-cout // cfg.bn),)
    launch = Launch(_conv_kernel, grid, (
        x, w, y, bv[0] if bias is not None else y, r, m, cout, h, wd, oh, ow,
        *x.stride(), *w.stride(), *y.stride(), *r.stride(), bv[1], p0, p1), dict(
        CIN=cin, KH=w.shape[2], KW=w.shape[3], SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=code,
        AFTER=bool(attrs.get("act_after_residual", 0)), FLAT_K=flat, EVEN_N=cout % cfg.bn == 0,
        **_dot_modes(x.dtype), BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m,
        num_warps=cfg.warps, num_stages=cfg.stages))
    return y, launch


# -- tactics: applicability and weight preparation ----------------------------------------------------
_HALF = (DType.FLOAT16, DType.BFLOAT16)


def _input(node: Node, i: int):
    return node.inputs[i] if len(node.inputs) > i else None


def _epilogue_ok(node: Node, n: Any) -> bool:
    a = node.attrs
    if activation_code(a.get("activation", ""), a.get("act_keys"), a.get("act_values")) is None:
        return False
    bias = _input(node, 2)
    if bias is not None:
        if bias.shape is None or not all(isinstance(d, int) for d in bias.shape):
            return False
        if any(d != 1 for d in bias.shape[:-1]) or (bias.shape and bias.shape[-1] not in (1, n)):
            return False
    res = _input(node, 3)
    return res is None or res.shape is not None


def gemm_applies(node: Node, device: torch.device) -> bool:
    a, b = _input(node, 0), _input(node, 1)
    if triton is None or device.type != "cuda" or len(node.outputs) != 1 or a is None or b is None:
        return False
    if a.rank is None or a.rank < 2 or a.dtype not in _HALF or b.dtype != a.dtype or not b.is_const:
        return False
    if b.shape is None or len(b.shape) != 2 or not all(isinstance(d, int) and d > 0 for d in b.shape):
        return False
    trans = node.attrs.get("trans_b", 0)
    k, n = (b.shape[1], b.shape[0]) if trans else (b.shape[0], b.shape[1])
    if isinstance(a.shape[-1], int) and a.shape[-1] != k:
        return False
    return isinstance(node.attrs.get("alpha", 1.0), (int, float)) and _epilogue_ok(node, n)


def conv_applies(node: Node, device: torch.device) -> bool:
    x, w = _input(node, 0), _input(node, 1)
    a = node.attrs
    if triton is None or device.type != "cuda" or len(node.outputs) != 1 or x is None or w is None:
        return False
    if x.rank != 4 or x.dtype not in _HALF or w.dtype != x.dtype or not w.is_const or a.get("group", 1) != 1:
        return False
    if w.shape is None or len(w.shape) != 4 or not all(isinstance(d, int) and d > 0 for d in w.shape):
        return False
    if isinstance(x.shape[1], int) and x.shape[1] != w.shape[1]:
        return False
    hw = tuple(d if isinstance(d, int) else 1 << 10 for d in x.shape[2:])  # pads/strides are checked here
    try:
        if conv_geometry(a, tuple(w.shape), hw) is None:
            return False
    except Exception:
        return False
    return (node.op == "ember.Conv" or _input(node, 3) is None) and _epilogue_ok(node, w.shape[0])


def _torch_dtype(node: Node) -> Optional[torch.dtype]:
    from ..ops.torch_types import to_torch

    dt = node.inputs[0].dtype
    return to_torch(dt) if dt is not None else None


def prepare_gemm_weight(node: Node, consts: dict[str, torch.Tensor]) -> dict[int, tuple[str, torch.Tensor]]:
    """B with its logical shape kept, memory K x N row-major (the layout the kernel streams)."""
    b = node.inputs[1]
    if b.name not in consts:
        return {}
    w = consts[b.name].to(_torch_dtype(node) or consts[b.name].dtype)
    if node.attrs.get("trans_b", 0):  # a key per orientation: a square weight may serve both
        return {1: (b.name + "@tgemm_t", w.t().contiguous().t())}
    return {1: (b.name + "@tgemm", w.contiguous())}


def prepare_conv_weight(node: Node, consts: dict[str, torch.Tensor]) -> dict[int, tuple[str, torch.Tensor]]:
    """W as [Cout, Cin, KH, KW] with memory [KH][KW][Cin][Cout]: K rows of Cout contiguous columns."""
    w = node.inputs[1]
    if w.name not in consts or consts[w.name].dim() != 4:
        return {}
    t = consts[w.name].to(_torch_dtype(node) or consts[w.name].dtype)
    return {1: (w.name + "@tconv", t.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1))}


def _gemm_run(cfg: TileConfig) -> Callable[[list, dict, Any], torch.Tensor]:
    def run(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
        return gemm(*args[:4], config=cfg, **{k: v for k, v in attrs.items() if not k.startswith("_")})
    return run


def _conv_run(cfg: TileConfig) -> Callable[[list, dict, Any], torch.Tensor]:
    def run(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
        return conv2d(*args[:4], config=cfg, **{k: v for k, v in attrs.items() if not k.startswith("_")})
    return run


# -- planning and registration ----------------------------------------------------------------------
def launch_of(tactic_name: str, args: list, attrs: dict) -> Optional[Launch]:
    """The launch ``tactic_name`` makes on ``args`` (prepared weights), without running it; None for
    tactics that are not templates or inputs a template hands to the reference."""
    spec = TEMPLATES.get(tactic_name)
    if spec is None:
        return None
    kind, cfg = spec
    if kind in ("qgemm", "qconv"):  # the INT8/FP8 templates (quantized.py)
        from .quantized import launch_of as quantized_launch_of

        return quantized_launch_of(tactic_name, args, attrs)
    clean = {k: v for k, v in attrs.items() if not k.startswith("_")}
    planned = (gemm_launch if kind == "gemm" else conv_launch)(*args[:4], config=cfg, **clean)
    return None if planned is None else planned[1]


_GEMM_CODE = (_gemm_kernel, _epilogue, _activation, _dot, _tile_ids, gemm_launch)
_CONV_CODE = (_conv_kernel, _epilogue, _activation, _dot, _tile_ids, conv_launch)


def gemm_choice(cfg: TileConfig) -> "Choice":
    from . import Choice

    return Choice(f"triton.gemm[{cfg}]", ("ember.Gemm",), gemm_applies, _gemm_run(cfg), prepare_gemm_weight,
                  family="triton.gemm", params={"tile": cfg}, code=_GEMM_CODE)


def conv_choice(cfg: TileConfig) -> "Choice":
    from . import Choice

    return Choice(f"triton.conv_nhwc[{cfg}]", ("Conv", "ember.Conv"), conv_applies, _conv_run(cfg),
                  prepare_conv_weight, family="triton.conv_nhwc", params={"tile": cfg}, code=_CONV_CODE)


def _register() -> None:
    from . import FAMILIES, TACTICS

    for kind, configs, make in (("gemm", GEMM_CONFIGS, gemm_choice), ("conv", CONV_CONFIGS, conv_choice)):
        for cfg in configs:
            c = make(cfg)
            TEMPLATES[c.name] = (kind, cfg)
            TACTICS[c.name] = c
    # a name with a tile configuration that is not (or no longer) in the lists still binds
    FAMILIES["triton.gemm"] = lambda text: gemm_choice(TileConfig.parse(text))
    FAMILIES["triton.conv_nhwc"] = lambda text: conv_choice(TileConfig.parse(text))


if triton is not None:
    _register()
