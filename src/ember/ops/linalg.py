"""Matrix products (MatMul, Gemm, MatMulInteger, Einsum) and Det."""
from __future__ import annotations

import torch

from ..ir.dtypes import DType
from ..ir.shapes import Dim, broadcast_shapes
from .elementwise import as_computable, restore
from .registry import op, shape_rule


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer matmul in int64 (cuBLAS has no integer GEMM that torch exposes for every dtype)."""
    a64, b64 = as_computable(a).to(torch.int64), as_computable(b).to(torch.int64)
    if a64.device.type == "cpu":
        return torch.matmul(a64, b64)
    squeeze_a, squeeze_b = a64.dim() == 1, b64.dim() == 1
    if squeeze_a:
        a64 = a64.unsqueeze(0)
    if squeeze_b:
        b64 = b64.unsqueeze(-1)
    out = (a64.unsqueeze(-1) * b64.unsqueeze(-3)).sum(-2)
    if squeeze_a:
        out = out.squeeze(-2)
    if squeeze_b:
        out = out.squeeze(-1)
    return out


@op("MatMul", kind="anchor", low_precision="all")
def matmul(a, b):
    if not a.is_floating_point():
        return restore(int_matmul(a, b), a.dtype)
    if a.dtype in (torch.float16, torch.bfloat16) and a.device.type == "cpu":
        # CPU half GEMMs may accumulate in half; FP32 accumulation is the ember (and cuBLAS) contract
        return torch.matmul(a.float(), b.float()).to(a.dtype)
    return torch.matmul(a, b)


@op("Gemm", kind="anchor", low_precision="all")
def gemm(a, b, c=None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0):
    """Y = alpha * A' @ B' + beta * C, where C broadcasts to (M, N)."""
    a = a.transpose(0, 1) if transA else a
    b = b.transpose(0, 1) if transB else b
    y = matmul(a, b)
    if alpha != 1.0:
        y = y * alpha if y.is_floating_point() else (y * alpha).to(y.dtype)
    if c is not None:
        cc = c if beta == 1.0 else c * beta
        y = y + cc.to(y.dtype)
    return y


@op("MatMulInteger", kind="anchor")
def matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    """(A - a_zp) @ (B - b_zp) in int32. a_zp may be per row of A, b_zp per column of B."""
    a64, b64 = a.to(torch.int64), b.to(torch.int64)
    if a_zero_point is not None:
        zp = a_zero_point.to(torch.int64)
        a64 = a64 - (zp.unsqueeze(-1) if zp.dim() == 1 and zp.numel() > 1 else zp)
    if b_zero_point is not None:
        b64 = b64 - b_zero_point.to(torch.int64)
    return int_matmul(a64, b64).to(torch.int32)


@op("Einsum", kind="anchor")
def einsum(*inputs, equation: str):
    eq = equation.replace(" ", "")
    if inputs and not inputs[0].is_floating_point():
        dt = inputs[0].dtype
        if inputs[0].device.type != "cpu":  # no integer bmm on CUDA: float64 is exact below 2**53
            return torch.einsum(eq, *[as_computable(x).double() for x in inputs]).round().to(torch.int64).to(dt)
        return restore(torch.einsum(eq, *[as_computable(x).to(torch.int64) for x in inputs]), dt)
    if inputs and inputs[0].dtype in (torch.float16, torch.bfloat16) and inputs[0].device.type == "cpu":
        return torch.einsum(eq, *[x.float() for x in inputs]).to(inputs[0].dtype)
    return torch.einsum(eq, *inputs)


@op("Det", kind="other")
def det(x):
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.det(x.float()).to(x.dtype)
    return torch.linalg.det(x)


# -- shape rules ----------------------------------------------------------------------------------
def matmul_shape(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """numpy.matmul shape rules, 1-D operands included."""
    if len(a) == 1 and len(b) == 1:
        return ()
    if len(a) == 1:
        return tuple(b[:-2]) + (b[-1],)
    if len(b) == 1:
        return tuple(a[:-1])
    batch = broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return tuple(batch) + (a[-2], b[-1])


@shape_rule("MatMul")
def _matmul_rule(node):
    a, b = node.inputs[:2]
    if a.shape is None or b.shape is None:
        return [(a.dtype, None)]
    return [(a.dtype, matmul_shape(a.shape, b.shape))]


@shape_rule("MatMulInteger")
def _matmul_integer_rule(node):
    a, b = node.inputs[:2]
    if a.shape is None or b.shape is None:
        return [(DType.INT32, None)]
    return [(DType.INT32, matmul_shape(a.shape, b.shape))]


@shape_rule("Gemm")
def _gemm_rule(node):
    a, b = node.inputs[:2]
    if a.shape is None or b.shape is None:
        return [(a.dtype, None)]
    m = a.shape[1] if node.attrs.get("transA", 0) else a.shape[0]
    n = b.shape[0] if node.attrs.get("transB", 0) else b.shape[1]
    return [(a.dtype, (m, n))]


@shape_rule("Einsum")
def _einsum_rule(node):
    eq = node.attrs["equation"].replace(" ", "")
    ins = node.inputs
    if "->" not in eq or "..." in eq or any(v.shape is None for v in ins):
        return [(ins[0].dtype, None)]
    lhs, rhs = eq.split("->")
    sizes: dict[str, Dim] = {}
    for term, v in zip(lhs.split(","), ins):
        if len(term) != len(v.shape):
            return [(ins[0].dtype, None)]
        for ch, d in zip(term, v.shape):
            if ch not in sizes or sizes[ch] == 1:
                sizes[ch] = d
    return [(ins[0].dtype, tuple(sizes[ch] for ch in rhs))]


@shape_rule("Det")
def _det_rule(node):
    x = node.inputs[0]
    return [(x.dtype, None if x.shape is None else tuple(x.shape[:-2]))]
