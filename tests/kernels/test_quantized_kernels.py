"""INT8/FP8 kernels (kernels/quantized*.py) against the quantized ops' reference functions (exact integer
accumulation, fp32 epilogue): Triton GEMM and implicit-GEMM conv templates in Triton's interpreter, the
vendor paths (torch._int_mm, torch._scaled_mm, which also run on the CPU) with their quantize and
epilogue kernels, and the dequantized fallback. Without a GPU everything runs on small shapes on CPU."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton is imported: kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

from ember.kernels import quantized as kq  # noqa: E402
from ember.kernels import quantized_templates as qt  # noqa: E402
from ember.ops import get  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked lanes in the interpreter's numpy


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def weight(shape, qtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if qtype == FP8:
        return (torch.randn(*shape, generator=g) * 40).clamp(-448, 448).to(FP8).to(DEV)
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(DEV)


def close(got, want, qtype):
    """Float outputs: relative L2 of fp32 rounding; quantized outputs: at most a step apart, rarely."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    g, w = got.float().cpu(), want.float().cpu()
    if want.is_floating_point() and want.dtype != FP8:
        rel = float((g - w).norm() / w.norm().clamp_min(1e-30))
        assert rel < (2e-2 if want.dtype == torch.float16 else 2e-6), rel
    elif want.dtype == FP8:
        assert float((g - w).norm() / w.norm()) < 2e-2
    else:
        off = (g - w).abs()
        assert off.max() <= 1 and float((off > 0).float().mean()) < 0.01, (off.max(), (off > 0).float().mean())


QGEMM = "ember.QGemm"


def qgemm_case(qtype=torch.int8, m=37, k=80, n=48, a_dtype=torch.float32, trans_b=0, bias=True, act="", keys=None,
               values=None, residual=False, after=0, requant=None, smooth=False, zp=None):
    a = rand(2, m, k, dtype=a_dtype, scale=3.0) if a_dtype.is_floating_point else None
    a_scale = torch.tensor(0.05, device=DEV)
    a_zp = None
    if zp is not None:
        a_zp = torch.tensor(zp[0], dtype=zp[1], device=DEV)
    if a is None:  # already quantized (dynamic quantization's uint8, a requantized int8)
        g = torch.Generator().manual_seed(3)
        lo, hi = (0, 256) if a_dtype == torch.uint8 else (-128, 128)
        a = torch.randint(lo, hi, (2, m, k), generator=g).to(a_dtype).to(DEV)
    b = weight((n, k) if trans_b else (k, n), qtype)
    b_scale = (torch.rand(n, generator=torch.Generator().manual_seed(4)) * 0.01 + 0.002).to(DEV)
    args = [a, b, a_scale, b_scale, rand(n, seed=5) if bias else None, rand(2, m, n, seed=6) if residual else None,
            a_zp, None, None, rand(k, seed=7).abs() + 0.5 if smooth else None]
    if requant is not None:
        args[7] = torch.tensor(0.08 if qtype != FP8 else 0.02, device=DEV)
        args[8] = torch.tensor(requant[0], dtype=requant[1], device=DEV) if requant[1] is not None else None
    attrs = {"trans_b": trans_b, "activation": act, "act_keys": keys or [], "act_values": values or [],
             "act_after_residual": after, "output_dtype": 10 if a_dtype == torch.float16 else 1}
    return args, attrs


