"""INT8/FP8 choices for ember.QGemm and ember.QConv, timed against each other by the tuner on CUDA.

    triton.qgemm[128x128x128,w8,s4]   one kernel: quantize-on-load, IMMA (or FP8) dot, fused epilogue
    triton.qconv[128x64x64,w4,s4]     the same as an implicit-GEMM convolution over NHWC (2-D, group 1)
    cublaslt.int8                     torch._int_mm (cuBLASLt IMMA) between a quantize and an epilogue kernel
    cublaslt.fp8                      torch._scaled_mm (E4M3) the same way
    torch.qconv_dequant               any QConv (grouped, depthwise, 1-D/3-D): the quantized values dequantized
                                      into the float type and convolved by cuDNN (the fallback)

Their correctness gate is their own tolerance: a requantized output may land one step away where
the fp32 epilogue rounds a hair differently from the reference's (QUANTIZED_TOLERANCE); the
dequantized fallback rounds its operands to fp16/fp32 (the float tolerance). The reference (the
ops' exact numerics) runs everywhere else, CPUs included.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..ir.dtypes import DType
from ..ir.graph import Node
from . import FAMILIES, QUANTIZED_TOLERANCE, TACTICS, Choice
from .template_choice import TEMPLATES, TileConfig

try:
    import triton  # noqa: F401

    from . import quantized_templates as qt
except ImportError:
    qt = None

FP8 = torch.float8_e4m3fn
_FLOAT_IN = (DType.FLOAT16, DType.BFLOAT16, DType.FLOAT32)
TOLERANCE = {**QUANTIZED_TOLERANCE, FP8: 5e-2, torch.float16: 2e-2, torch.bfloat16: 3e-2, torch.float32: 1e-2}


def _ins(node: Node, n: int = 10) -> list:
    return list(node.inputs) + [None] * (n - len(node.inputs))


def _weight_ok(w: Any) -> bool:
    return (w is not None and w.is_const and w.dtype in (DType.INT8, DType.FLOAT8E4M3) and w.shape is not None
            and all(isinstance(d, int) and d > 0 for d in w.shape))


def _activation_ok(node: Node) -> bool:
    x, w = node.inputs[0], node.inputs[1]
    if x is None or x.dtype is None:
        return False
    if w.dtype == DType.FLOAT8E4M3:
        return x.dtype in _FLOAT_IN or x.dtype == DType.FLOAT8E4M3
    return x.dtype in _FLOAT_IN or x.dtype in (DType.INT8, DType.UINT8)


def _scalars_ok(node: Node) -> bool:
    ins = _ins(node)
    return all(v is None or (v.shape is not None and all(d == 1 for d in v.shape)) for v in (ins[2], ins[6], ins[7],
                                                                                             ins[8]))


def _epilogue_ok(node: Node) -> bool:
    from .triton_templates import activation_code

    a = node.attrs
    return activation_code(a.get("activation", ""), a.get("act_keys"), a.get("act_values")) is not None


def qgemm_applies(node: Node, device: torch.device) -> bool:
    a, b = node.inputs[0], node.inputs[1]
    return (qt is not None and device.type == "cuda" and len(node.outputs) == 1 and _weight_ok(b) and len(b.shape) == 2
            and a.rank is not None and a.rank >= 2 and _activation_ok(node) and _scalars_ok(node)
            and _epilogue_ok(node))


def qconv_applies(node: Node, device: torch.device) -> bool:
    x, w = node.inputs[0], node.inputs[1]
    if not (qt is not None and device.type == "cuda" and len(node.outputs) == 1 and _weight_ok(w) and len(w.shape) == 4
            and x.rank == 4 and node.attrs.get("group", 1) == 1 and _activation_ok(node) and _scalars_ok(node)
            and _epilogue_ok(node)):
        return False
    from .triton_templates import conv_geometry

    hw = tuple(d if isinstance(d, int) else 1 << 10 for d in x.shape[2:])
    try:
        return conv_geometry(node.attrs, tuple(w.shape), hw) is not None
    except Exception:
        return False


# -- weights, prepared once -----------------------------------------------------------------------------
def prepare_qgemm_weight(node: Node, consts: dict[str, torch.Tensor]) -> dict[int, tuple[str, torch.Tensor]]:
    """B with its logical shape, memory K x N row-major (the template streams rows of K)."""
    b = node.inputs[1]
    if b.name not in consts:
        return {}
    w = consts[b.name]
    if node.attrs.get("trans_b", 0):
        return {1: (b.name + "@tqgemm_t", w.t().contiguous().t())}
    return {1: (b.name + "@tqgemm", w.contiguous())}


def prepare_vendor_weight(node: Node, consts: dict[str, torch.Tensor]) -> dict[int, tuple[str, torch.Tensor]]:
    """B as a K x N matrix in column-major memory ([N, K] rows): the layout cuBLASLt's IMMA/FP8 kernels take."""
    b = node.inputs[1]
    if b.name not in consts:
        return {}
    w = consts[b.name]
    kn = w.t() if node.attrs.get("trans_b", 0) else w
    return {1: (b.name + "@nk", kn.t().contiguous().t())}


