"""Triton INT8/FP8 GEMM and implicit-GEMM convolution templates for ember.QGemm / ember.QConv.

One kernel per anchor, its prologue and epilogue fused in:

- prologue: a float activation is quantized as it is loaded (``round_half_even(a * smooth / a_scale)
  + a_zero_point``, saturated; or E4M3), an int8 one read as is, a uint8 one shifted into int8
  (``q - 128``; its zero point with it);
- the product: ``tl.dot`` of int8 tiles into an int32 accumulator (IMMA), or of E4M3 tiles into fp32;
- epilogue: the zero point's correction (``acc - zp * colsum(W)``: padding and masked lanes carry the
  zero point, so it holds everywhere), dequantize (``a_scale * w_scale[n]``), bias, activation and
  residual in either order (the float templates' ``_epilogue``), then requantize (int8, uint8 or
  E4M3) or store in the float output type.

Weights are prepared once: GEMM B as K x N row-major, conv W as [KH][KW][Cin][Cout] memory, and
the per-column sums of the integer weights. Every shape is correct (edges masked); numerics are
those of the ops' reference functions up to the fp32 rounding of the epilogue.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from .kernel_store import note
from .template_choice import TileConfig
from .triton_templates import Launch, _activation, _bias_vector, _epilogue, _tile_ids, activation_code, conv_geometry

try:
    import triton
    import triton.language as tl

    from . import triton_math as tm
except ImportError:  # CPU machines without triton: nothing to register
    triton = tl = tm = None


def _jit(fn: Any) -> Any:
    return fn if triton is None else triton.jit(fn)


# int8 tiles: K chunks of 64/128 (IMMA k is 32); FP8 shares them
QGEMM_CONFIGS = [TileConfig(128, 256, 128, 8, 3), TileConfig(128, 128, 128, 8, 4), TileConfig(128, 128, 64, 4, 4),
                 TileConfig(64, 128, 128, 4, 4), TileConfig(128, 64, 128, 4, 4), TileConfig(64, 64, 128, 4, 4)]
QCONV_CONFIGS = [TileConfig(128, 128, 64, 8, 3), TileConfig(128, 64, 64, 4, 4), TileConfig(256, 64, 64, 8, 3),
                 TileConfig(128, 128, 128, 8, 3), TileConfig(64, 128, 64, 4, 4), TileConfig(128, 64, 32, 4, 4)]
OUT_FLOAT, OUT_INT8, OUT_UINT8, OUT_FP8 = 0, 1, 2, 3


@_jit
def _quantize(v, a_zp, FP8: tl.constexpr, UINT8: tl.constexpr):
    """fp32 values already divided by their scale -> int8 (uint8 shifted by -128) or E4M3."""
    if FP8:
        q = tm.e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0)).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    else:
        r = tm.rint(tl.minimum(tl.maximum(v, -512.0), 512.0)) + a_zp
        if UINT8:
            q = (tl.minimum(tl.maximum(r, 0.0), 255.0) - 128.0).to(tl.int8)
        else:
            q = tl.minimum(tl.maximum(r, -128.0), 127.0).to(tl.int8)
    return q


@_jit
def _prologue(a, smooth, a_scale, a_zp, A_FLOAT: tl.constexpr, HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr,
              UINT8: tl.constexpr):
    """A loaded activation tile as the dot's operand (int8, or E4M3)."""
    if A_FLOAT:
        v = a.to(tl.float32)
        if HAS_SMOOTH:
            v = v * smooth
        q = _quantize(tl.math.div_rn(v, a_scale), a_zp, FP8, UINT8)
    elif UINT8:
        q = (a.to(tl.int32) - 128).to(tl.int8)
    else:
        q = a
    return q


@_jit
def _qdot(a, b, acc, FP8: tl.constexpr, UPCAST: tl.constexpr):
    if FP8:
        if UPCAST:  # Triton's interpreter has no E4M3 products: widen (every product is exact in fp32)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    return acc


