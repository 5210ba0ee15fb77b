"""Math helpers generated kernels call as ``tm.<name>(x)``: libdevice on a GPU, portable code elsewhere.

Triton's core language has exp/log/sqrt/erf but no tanh, log1p, expm1, pow or rint (round half
to even, what quantization asks); ``e4m3`` readies a value for the cast to FP8 E4M3. On CUDA the libdevice
versions are the accurate, fast choice. Triton's interpreter (TRITON_INTERPRET=1, how tests run
on a machine without a GPU) cannot call libdevice, so there the same names are small @triton.jit
functions built from exp/log with the classic cancellation-free tricks, accurate to a few ulp in
fp32. Generated source is the same text either way; only this module's bindings differ.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _log1p(x):
    # Goldberg: log(u) * x / (u - 1) cancels the rounding error of u = 1 + x
    u = 1.0 + x
    d = u - 1.0
    safe = tl.where(d == 0.0, 1.0, d)
    r = tl.where(d == 0.0, x, tl.log(u) * (x / safe))
    return tl.where(u == float("inf"), u, r)


@triton.jit
def _expm1(x):
    # Kahan: (u - 1) * x / log(u) for small |x|; plain u - 1 has no cancellation past |x| = 0.5
    u = tl.exp(x)
    d = u - 1.0
    lg = tl.log(u)
    safe = tl.where(lg == 0.0, 1.0, lg)
    small = tl.where(d == 0.0, x, d * (x / safe))
    return tl.where(tl.abs(x) > 0.5, d, small)


@triton.jit
def _tanh(x):
    # tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)): no cancellation near 0, saturates to 1
    e = _expm1(-2.0 * tl.abs(x))
    t = -e / (2.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _pow(a, b):
    # a**b = exp(b log|a|), negative bases only for integer exponents (odd ones keep the sign)
    t = tl.exp(b * tl.log(tl.abs(a)))
    is_int = b == tl.floor(b)
    odd = is_int & (tl.floor(b * 0.5) * 2.0 != b)
    neg = tl.where(is_int, tl.where(odd, -t, t), float("nan"))
    r = tl.where(a < 0.0, neg, t)
    return tl.where(b == 0.0, 1.0, r)


@triton.jit
def _rint(x):
    # round half to even by the float trick: adding 1.5 * 2**23 leaves no fraction bits (|x| < 2**22)
    big = 12582912.0
    return (x + big) - big


@triton.jit
def _e4m3(x):
    # x rounded (half to even) onto the E4M3 grid, in fp32 (|x| <= 448): the interpreter's fp8 cast
    # loses the carry into the exponent (1.97 -> 1.0), so the rounding is done here and the cast is exact
    a = tl.abs(x)
    e = tl.maximum(tl.floor(tl.log2(tl.where(a > 0.0, a, 1.0))), -6.0)  # -6: the subnormals' exponent
    ulp = tl.exp2(e - 3.0)  # 3 mantissa bits
    r = _rint(a / ulp) * ulp
    return tl.where(x < 0.0, -r, r)


@triton.jit
def _e4m3_hw(x):
    return x  # the hardware conversion rounds half to even itself


if INTERPRET:
    tanh, log1p, expm1, pow = _tanh, _log1p, _expm1, _pow  # noqa: A001
    rint, e4m3 = _rint, _e4m3
else:
    # Wrappers, not aliases: Triton swaps the generic libdevice module for the backend's (CUDA/HIP) only
    # where a kernel's globals hold it directly, not behind another module's attribute.
    from triton.language.extra import libdevice

    @triton.jit
    def tanh(x):
        return libdevice.tanh(x)

    @triton.jit
    def log1p(x):
        return libdevice.log1p(x)

    @triton.jit
    def expm1(x):
        return libdevice.expm1(x)

    @triton.jit
    def pow(a, b):  # noqa: A001
        return libdevice.pow(a, b)

    @triton.jit
    def rint(x):
        return libdevice.rint(x)

    e4m3 = _e4m3_hw