def prepare_qconv_weight(node: Node, consts: dict[str, torch.Tensor]) -> dict[int, tuple[str, torch.Tensor]]:
    w = node.inputs[1]
    if w.name not in consts or consts[w.name].dim() != 4:
        return {}
    t = consts[w.name]
    return {1: (w.name + "@tqconv", t.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1))}


def _colsum(ctx: Any, w: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The weight's sums over K per output channel (the zero point's correction), once per step."""
    make = lambda: w.to(torch.int32).sum(dim=dims)  # noqa: E731
    return ctx.cached(("colsum", w.data_ptr()), make) if ctx is not None else make()


def _reference(op: str, args: list, attrs: dict) -> Any:
    from ..ops import get

    od = get(op)
    return od.fn(*args, **{k: v for k, v in attrs.items() if k in od.attrs})


def _clean(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if not k.startswith("_")}


# -- Triton templates --------------------------------------------------------------------------------------
def _qgemm_run(cfg: TileConfig) -> Callable:
    def run(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
        a, b, a_s, b_s, bias, res, azp, ys, yzp, smooth = (list(args) + [None] * 10)[:10]
        colsum = None
        if b.dtype == torch.int8 and (azp is not None or a.dtype == torch.uint8):
            colsum = _colsum(ctx, b, (1,) if attrs.get("trans_b", 0) else (0,))
        planned = qt.qgemm_launch(a, b, a_s, b_s, bias, res, azp, ys, yzp, smooth, colsum=colsum, config=cfg,
                                  **_clean(attrs))
        if planned is None:
            return _reference("ember.QGemm", list(args), attrs)
        out, launch = planned
        if launch is not None:
            launch()
        return out
    return run


def _qconv_run(cfg: TileConfig) -> Callable:
    def run(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
        x, w, x_s, w_s, bias, res, xzp, ys, yzp = (list(args) + [None] * 9)[:9]
        colsum = _colsum(ctx, w, (1, 2, 3)) if w.dtype == torch.int8 and (xzp is not None or x.dtype == torch.uint8) \
            else None
        planned = qt.qconv_launch(x, w, x_s, w_s, bias, res, xzp, ys, yzp, colsum=colsum, config=cfg, **_clean(attrs))
        if planned is None:
            return _reference("ember.QConv", list(args), attrs)
        out, launch = planned
        if launch is not None:
            launch()
        return out
    return run


def helpers(*roots: Any) -> tuple[Any, ...]:
    """Every ember function and Triton kernel ``roots`` reach: the globals and module attributes
    (``qt._common``, ``tm.rint``) their code names and the functions their closures hold, followed
    to the end, in a stable order. The code hash covers them, so an edited helper is timed again."""
    found: dict[int, Any] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        fn = getattr(obj, "fn", obj)  # a @triton.jit kernel wraps its Python function
        if not inspect.isfunction(fn) or not fn.__module__.startswith("ember.") or id(fn) in found:
            continue
        found[id(fn)] = obj
        names: set[str] = set()
        codes = [fn.__code__]
        while codes:  # nested functions and lambdas too
            c = codes.pop()
            names |= set(c.co_names)
            codes += [k for k in c.co_consts if inspect.iscode(k)]
        stack += [c.cell_contents for c in fn.__closure__ or () if _cell_ok(c)]
        for name in names:
            v = fn.__globals__.get(name)
            if inspect.ismodule(v) and v.__name__.startswith("ember."):
                stack += [getattr(v, attr) for attr in names if hasattr(v, attr)]
            elif v is not None:
                stack.append(v)
    fns = [getattr(o, "fn", o) for o in found.values()]
    return tuple(o for _, o in sorted(zip(fns, found.values()), key=lambda p: (p[0].__module__, p[0].__qualname__)))


def _cell_ok(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def qgemm_choice(cfg: TileConfig) -> Choice:
    run = _qgemm_run(cfg)
    return Choice(f"triton.qgemm[{cfg}]", ("ember.QGemm",), qgemm_applies, run, prepare_qgemm_weight,
                  family="triton.qgemm", params={"tile": cfg},
                  code=helpers(run, qgemm_applies, prepare_qgemm_weight, *qt.KERNELS, qt.qgemm_launch),
                  tolerance=TOLERANCE)


def qconv_choice(cfg: TileConfig) -> Choice:
    run = _qconv_run(cfg)
    return Choice(f"triton.qconv[{cfg}]", ("ember.QConv",), qconv_applies, run, prepare_qconv_weight,
                  family="triton.qconv", params={"tile": cfg},
                  code=helpers(run, qconv_applies, prepare_qconv_weight, *qt.KERNELS, qt.qconv_launch),
                  tolerance=TOLERANCE)


def launch_of(name: str, args: list, attrs: dict) -> Any:
    """The launch a quantized template makes on ``args`` (prepared weights), for the compile pool."""
    kind, cfg = TEMPLATES[name]
    fn = qt.qgemm_launch if kind == "qgemm" else qt.qconv_launch
    n = 10 if kind == "qgemm" else 9
    planned = fn(*(list(args) + [None] * n)[:n], config=cfg, **_clean(attrs))
    return None if planned is None else planned[1]


# -- vendor GEMMs ---------------------------------------------------------------------------------------
def _vendor_applies(fp8: bool) -> Callable[[Node, torch.device], bool]:
    def applies(node: Node, device: torch.device) -> bool:
        b = node.inputs[1]
        if not qgemm_applies(node, device) or (b.dtype == DType.FLOAT8E4M3) != fp8:
            return False
        if fp8 and torch.cuda.get_device_capability(device) < (8, 9):
            return False
        k, n = (b.shape[1], b.shape[0]) if node.attrs.get("trans_b", 0) else (b.shape[0], b.shape[1])
        return k % 16 == 0 and n % 16 == 0  # cuBLASLt's IMMA and FP8 kernels want aligned K and N
    return applies


_ONES: dict[tuple, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    """A cached fp32 one (made during warm-up, never inside a CUDA-graph capture)."""
    t = _ONES.get((device.type, device.index))
    if t is None:
        t = _ONES[(device.type, device.index)] = torch.ones((), dtype=torch.float32, device=device)
    return t


def vendor_qgemm(args: list, attrs: dict, ctx: Any, fp8: bool) -> torch.Tensor:
    """Quantize (a Triton kernel), GEMM (cuBLASLt through torch), epilogue (a Triton kernel)."""
    a, b_kn, a_s, b_s, bias, res, azp, ys, yzp, smooth = (list(args) + [None] * 10)[:10]
    meta = qt._common(a, b_kn, a_s, azp, ys, yzp, _clean(attrs))
    k, n = b_kn.shape
    lead = a.shape[:-1]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    if meta is None or m <= 16 or a.shape[-1] != k:  # _int_mm wants more than 16 rows: the template then
        return _qgemm_run(qt.QGEMM_CONFIGS[-1])([a, b_kn, a_s, b_s, bias, res, azp, ys, yzp, smooth],
                                                {**attrs, "trans_b": 0}, ctx)
    if a2.dtype in qt._FLOATS:
        q = qt.quantize_rows(a2, a_s, azp, smooth, fp8)
    elif a2.dtype == torch.uint8:
        q = a2.bitwise_xor(128).view(torch.int8)  # q - 128; the zero point follows in the epilogue
    else:
        q = a2.contiguous()
    if fp8:
        acc = torch._scaled_mm(q, b_kn, scale_a=_one(a.device), scale_b=_one(a.device), out_dtype=torch.float32)
    else:
        acc = torch._int_mm(q, b_kn)
    colsum = _colsum(ctx, b_kn, (0,)) if meta["HAS_ZP"] else None
    out = torch.empty((m, n), dtype=meta["_out"], device=a.device)
    qt.dequantize_accumulator(acc, out, b_s, a_s, bias, res, colsum, azp, ys, yzp, meta)
    return out.view(*lead, n)


# -- the dequantized fallback for any QConv --------------------------------------------------------------
def _dequant_applies(node: Node, device: torch.device) -> bool:
    x, w = node.inputs[0], node.inputs[1]
    return (device.type == "cuda" and len(node.outputs) == 1 and _weight_ok(w) and x.rank is not None
            and x.rank == len(w.shape) and _activation_ok(node) and _scalars_ok(node))


def _compute_type(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32


def dequantized_conv(args: list, attrs: dict, ctx: Any) -> torch.Tensor:
    from ..ops.conv import _conv_core
    from ..ops.quantized import finish, quantize_activation

    x, w, x_s, w_s, bias, res, xzp, ys, yzp = (list(args) + [None] * 9)[:9]
    ct = _compute_type(x)
    qx = x if x.dtype in (torch.int8, torch.uint8, FP8) else quantize_activation(x, x_s, xzp, w.dtype)
    xd = qx.float() if qx.dtype == FP8 else qx.to(torch.int32).float()
    if xzp is not None and qx.dtype != FP8:
        xd = xd - xzp.float().reshape(())
    scale = w_s.float().reshape(-1)
    wd = ctx.cached(("wdq", w.data_ptr()), lambda: (w.float() * scale.reshape(-1, *[1] * (w.dim() - 1))).to(ct)) \
        if ctx is not None else (w.float() * scale.reshape(-1, *[1] * (w.dim() - 1))).to(ct)
    y = _conv_core((xd * x_s.float().reshape(())).to(ct), wd, auto_pad=attrs.get("auto_pad", "NOTSET"),
                   dilations=attrs.get("dilations"), group=attrs.get("group", 1),
                   kernel_shape=attrs.get("kernel_shape"), pads=attrs.get("pads"), strides=attrs.get("strides"))
    channel = [1, -1] + [1] * (y.dim() - 2)
    b = bias.reshape(channel) if bias is not None else None
    return finish(y, torch.ones((), device=y.device), b, res, attrs.get("activation", ""), attrs.get("act_keys"),
                  attrs.get("act_values"), attrs.get("act_after_residual", 0), ys, yzp, w.dtype,
                  attrs.get("output_dtype", 0))


def _register() -> None:
    for kind, configs, make in (("qgemm", qt.QGEMM_CONFIGS, qgemm_choice), ("qconv", qt.QCONV_CONFIGS, qconv_choice)):
        for cfg in configs:
            c = make(cfg)
            TEMPLATES[c.name] = (kind, cfg)
            TACTICS[c.name] = c
    FAMILIES["triton.qgemm"] = lambda text: qgemm_choice(TileConfig.parse(text))
    FAMILIES["triton.qconv"] = lambda text: qconv_choice(TileConfig.parse(text))
    for fp8, name in ((False, "cublaslt.int8"), (True, "cublaslt.fp8")):
        def run(args: list, attrs: dict, ctx: Any, _fp8: bool = fp8) -> torch.Tensor:
            return vendor_qgemm(args, attrs, ctx, _fp8)
        applies = _vendor_applies(fp8)
        TACTICS[name] = Choice(name, ("ember.QGemm",), applies, run, prepare_vendor_weight,
                               code=helpers(run, applies, prepare_vendor_weight, vendor_qgemm, *qt.VENDOR_KERNELS,
                                            qt.quantize_rows, qt.dequantize_accumulator),
                               tolerance=TOLERANCE)
    from ..ops.conv import _conv_core
    from ..ops.quantized import finish, quantize_activation

    TACTICS["torch.qconv_dequant"] = Choice("torch.qconv_dequant", ("ember.QConv",), _dequant_applies,
                                            dequantized_conv, code=helpers(_dequant_applies, dequantized_conv,
                                                                           _conv_core, finish, quantize_activation),
                                            tolerance=TOLERANCE)


if qt is not None:
    _register()
