"""Pointwise math: unary, binary (numpy broadcasting), comparison, logic, bitwise, variadic.

torch lacks most kernels for uint16/32/64, which ONNX allows everywhere. Those dtypes are
computed in int64 and cast back (wrapping as ONNX does); uint64 is reinterpreted bit for bit as
int64, which keeps add/sub/mul/bitwise exact and, with the sign bit flipped, orders correctly.
Half-precision transcendental math runs in fp32 and is rounded back once.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir.dtypes import DType
from .infer import broadcast_rule, same_as_input
from .lowering import Builder, Operand, Unsupported, binary, fnum, need, present, template, zero
from .registry import FP32, Epilogue, op, shape_rule

WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)
HALF_FLOATS = (torch.float16, torch.bfloat16)
_SIGN_BIT = -(2 ** 63)


# -- dtype helpers (shared with the other math modules) ----------------------------------------------
def as_computable(x: torch.Tensor) -> torch.Tensor:
    """A tensor torch has kernels for, holding the same values (uint64: the same bits)."""
    if x.dtype in (torch.uint16, torch.uint32):
        return x.to(torch.int64)
    if x.dtype == torch.uint64:
        return x.view(torch.int64)
    return x


def restore(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Undo :func:`as_computable`: cast (wrapping) or reinterpret back to ``dtype``."""
    if y.dtype == dtype:
        return y
    if dtype == torch.uint64 and y.dtype == torch.int64:
        return y.view(torch.uint64)
    return y.to(dtype)


def ordered(x: torch.Tensor) -> torch.Tensor:
    """A signed tensor whose order is the order of ``x`` (uint64 gets its sign bit flipped)."""
    if x.dtype == torch.uint64:
        return x.view(torch.int64) ^ _SIGN_BIT
    return as_computable(x)