@_jit
def _finish(acc, offs_n, n_mask, colsum_ptr, bscale_ptr, bias_ptr, stride_bias, a_scale, zp_eff, res_ptrs, mask,
            ys, y_zp, p0, p1, HAS_ZP: tl.constexpr, FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_RES: tl.constexpr, ACT: tl.constexpr, AFTER: tl.constexpr, OUT_MODE: tl.constexpr):
    """The accumulator through the epilogue: fp32 values, or quantized ones (OUT_MODE)."""
    if HAS_ZP:
        acc = acc - zp_eff * tl.load(colsum_ptr + offs_n, mask=n_mask, other=0)[None, :]
    scale = a_scale * tl.load(bscale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = _epilogue(y, res_ptrs, mask, HAS_RES, ACT, AFTER, p0, p1)
    if OUT_MODE == 1:
        y = tl.minimum(tl.maximum(tm.rint(tl.math.div_rn(y, ys)) + y_zp, -128.0), 127.0).to(tl.int8)
    elif OUT_MODE == 2:
        y = tl.minimum(tl.maximum(tm.rint(tl.math.div_rn(y, ys)) + y_zp, 0.0), 255.0).to(tl.uint8)
    elif OUT_MODE == 3:
        v = tl.minimum(tl.maximum(tl.math.div_rn(y, ys), -448.0), 448.0)
        y = tm.e4m3(v).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return y


@_jit
def _zero_points(azp_ptr, yzp_ptr, ys_ptr, HAS_ZP: tl.constexpr, HAS_YZP: tl.constexpr, UINT8: tl.constexpr,
                 OUT_MODE: tl.constexpr):
    """(the activation's zero point, it in the int8 domain, the output's zero point and scale); read from
    memory, never passed from the host: dynamic quantization computes them on the device."""
    if HAS_ZP:
        a_zp = tl.load(azp_ptr).to(tl.int32)
    else:
        a_zp = 0
    if UINT8:
        zp_eff = a_zp - 128
    else:
        zp_eff = a_zp
    if HAS_YZP:
        y_zp = tl.load(yzp_ptr).to(tl.float32)
    else:
        y_zp = 0.0
    if OUT_MODE != 0:
        ys = tl.load(ys_ptr).to(tl.float32)
    else:
        ys = 1.0
    return a_zp, zp_eff, y_zp, ys


@_jit
def _qgemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, smooth_ptr, bscale_ptr, colsum_ptr, ascale_ptr, ys_ptr,
                  azp_ptr, yzp_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  stride_bias, stride_rm, stride_rn, p0, p1,
                  A_FLOAT: tl.constexpr, UINT8: tl.constexpr, FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                  HAS_ZP: tl.constexpr, HAS_YZP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                  ACT: tl.constexpr, AFTER: tl.constexpr, OUT_MODE: tl.constexpr, UPCAST: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    n_mask = offs_n < N
    a_scale = tl.load(ascale_ptr).to(tl.float32)  # a tensor: dynamic quantization computes it at run time
    a_zp, zp_eff, y_zp, ys = _zero_points(azp_ptr, yzp_ptr, ys_ptr, HAS_ZP, HAS_YZP, UINT8, OUT_MODE)
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if FP8:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        k_ok = rk < K - k0
        # masked K lanes: the activation reads 0 (its zero point once quantized), the weight 0
        if A_FLOAT or FP8:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=a_zp)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            q = _prologue(a, sm, a_scale, a_zp, A_FLOAT, True, FP8, UINT8)
        else:
            q = _prologue(a, 1.0, a_scale, a_zp, A_FLOAT, False, FP8, UINT8)
        acc = _qdot(q, b, acc, FP8, UPCAST)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    y = _finish(acc, offs_n, n_mask, colsum_ptr, bscale_ptr, bias_ptr, stride_bias, a_scale, zp_eff,
                res_ptr + rows * stride_rm + offs_n[None, :] * stride_rn, mask, ys, y_zp, p0, p1, HAS_ZP, FP8,
                HAS_BIAS, HAS_RES, ACT, AFTER, OUT_MODE)
    tl.store(c_ptr + rows * stride_cm + offs_n[None, :] * stride_cn, y.to(c_ptr.dtype.element_ty), mask=mask)