GEMM_CASES = {
    "int8 float-in float-out": {},
    "int8 fp16": dict(a_dtype=torch.float16),
    "int8 trans_b relu residual": dict(trans_b=1, act="Relu", residual=True),
    "int8 gelu after residual": dict(act="Gelu", residual=True, after=1),
    "int8 clip requant int8": dict(act="Clip", keys=["min", "max"], values=[-1.0, 6.0], requant=(0, torch.int8)),
    "int8 requant uint8": dict(act="Relu", requant=(128, torch.uint8)),
    "int8 smooth": dict(smooth=True, bias=False),
    "uint8 in with zero point": dict(a_dtype=torch.uint8, zp=(131, torch.uint8)),
    "int8 in with zero point": dict(a_dtype=torch.int8, zp=(-3, torch.int8), requant=(5, torch.int8)),
    "float in uint8 zero point": dict(zp=(120, torch.uint8)),
    "fp8": dict(qtype=FP8),
    "fp8 requant": dict(qtype=FP8, act="Relu", requant=(0, None)),
    "fp8 in": dict(qtype=FP8, a_dtype=FP8, bias=False),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_qgemm_template_matches_the_reference(case):
    kw = dict(GEMM_CASES[case])
    if kw.get("a_dtype") == FP8:
        kw["a_dtype"] = torch.float32
        args, attrs = qgemm_case(**kw)
        args[0] = (args[0] / 0.05).clamp(-448, 448).to(FP8)
    else:
        args, attrs = qgemm_case(**kw)
    want = get(QGEMM).call(list(args), attrs, None)
    prep = kq.prepare_qgemm_weight(_node(QGEMM, args, attrs), {"b": args[1]})
    bargs = list(args)
    bargs[1] = prep[1][1]
    run = kq._qgemm_run(qt.QGEMM_CONFIGS[-1])
    close(run(bargs, attrs, None), want, args[1].dtype)


@pytest.mark.parametrize("case", ["int8 float-in float-out", "int8 clip requant int8", "uint8 in with zero point",
                                  "int8 smooth", "fp8", "fp8 requant"])
def test_vendor_gemms_match_the_reference(case):
    args, attrs = qgemm_case(**GEMM_CASES[case])
    want = get(QGEMM).call(list(args), attrs, None)
    prep = kq.prepare_vendor_weight(_node(QGEMM, args, attrs), {"b": args[1]})
    bargs = list(args)
    bargs[1] = prep[1][1]
    assert bargs[1].stride(0) == 1  # K x N, column-major: cuBLASLt's layout
    close(kq.vendor_qgemm(bargs, attrs, None, args[1].dtype == FP8), want, args[1].dtype)


def _node(op, args, attrs):
    """A stand-in node with the weight as a constant named 'b' (what prepare functions read)."""
    from ember.ir.dtypes import DType
    from ember.ir.graph import Node, Value

    b = Value("b", DType.INT8 if args[1].dtype == torch.int8 else DType.FLOAT8E4M3, tuple(args[1].shape),
              data=np.zeros(1))
    return Node(op, [None, b], [Value("y")], dict(attrs))


QCONV = "ember.QConv"
# (batch, Cin, H, W, Cout, kernel, attrs): the tap loop (Cin 40 ragged, 64 even), flat K (Cin 3)
CONVS = [(1, 3, 9, 11, 16, (3, 5), {"pads": [1, 2, 1, 2], "strides": [1, 2]}),
         (2, 40, 6, 7, 24, 3, {"pads": [1, 1, 1, 1]}),
         (1, 64, 7, 5, 32, 1, {"strides": [2, 2]}),
         (1, 32, 9, 9, 16, 3, {"pads": [2, 2, 2, 2], "dilations": [2, 2]})]


def qconv_case(geo, qtype=torch.int8, x_kind="float", requant=False, act="Relu", residual=False):
    nb, cin, h, w, cout, k, attrs = geo
    kh, kw = (k, k) if isinstance(k, int) else k
    if x_kind == "float":
        x, xzp = rand(nb, cin, h, w, scale=2.0), None
    elif x_kind == "float uint8 zp":
        x, xzp = rand(nb, cin, h, w, scale=2.0), torch.tensor(100, dtype=torch.uint8, device=DEV)
    else:  # uint8 with a zero point, as DynamicQuantizeLinear gives
        x = torch.randint(0, 256, (nb, cin, h, w), generator=torch.Generator().manual_seed(2)).to(torch.uint8).to(DEV)
        xzp = torch.tensor(97, dtype=torch.uint8, device=DEV)
    wq = weight((cout, cin, kh, kw), qtype)
    ws = (torch.rand(cout, generator=torch.Generator().manual_seed(4)) * 0.01 + 0.001).to(DEV)
    args = [x, wq, torch.tensor(0.04, device=DEV), ws, rand(cout, seed=5), None, xzp, None, None]
    a = dict(attrs, kernel_shape=[kh, kw], activation=act, act_keys=[], act_values=[], output_dtype=1)
    want = get(QCONV).call(list(args), a, None)
    if residual:
        args[5] = rand(*want.shape, seed=6)
    if requant:
        args[7] = torch.tensor(0.1 if qtype == torch.int8 else 0.02, device=DEV)
    return args, a


@pytest.mark.parametrize("geo", CONVS, ids=lambda g: f"cin{g[1]}k{g[5]}")
@pytest.mark.parametrize("variant", ["float", "uint8 zp requant", "float uint8 zp residual", "fp8 requant"])
def test_qconv_template_matches_the_reference(geo, variant):
    qtype = FP8 if variant.startswith("fp8") else torch.int8
    x_kind = "uint8" if variant.startswith("uint8") else ("float uint8 zp" if "uint8 zp" in variant else "float")
    args, attrs = qconv_case(geo, qtype, x_kind, requant="requant" in variant, residual="residual" in variant)
    want = get(QCONV).call(list(args), attrs, None)
    node = _node(QCONV, args, attrs)
    bargs = list(args)
    bargs[1] = kq.prepare_qconv_weight(node, {"b": args[1]})[1][1]
    cfg = qt.QCONV_CONFIGS[-1] if geo[1] != 3 else qt.QCONV_CONFIGS[1]
    got = kq._qconv_run(cfg)(bargs, attrs, None)
    assert got.is_contiguous(memory_format=torch.channels_last)
    close(got, want, qtype)


def test_dequantized_fallback_runs_any_convolution():
    nb, cin, h, w = 1, 8, 6, 6
    x = rand(nb, cin, h, w, scale=2.0)
    wq = weight((8, 1, 3, 3), torch.int8)  # depthwise: no template takes it
    args = [x, wq, torch.tensor(0.04, device=DEV), torch.full((8,), 0.01, device=DEV), rand(8, seed=5)]
    attrs = {"group": 8, "pads": [1, 1, 1, 1], "kernel_shape": [3, 3], "activation": "Relu", "output_dtype": 1}
    want = get(QCONV).call(list(args), attrs, None)
    got = kq.dequantized_conv(args, attrs, None)
    assert float((got - want).norm() / want.norm()) < 1e-5  # fp32 operands: the same up to summation order


def test_choices_register_with_parameters_tolerances_and_cuda_only():
    from ember.kernels import TACTICS, get_tactic

    t = get_tactic(f"triton.qgemm[{qt.QGEMM_CONFIGS[0]}]")
    assert t.params["tile"] == qt.QGEMM_CONFIGS[0] and t.tolerance_for(torch.int8) > 0
    assert get_tactic("triton.qconv[32x32x32,w2,s2]") is not None  # rebuilt from its name
    assert {"cublaslt.int8", "cublaslt.fp8", "torch.qconv_dequant"} <= set(TACTICS)
    args, attrs = qgemm_case()
    from ember.ir.dtypes import DType
    from ember.ir.graph import Node, Value

    a = Value("a", DType.FLOAT32, (2, 37, 80))
    b = Value("b", DType.INT8, (80, 48), data=np.zeros((80, 48), np.int8))
    s = Value("s", DType.FLOAT32, ())
    node = Node(QGEMM, [a, b, s, Value("bs", DType.FLOAT32, (48,), data=np.ones(48, np.float32))], [Value("y")], {})
    assert kq.qgemm_applies(node, torch.device("cuda")) and not kq.qgemm_applies(node, torch.device("cpu"))


def qdq_groups():
    """Fusion groups with per-tensor Q/DQ (what a Q/DQ model leaves around pooling and adds)."""
    from ember.ir.dtypes import DType

    from tests.kernels import test_fused_groups as fg

    f32 = DType.FLOAT32
    out = []
    for zp in (np.int8, np.uint8):
        consts = {"s": np.array(0.05, np.float32), "z": np.array(3, zp)}
        out.append(fg.build({"x": (f32, (2, 3, 4, 5)), "b": (f32, (3, 1, 1)), **consts},
                            [("Add", ["x", "b"], {}), ("QuantizeLinear", ["n0", "s", "z"], {}),
                             ("DequantizeLinear", ["n1", "s", "z"], {}), ("Relu", ["n2"], {})]))
        out.append(fg.build({"x": (f32, (2, 3, 4, 5)), **consts},
                            [("Relu", ["x"], {}), ("QuantizeLinear", ["n0", "s", "z"], {})]))
    return out


def test_qdq_fuse_into_pointwise_kernels():
    from tests.kernels import test_fused_groups as fg

    for g, nodes in qdq_groups():
        fg.check(g, nodes)  # integer outputs: equal to the reference, element for element


@pytest.mark.slow
def test_quantized_kernels_compile_for_sm90():
    """Triton's real compiler (no GPU: the compile-only driver) catches what the interpreter does not."""
    import subprocess
    import sys
    from pathlib import Path

    nvidia = pytest.importorskip("triton.backends.nvidia")
    if not (Path(nvidia.__file__).parent / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # (set: this module would default it to 1)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root), os.environ.get("PYTHONPATH", "")])
    script = "from tests.kernels.test_quantized_kernels import _aot_main; _aot_main()"
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=1200)
    assert "AOT-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def _aot_main() -> None:
    from ember.kernels import compile_pool as cp

    cp.install_compile_only_driver({"backend": "cuda", "arch": 90, "warp_size": 32})
    failed, n = [], 0
    for case in ["int8 float-in float-out", "int8 fp16", "int8 clip requant int8", "int8 smooth",
                 "uint8 in with zero point", "fp8", "fp8 requant"]:
        args, attrs = qgemm_case(**GEMM_CASES[case])
        for cfg in (qt.QGEMM_CONFIGS[0], qt.QGEMM_CONFIGS[-1]):
            n += 1
            try:
                colsum = torch.zeros(48, dtype=torch.int32)
                _, launch = qt.qgemm_launch(*args, colsum=colsum, config=cfg, **attrs)
                launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
            except Exception as e:
                failed.append(f"qgemm {case} {cfg}: {type(e).__name__}: {str(e)[-1500:]}")
    for variant in ["float", "uint8 zp requant", "fp8 requant"]:
        for geo in (CONVS[0], CONVS[1]):
            n += 1
            qtype = FP8 if variant.startswith("fp8") else torch.int8
            args, attrs = qconv_case(geo, qtype, "uint8" if variant.startswith("uint8") else "float",
                                     requant="requant" in variant)
            try:
                _, launch = qt.qconv_launch(*args, colsum=torch.zeros(geo[4], dtype=torch.int32),
                                            config=qt.QCONV_CONFIGS[0], **attrs)
                launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
            except Exception as e:
                failed.append(f"qconv {variant} {geo[:6]}: {type(e).__name__}: {str(e)[-1500:]}")
    from ember.kernels.fused_groups import compile_for_target, fuse_group, group_io

    for i, (g, nodes) in enumerate(qdq_groups()):
        n += 1
        try:
            compile_for_target(fuse_group(nodes, *group_io(nodes)), arch=90)
        except Exception as e:
            failed.append(f"Q/DQ group {i}: {type(e).__name__}: {str(e)[-1500:]}")
    print("AOT-FAILED" if failed else "AOT-OK", n)
    print("\n".join(failed))