def unordered(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint64:
        return (y ^ _SIGN_BIT).view(torch.uint64)
    return restore(y, dtype)


def float_math(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply ``fn`` in at least fp32 precision, returning the input dtype."""
    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype in HALF_FLOATS:
            return fn(x.float()).to(x.dtype)
        if not x.is_floating_point():
            return fn(x.double()).to(x.dtype)
        return fn(x)
    return run


def _wide_binary(fn: Callable, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dt = a.dtype
    return restore(fn(as_computable(a), as_computable(b)), dt)


# -- unary ----------------------------------------------------------------------------------------
def _unary(name: str, fn: Callable[[torch.Tensor], torch.Tensor], **facts) -> None:
    def ref(x):
        return fn(x)
    ref.__name__ = name.lower()
    ref.__doc__ = f"ONNX {name}."
    op(name, kind="pointwise", **facts)(ref)
    shape_rule(name)(same_as_input(0))


# op -> reference, fused-kernel template ({0}: the operand, in fp32)
for _name, (_fn, _tl) in {
    "Exp": (torch.exp, "tl.exp({0})"), "Log": (torch.log, "tl.log({0})"), "Sqrt": (torch.sqrt, "tl.sqrt({0})"),
    "Erf": (torch.erf, "tl.erf({0})"), "Sin": (torch.sin, "tl.sin({0})"), "Cos": (torch.cos, "tl.cos({0})"),
    "Tan": (torch.tan, None), "Asin": (torch.asin, None), "Acos": (torch.acos, None), "Atan": (torch.atan, None),
    "Sinh": (torch.sinh, None), "Cosh": (torch.cosh, None), "Asinh": (torch.asinh, None),
    "Acosh": (torch.acosh, None), "Atanh": (torch.atanh, None), "Tanh": (torch.tanh, "tm.tanh({0})"),
    "Sigmoid": (torch.sigmoid, "tl.sigmoid({0})"), "Reciprocal": (torch.reciprocal, "(1.0 / {0})"),
}.items():
    # Exp overflows fp16 past 11: its inputs and output stay fp32 in reduced-precision engines
    _unary(_name, float_math(_fn), triton=_tl, low_precision=FP32 if _name == "Exp" else None,
           epilogue={"Sigmoid": Epilogue(4, torch=lambda y, a: torch.sigmoid_(y), vendor_conv=True),
                     "Tanh": Epilogue(5, torch=lambda y, a: torch.tanh_(y), vendor_conv=True)}.get(_name))


def _abs(x):
    if x.dtype in WIDE_UNSIGNED or x.dtype in (torch.uint8, torch.bool):
        return x
    return torch.abs(x)


def _neg(x):
    return restore(-as_computable(x), x.dtype) if x.dtype in WIDE_UNSIGNED else torch.neg(x)


def _sign(x):
    if x.dtype in WIDE_UNSIGNED:
        return (x != 0).to(x.dtype)
    return torch.sign(x)


def _keep_ints(fn):
    """Ceil/Floor/Round are identities on integers."""
    return lambda x: x if not x.is_floating_point() else fn(x)


def signed_unary(b: Builder, node, args: list) -> Operand:
    """Relu, Abs, Neg and Sign on floats or integers (the zero literal follows the kind)."""
    xs = present(args)
    need(node, xs, "fi")
    x = xs[0]
    z = zero(x.kind)
    t = {"Relu": f"tl.where({{0}} < {z}, {z}, {{0}})", "Abs": "tl.abs({0})", "Neg": "(-{0})",
         "Sign": f"tl.where({{0}} > {z}, 1, tl.where({{0}} < {z}, -1, 0)).to({{0}}.dtype)"}[node.op]
    if node.op == "Sign" and x.kind == "f":  # NaN stays NaN, as torch.sign keeps it
        t = "tl.where({0} > 0.0, 1.0, tl.where({0} < 0.0, -1.0, {0}))"
    return b.fmt(t, x.kind, x)


for _name, (_fn, _tl) in {
    "Abs": (_abs, signed_unary), "Neg": (_neg, signed_unary), "Sign": (_sign, signed_unary),
    "Ceil": (_keep_ints(torch.ceil), "tl.ceil({0})"), "Floor": (_keep_ints(torch.floor), "tl.floor({0})"),
    "Round": (_keep_ints(torch.round), None),  # torch.round rounds half to even, as ONNX asks
    "Not": (torch.logical_not, template("({0} == 0)", kinds="b", out="b")),
    "BitwiseNot": (lambda x: restore(torch.bitwise_not(as_computable(x)), x.dtype), None),
}.items():
    _unary(_name, _fn, triton=_tl)


@op("IsNaN", kind="pointwise", triton=template("({0} != {0})", out="b"))
def is_nan(x):
    return torch.isnan(x)


def _is_inf_lowering(attrs: dict) -> str:
    neg, pos = attrs.get("detect_negative", 1), attrs.get("detect_positive", 1)
    if neg and pos:
        return '(tl.abs({0}) == float("inf"))'
    return "({0} == float(\"" + ("-inf" if neg else "inf" if pos else "nan") + "\"))"


@op("IsInf", kind="pointwise", triton=template(_is_inf_lowering, out="b"))
def is_inf(x, *, detect_negative: int = 1, detect_positive: int = 1):
    if detect_negative and detect_positive:
        return torch.isinf(x)
    if detect_negative:
        return torch.isneginf(x)
    if detect_positive:
        return torch.isposinf(x)
    return torch.zeros_like(x, dtype=torch.bool)


# -- binary arithmetic ----------------------------------------------------------------------------
@op("Add", kind="pointwise", triton=binary("+"))
def add(a, b):
    return _wide_binary(torch.add, a, b) if a.dtype in WIDE_UNSIGNED else a + b


@op("Sub", kind="pointwise", triton=binary("-"))
def sub(a, b):
    return _wide_binary(torch.sub, a, b) if a.dtype in WIDE_UNSIGNED else a - b


@op("Mul", kind="pointwise", triton=binary("*"))
def mul(a, b):
    return _wide_binary(torch.mul, a, b) if a.dtype in WIDE_UNSIGNED else a * b


@op("Div", kind="pointwise", triton=binary("/", kinds="f"))  # integer division truncates: the reference's
def div(a, b):
    if a.is_floating_point():
        return a / b
    if a.dtype == torch.bool:
        return a  # x / True
    if a.dtype == torch.uint64:
        return _udiv64(a.view(torch.int64), b.view(torch.int64)).view(torch.uint64)
    return restore(torch.div(as_computable(a), as_computable(b), rounding_mode="trunc"), a.dtype)


def _udiv64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unsigned 64-bit division on int64 bit patterns (torch has no uint64 division)."""
    a, b = torch.broadcast_tensors(a, b)
    half = (a >> 1) & (2 ** 63 - 1)  # logical shift: a / 2 fits in int64
    b_pos = torch.where(b > 0, b, torch.ones_like(b))
    q = torch.div(half, b_pos, rounding_mode="floor") << 1
    r = a - q * b_pos
    q = q + (ordered(r.view(torch.uint64)) >= ordered(b_pos.view(torch.uint64))).long()
    # divisors >= 2**63 go into a at most once
    return torch.where(b < 0, (ordered(a.view(torch.uint64)) >= ordered(b.view(torch.uint64))).long(), q)


@op("Mod", kind="pointwise")
def mod(a, b, *, fmod: int = 0):
    """fmod=1: C fmod (sign of the dividend); fmod=0: Python/numpy remainder (sign of the divisor)."""
    dt = a.dtype
    if dt == torch.uint64:  # unsigned: both rules agree
        x, y = a.view(torch.int64), b.view(torch.int64)
        return (x - _udiv64(x, y) * y).view(torch.uint64)
    x, y = as_computable(a), as_computable(b)
    if fmod:
        return restore(torch.fmod(x, y), dt)
    if not a.is_floating_point():
        return restore(torch.remainder(x, y), dt)
    xf, yf = (x.float(), y.float()) if dt in HALF_FLOATS else (x, y)
    r = torch.remainder(xf, yf)
    # numpy/ONNX: a zero result takes the sign of the divisor; an infinite divisor returns x
    # when the signs agree and y otherwise (torch agrees on the latter; be explicit anyway)
    r = torch.where(r == 0, torch.copysign(torch.zeros_like(r), yf), r)
    same_sign = torch.signbit(xf) == torch.signbit(yf)
    r = torch.where(torch.isinf(yf) & torch.isfinite(xf) & (xf != 0), torch.where(same_sign, xf, yf), r)
    return r.to(dt)


def _pow_lowering(b: Builder, node, args: list) -> Operand:
    x, y = args[0], args[1]
    need(node, [x], "f")
    if not y.var:  # constant exponent: the common cases as products, others through exp/log
        e = float(y.text.replace('float("', "").replace('")', ""))
        special = {1.0: "{0}", 2.0: "({0} * {0})", 3.0: "({0} * {0} * {0})", 0.5: "tl.sqrt({0})",
                   -1.0: "(1.0 / {0})", -0.5: "(1.0 / tl.sqrt({0}))", 0.0: "(tl.zeros_like({0}) + 1.0)"}
        if e in special:
            return b.fmt(special[e], "f", x)
        return b.fmt("tm.pow({0}, " + fnum(e) + ")", "f", x)
    yf = y if y.kind == "f" else b.fmt("{0}.to(tl.float32)", "f", y)
    return b.fmt("tm.pow({0}, {1})", "f", x, yf)


# overflow-prone in fp16 (x**2 of an activation past 256): fp32 in reduced-precision engines
@op("Pow", kind="pointwise", triton=_pow_lowering, low_precision=FP32)
def pow_(x, y):
    """The output has the base's dtype, whatever the exponent's."""
    if x.is_floating_point():
        if y.is_floating_point() and y.dtype != x.dtype:
            return torch.pow(x.double(), y.double()).to(x.dtype)
        if not y.is_floating_point():
            y = as_computable(y)
        return torch.pow(x, y.to(x.dtype) if y.dtype in WIDE_UNSIGNED else y)
    if y.is_floating_point():
        return torch.pow(as_computable(x).double(), y.double()).to(x.dtype)
    return restore(torch.pow(as_computable(x), as_computable(y).to(torch.int64)), x.dtype)


@op("BitShift", kind="pointwise")
def bit_shift(x, y, *, direction: str):
    """Shifts by a negative amount or by the bit width or more give 0 (or -1 for right shifts of negatives)."""
    dt = x.dtype
    bits = torch.iinfo(dt).bits
    signed = dt.is_signed
    a = x.to(torch.int64) if dt != torch.uint64 else x.view(torch.int64)
    s = as_computable(y).to(torch.int64)
    a, s = torch.broadcast_tensors(a, s)
    out_of_range = (s < 0) | (s >= bits)
    s_ok = torch.where(out_of_range, torch.zeros_like(s), s)
    if direction == "RIGHT":
        if signed or dt != torch.uint64:
            shifted = a >> s_ok  # arithmetic shift of a value that fits: exact
        else:  # logical shift of 64 bits: shift, then clear the sign-extended top bits
            mask = ~((torch.full_like(a, -1) << (63 - s_ok)) << 1)  # two shifts: never by 64
            shifted = (a >> s_ok) & mask
        fill = torch.where(a < 0, torch.full_like(a, -1), torch.zeros_like(a)) if signed else torch.zeros_like(a)
    elif direction == "LEFT":
        shifted = a << s_ok  # int64 wraps; the cast below keeps the low bits
        fill = torch.zeros_like(a)
    else:
        raise ValueError(f"BitShift direction must be LEFT or RIGHT, not {direction!r}")
    out = torch.where(out_of_range, fill, shifted)
    return out.view(torch.uint64) if dt == torch.uint64 else out.to(dt)


def _bitwise(fn):
    def run(a, b):
        return _wide_binary(fn, a, b) if a.dtype in WIDE_UNSIGNED else fn(a, b)
    return run


_LOGIC = {"And": "&", "Or": "|", "Xor": "^"}
for _name, _fn in {"BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
                   "BitwiseXor": torch.bitwise_xor, "And": torch.logical_and, "Or": torch.logical_or,
                   "Xor": torch.logical_xor}.items():
    _f = _bitwise(_fn)
    _f.__name__ = _name.lower()
    _tl = template("({0} " + _LOGIC[_name] + " {1})", kinds="b", out="b") if _name in _LOGIC else None
    op(_name, kind="pointwise", triton=_tl)(_f)


# -- comparison -----------------------------------------------------------------------------------
def _compare(fn):
    def run(a, b):
        if a.dtype in WIDE_UNSIGNED:
            return fn(ordered(a), ordered(b))
        return fn(a, b)
    return run


def _compare_lowering(symbol: str):
    def lower(b: Builder, node, args: list) -> Operand:
        x, y = present(args)
        if x.kind != y.kind or x.kind == "b" and node.op != "Equal":
            raise Unsupported(f"node '{node.name}' ({node.op}): inputs of different kinds")
        return b.fmt("({0} " + symbol + " {1})", "b", x, y)
    return lower


for _name, (_fn, _sym) in {"Equal": (torch.eq, "=="), "Greater": (torch.gt, ">"), "GreaterOrEqual": (torch.ge, ">="),
                           "Less": (torch.lt, "<"), "LessOrEqual": (torch.le, "<=")}.items():
    _f = _compare(_fn)
    _f.__name__ = _name.lower()
    op(_name, kind="pointwise", triton=_compare_lowering(_sym))(_f)
    shape_rule(_name)(broadcast_rule(DType.BOOL))


# -- variadic -------------------------------------------------------------------------------------
def _fold(fn, xs):
    dt = xs[0].dtype
    acc = ordered(xs[0])
    for x in xs[1:]:
        acc = fn(acc, ordered(x))
    return unordered(acc, dt)


def _variadic_lowering(b: Builder, node, args: list) -> Operand:
    """Max, Min, Sum and Mean as a chain of binary operations (NaN propagates through Max and Min)."""
    op_ = node.op
    xs = present(args)
    need(node, xs, "fi" if op_ != "Mean" else "f")
    if len({x.kind for x in xs}) != 1:
        raise Unsupported(f"node '{node.name}' ({op_}): inputs of different kinds")
    acc = xs[0]
    for x in xs[1:]:
        if op_ in ("Max", "Min"):
            nan = ", propagate_nan=tl.PropagateNan.ALL" if x.kind == "f" else ""
            acc = b.fmt(f"tl.{'maximum' if op_ == 'Max' else 'minimum'}({{0}}, {{1}}{nan})", x.kind, acc, x)
        else:
            acc = b.fmt("({0} + {1})", x.kind, acc, x)
    if op_ == "Mean":
        acc = b.fmt("({0} / " + fnum(len(xs)) + ")", "f", acc)
    return acc if acc.var else b.fmt("({0})", acc.kind, acc)


@op("Max", kind="pointwise", triton=_variadic_lowering)
def max_(*xs):
    return _fold(torch.maximum, xs)


@op("Min", kind="pointwise", triton=_variadic_lowering)
def min_(*xs):
    return _fold(torch.minimum, xs)


@op("Sum", kind="pointwise", triton=_variadic_lowering)
def sum_(*xs):
    dt = xs[0].dtype
    acc = as_computable(xs[0])
    for x in xs[1:]:
        acc = acc + as_computable(x)
    return restore(acc, dt)


@op("Mean", kind="pointwise", triton=_variadic_lowering)
def mean(*xs):
    acc = xs[0]
    for x in xs[1:]:
        acc = acc + x
    return acc / len(xs)


def _where_lowering(b: Builder, node, args: list) -> Operand:
    c, x, y = present(args)
    if c.kind != "b" or x.kind != y.kind:
        raise Unsupported(f"node '{node.name}' (Where): condition must be bool and branches of one kind")
    return b.fmt("tl.where({0}, {1}, {2})", x.kind, c, x, y)


@op("Where", kind="pointwise", triton=_where_lowering, low_precision=("x", "y"))
def where(condition, x, y):
    if x.dtype in WIDE_UNSIGNED:
        return restore(torch.where(condition, as_computable(x), as_computable(y)), x.dtype)
    return torch.where(condition, x, y)


def _clip_lowering(b: Builder, node, args: list) -> Operand:
    x, lo, hi = (list(args) + [None, None])[:3]
    need(node, [x], "fi")
    nan = ", propagate_nan=tl.PropagateNan.ALL" if x.kind == "f" else ""
    out = x
    if lo is not None:
        out = b.fmt("tl.maximum({0}, {1}" + nan + ")", x.kind, out, lo)
    if hi is not None:
        out = b.fmt("tl.minimum({0}, {1}" + nan + ")", x.kind, out, hi)
    return out if out.var else b.fmt("({0})", x.kind, out)


def _clip_params(attrs: dict) -> tuple[int, float, float]:
    lo, hi = attrs.get("min"), attrs.get("max")
    return 11, (-float("inf") if lo is None else float(lo)), (float("inf") if hi is None else float(hi))


@op("Clip", kind="pointwise", triton=_clip_lowering,
    epilogue=Epilogue(11, ("min", "max"), params=_clip_params, vendor_conv=True))
def clip(x, min=None, max=None):  # noqa: A002  (ONNX input names)
    if min is None and max is None:
        return x
    dt = x.dtype
    v = ordered(x)
    lo = ordered(min.to(dt)) if min is not None else None
    hi = ordered(max.to(dt)) if max is not None else None
    if lo is not None:
        v = torch.maximum(v, lo)
    if hi is not None:  # min > max gives max everywhere, as numpy.clip does
        v = torch.minimum(v, hi)
    return unordered(v, dt)


for _name in ("Add", "Sub", "Mul", "Div", "Mod", "Pow", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
              "Max", "Min", "Sum", "Mean"):
    shape_rule(_name)(broadcast_rule())
for _name in ("And", "Or", "Xor"):
    shape_rule(_name)(broadcast_rule(DType.BOOL))
shape_rule("IsNaN", "IsInf")(lambda node: [(DType.BOOL, node.inputs[0].shape)])
shape_rule("Clip")(same_as_input(0))


@shape_rule("Where")
def _where_rule(node):
    from ..ir.shapes import broadcast_shapes

    c, x, y = node.inputs
    if c.shape is None or x.shape is None or y.shape is None:
        return [(x.dtype, None)]
    return [(x.dtype, broadcast_shapes(c.shape, x.shape, y.shape))]