@_jit
def _qconv_kernel(x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr, bscale_ptr, colsum_ptr, ascale_ptr, ys_ptr, azp_ptr,
                  yzp_ptr, M, COUT, H, W, OH, OW, sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw,
                  srn, src, srh, srw, stride_bias, p0, p1,
                  CIN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  A_FLOAT: tl.constexpr, UINT8: tl.constexpr, FP8: tl.constexpr, HAS_ZP: tl.constexpr,
                  HAS_YZP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                  AFTER: tl.constexpr,
                  OUT_MODE: tl.constexpr, FLAT_K: tl.constexpr, UPCAST: tl.constexpr,
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
    a_scale = tl.load(ascale_ptr).to(tl.float32)
    a_zp, zp_eff, y_zp, ys = _zero_points(azp_ptr, yzp_ptr, ys_ptr, HAS_ZP, HAS_YZP, UINT8, OUT_MODE)
    if FP8:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    # padding is the activation's real zero: 0.0 before quantizing, the zero point after
    if A_FLOAT or FP8:
        pad = 0.0
    else:
        pad = a_zp
    if FLAT_K:
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
            a = tl.load(x_rows[:, None] + ih * sxh + iw * sxw + c[None, :] * sxc, mask=ok, other=pad)
            w_off = kh * swh + kw * sww + c * swc
            b = tl.load(w_ptr + w_off[:, None] + offs_n[None, :] * swo, mask=k_ok[:, None] & n_mask[None, :],
                        other=0.0)
            acc = _qdot(_prologue(a, 1.0, a_scale, a_zp, A_FLOAT, False, FP8, UINT8), b, acc, FP8, UPCAST)
    else:
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
            a = tl.load(a_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=pad)
            b = tl.load(b_ptrs, mask=c_ok[:, None] & n_mask[None, :], other=0.0)
            acc = _qdot(_prologue(a, 1.0, a_scale, a_zp, A_FLOAT, False, FP8, UINT8), b, acc, FP8, UPCAST)
    img64 = img.to(tl.int64)
    mask = m_mask[:, None] & n_mask[None, :]
    res_ptrs = res_ptr + (img64 * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src
    y = _finish(acc, offs_n, n_mask, colsum_ptr, bscale_ptr, bias_ptr, stride_bias, a_scale, zp_eff, res_ptrs, mask,
                ys, y_zp, p0, p1, HAS_ZP, FP8, HAS_BIAS, HAS_RES, ACT, AFTER, OUT_MODE)
    y_ptrs = y_ptr + (img64 * syn + oh * syh + ow * syw)[:, None] + offs_n[None, :] * syc
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _quantize_rows_kernel(a_ptr, q_ptr, smooth_ptr, ascale_ptr, azp_ptr, M, K, stride_am, stride_ak,
                          HAS_SMOOTH: tl.constexpr, HAS_ZP: tl.constexpr, FP8: tl.constexpr, UINT8: tl.constexpr,
                          BM: tl.constexpr, BK: tl.constexpr):
    """An activation [M, K] quantized for a vendor GEMM: int8 (uint8 shifted to int8) or E4M3, row-major."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=mask, other=0)
    a_scale = tl.load(ascale_ptr).to(tl.float32)
    if HAS_ZP:
        a_zp = tl.load(azp_ptr).to(tl.int32)
    else:
        a_zp = 0
    if HAS_SMOOTH:
        sm = tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
        q = _prologue(a, sm, a_scale, a_zp, True, True, FP8, UINT8)
    else:
        q = _prologue(a, 1.0, a_scale, a_zp, True, False, FP8, UINT8)
    tl.store(q_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], q, mask=mask)


@_jit
def _dequant_kernel(acc_ptr, out_ptr, bias_ptr, res_ptr, bscale_ptr, colsum_ptr, ascale_ptr, ys_ptr, azp_ptr,
                    yzp_ptr, M, N, stride_bias, stride_rm, stride_rn, p0, p1,
                    UINT8: tl.constexpr, FP8: tl.constexpr, HAS_ZP: tl.constexpr, HAS_YZP: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, AFTER: tl.constexpr,
                    OUT_MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """A vendor GEMM's accumulator [M, N] (int32, or fp32 of E4M3 products) through the epilogue."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    acc = tl.load(acc_ptr + rows * N + offs_n[None, :], mask=mask, other=0)
    a_scale = tl.load(ascale_ptr).to(tl.float32)
    a_zp, zp_eff, y_zp, ys = _zero_points(azp_ptr, yzp_ptr, ys_ptr, HAS_ZP, HAS_YZP, UINT8, OUT_MODE)
    y = _finish(acc, offs_n, n_mask, colsum_ptr, bscale_ptr, bias_ptr, stride_bias, a_scale, zp_eff,
                res_ptr + rows * stride_rm + offs_n[None, :] * stride_rn, mask, ys, y_zp, p0, p1, HAS_ZP, FP8,
                HAS_BIAS, HAS_RES, ACT, AFTER, OUT_MODE)
    tl.store(out_ptr + rows * N + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


# -- planning launches ----------------------------------------------------------------------------------
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_I32 = 2 ** 31 - 1
FP8 = torch.float8_e4m3fn


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _scalar(t: Optional[torch.Tensor]) -> bool:
    return t is None or t.numel() == 1


def _or(t: Optional[torch.Tensor], other: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel does not read when ``t`` is absent (its constexpr says so)."""
    return t if t is not None else other


def out_mode(y_scale: Optional[torch.Tensor], y_zero_point: Optional[torch.Tensor], qtype: torch.dtype) -> int:
    if y_scale is None:
        return OUT_FLOAT
    if qtype == FP8:
        return OUT_FP8
    return OUT_UINT8 if y_zero_point is not None and y_zero_point.dtype == torch.uint8 else OUT_INT8


def _out_dtype(mode: int, output_dtype: int) -> torch.dtype:
    if mode == OUT_FLOAT:
        from ..ops.quant import dtype_of_attr
        from ..ops.torch_types import to_torch

        return to_torch(dtype_of_attr(output_dtype)) if output_dtype else torch.float32
    return {OUT_INT8: torch.int8, OUT_UINT8: torch.uint8, OUT_FP8: FP8}[mode]


def _common(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, a_zp: Optional[torch.Tensor],
            y_scale: Optional[torch.Tensor], y_zp: Optional[torch.Tensor], attrs: dict) -> "dict[str, Any] | None":
    """Constexprs and scalars both templates take, or None when these inputs are not theirs."""
    qtype = w.dtype
    act = activation_code(attrs.get("activation", ""), attrs.get("act_keys"), attrs.get("act_values"))
    if act is None or qtype not in (torch.int8, FP8) or not (_scalar(a_scale) and _scalar(a_zp) and _scalar(y_scale)
                                                               and _scalar(y_zp)):
        return None
    a_float = a.dtype in _FLOATS
    if not a_float and a.dtype not in ((FP8,) if qtype == FP8 else (torch.int8, torch.uint8)):
        return None
    fp8 = qtype == FP8
    uint8 = not fp8 and ((a.dtype == torch.uint8) or (a_float and a_zp is not None and a_zp.dtype == torch.uint8))
    mode = out_mode(y_scale, y_zp, qtype)
    code, p0, p1 = act
    # zero points are read in the kernel (a dynamic quantization's are computed on the device)
    return dict(A_FLOAT=a_float, UINT8=uint8, FP8=fp8, HAS_ZP=not fp8 and (a_zp is not None or uint8),
                HAS_YZP=not fp8 and y_zp is not None, ACT=code, AFTER=bool(attrs.get("act_after_residual", 0)),
                OUT_MODE=mode, UPCAST=fp8 and _interpreting(), _p=(p0, p1),
                _out=_out_dtype(mode, attrs.get("output_dtype", 0)))


def qgemm_launch(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                 a_zero_point: Optional[torch.Tensor] = None, y_scale: Optional[torch.Tensor] = None,
                 y_zero_point: Optional[torch.Tensor] = None, smooth: Optional[torch.Tensor] = None, *,
                 colsum: Optional[torch.Tensor] = None, config: TileConfig = QGEMM_CONFIGS[0],
                 **attrs: Any) -> "tuple[torch.Tensor, Optional[Launch]] | None":
    """(output, its launch) of ember.QGemm with ``b`` [K, N] (any strides; ``trans_b`` views [N, K]
    as [K, N]), or None when the template does not cover these inputs."""
    c = _common(a, b, a_scale, a_zero_point, y_scale, y_zero_point, attrs)
    if c is None or a.dim() < 2 or b.dim() != 2 or a.numel() > _I32:
        return None
    bk = b.t() if attrs.get("trans_b", 0) else b
    k, n = bk.shape
    bv = _bias_vector(bias, n)
    if a.shape[-1] != k or bv is None or (residual is not None and tuple(residual.shape) != tuple(a.shape[:-1]) + (n,)):
        return None
    if c["HAS_ZP"] and colsum is None:
        colsum = bk.to(torch.int32).sum(dim=0)
    lead = a.shape[:-1]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    out = torch.empty((m, n), dtype=c["_out"], device=a.device)
    if m == 0 or n == 0:
        return out.view(*lead, n), None
    r2 = residual.reshape(m, n) if residual is not None else out
    bscale = b_scale.float().reshape(-1).expand(n).contiguous() if b_scale.numel() == 1 else b_scale.float()
    ys = y_scale if y_scale is not None else a_scale
    cfg = config
    grid = (-(-m // cfg.bm) * -(-n // cfg.bn),)
    meta = {k_: v for k_, v in c.items() if not k_.startswith("_")}
    launch = Launch(_qgemm_kernel, grid, (
        a2, bk, out, bv[0] if bias is not None else bscale, r2, smooth if smooth is not None else bscale, bscale,
        colsum if colsum is not None else bscale, a_scale, ys, _or(a_zero_point, a_scale), _or(y_zero_point, a_scale),
        m, n, k, a2.stride(0), a2.stride(1), bk.stride(0), bk.stride(1), out.stride(0), out.stride(1), bv[1],
        r2.stride(0), r2.stride(1), *c["_p"]), dict(
        meta, HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, num_warps=cfg.warps, num_stages=cfg.stages))
    return out.view(*lead, n), launch


def qconv_launch(x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                 x_zero_point: Optional[torch.Tensor] = None, y_scale: Optional[torch.Tensor] = None,
                 y_zero_point: Optional[torch.Tensor] = None, *, colsum: Optional[torch.Tensor] = None,
                 config: TileConfig = QCONV_CONFIGS[0], **attrs: Any) -> "tuple[torch.Tensor, Optional[Launch]] | None":
    """(output, its launch) of ember.QConv (2-D, group 1; output channels-last), or None."""
    c = _common(x, w, x_scale, x_zero_point, y_scale, y_zero_point, attrs)
    try:
        geom = conv_geometry(attrs, tuple(w.shape), tuple(x.shape[2:])) if x.dim() == 4 and w.dim() == 4 else None
    except (ValueError, TypeError, IndexError):
        geom = None
    if c is None or geom is None or attrs.get("group", 1) != 1 or x.shape[1] != w.shape[1] or x.numel() > _I32:
        return None
    cout = w.shape[0]
    bv = _bias_vector(bias, cout)
    (sh, sw), (ph, pw), (dh, dw), (oh, ow) = geom
    nb, cin, h, wd = x.shape
    if bv is None or (residual is not None and tuple(residual.shape) != (nb, cout, oh, ow)):
        return None
    if c["HAS_ZP"] and colsum is None:
        colsum = w.to(torch.int32).sum(dim=(1, 2, 3))
    cfg = config
    flat = 2 * cin <= cfg.bk
    if not flat and x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((nb, cout, oh, ow), dtype=c["_out"], device=x.device, memory_format=torch.channels_last)
    m = nb * oh * ow
    if m == 0 or cout == 0:
        return out, None
    r = residual if residual is not None else out
    bscale = w_scale.float().reshape(-1).expand(cout).contiguous() if w_scale.numel() == 1 else w_scale.float()
    ys = y_scale if y_scale is not None else x_scale
    grid = (-(-m // cfg.bm) * -(-cout // cfg.bn),)
    meta = {k: v for k, v in c.items() if not k.startswith("_")}
    launch = Launch(_qconv_kernel, grid, (
        x, w, out, bv[0] if bias is not None else bscale, r, bscale, colsum if colsum is not None else bscale,
        x_scale, ys, _or(x_zero_point, x_scale), _or(y_zero_point, x_scale), m, cout, h, wd, oh, ow, *x.stride(),
        *w.stride(), *out.stride(), *r.stride(), bv[1], *c["_p"]), dict(
        meta, CIN=cin, KH=w.shape[2], KW=w.shape[3], SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, FLAT_K=flat, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
        GROUP_M=cfg.group_m, num_warps=cfg.warps, num_stages=cfg.stages))
    return out, launch


KERNELS = (_qgemm_kernel, _qconv_kernel, _zero_points, _finish, _qdot, _prologue, _quantize, _epilogue, _activation)
VENDOR_KERNELS = (_quantize_rows_kernel, _dequant_kernel, _zero_points, _finish, _prologue, _quantize, _epilogue,
                  _activation)


def quantize_rows(a2: torch.Tensor, a_scale: torch.Tensor, a_zp: Optional[torch.Tensor], smooth: Optional[torch.Tensor],
                  fp8: bool) -> torch.Tensor:
    """A float activation [M, K] quantized (int8 row-major, uint8 zero points shifted into int8; or E4M3)."""
    m, k = a2.shape
    q = torch.empty((m, k), dtype=FP8 if fp8 else torch.int8, device=a2.device)
    uint8 = not fp8 and a_zp is not None and a_zp.dtype == torch.uint8
    if m and k:
        grid = (-(-m // 32), -(-k // 128))
        note(_quantize_rows_kernel[grid](a2, q, _or(smooth, a_scale), a_scale, _or(a_zp, a_scale), m, k, a2.stride(0),
                                    a2.stride(1), HAS_SMOOTH=smooth is not None, HAS_ZP=not fp8 and a_zp is not None,
                                    FP8=fp8, UINT8=uint8, BM=32, BK=128, num_warps=4))
    return q


def dequantize_accumulator(acc: torch.Tensor, out: torch.Tensor, b_scale: torch.Tensor, a_scale: torch.Tensor,
                           bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                           colsum: Optional[torch.Tensor], a_zp: Optional[torch.Tensor],
                           y_scale: Optional[torch.Tensor], y_zp: Optional[torch.Tensor], meta: dict) -> torch.Tensor:
    """``out`` [M, N] from a vendor GEMM's accumulator through the fused epilogue (``meta``: _common's)."""
    m, n = acc.shape
    bv = _bias_vector(bias, n)
    r = residual.reshape(m, n) if residual is not None else out
    bscale = b_scale.float().reshape(-1).expand(n).contiguous() if b_scale.numel() == 1 else b_scale.float()
    if m and n:
        grid = (-(-m // 64), -(-n // 64))
        note(_dequant_kernel[grid](acc, out, bv[0] if bias is not None else bscale, r, bscale, _or(colsum, bscale),
                              a_scale, _or(y_scale, a_scale), _or(a_zp, a_scale), _or(y_zp, a_scale), m, n, bv[1], r.stride(0),
                              r.stride(1), *meta["_p"], UINT8=meta["UINT8"], FP8=meta["FP8"], HAS_ZP=meta["HAS_ZP"],
                              HAS_YZP=meta["HAS_YZP"], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                              ACT=meta["ACT"], AFTER=meta["AFTER"], OUT_MODE=meta["OUT_MODE"], BM=64, BN=64,
                              num_warps=4))
    return out
