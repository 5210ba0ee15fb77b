"""Triton GEMM / implicit-GEMM conv templates match ember.Gemm / ember.Conv's reference functions.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported) on CPU tensors, on small shapes with small tiles so M, N and K edges are all
exercised. References run in float64 on the same (rounded) inputs. Tolerances: fp32 inputs use
exact fp32 products (1e-4); fp16 1e-2 and bf16 5e-2 relative to the output's magnitude, a few
ulps of the one rounding of the fp32 accumulator.
"""
from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

from ember.ir.graph import Graph  # noqa: E402
from ember.kernels import TACTICS, candidates, get_tactic, triton_math  # noqa: E402
from ember.kernels import triton_templates as tt  # noqa: E402
from ember.ops import get  # noqa: E402
from ember.ops.infer import infer_shapes  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and type(tt._gemm_kernel).__name__ != "InterpretedFunction":
    # imported before this module set TRITON_INTERPRET: rebind the kernels to the interpreter
    importlib.reload(triton_math)
    importlib.reload(tt)
# masked-off lanes may overflow exp() in the interpreter's numpy; harmless
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
SMALL = tt.TileConfig(16, 16, 16, 4, 2)  # every test shape straddles these tiles' edges
CUDA = torch.device("cuda")


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    t = torch.randn(*shape, generator=g)
    return torch.where(t.abs() < 0.05, torch.full_like(t, 0.3), t).to(dtype)  # random, never zero


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    assert got.dtype == dtype and tuple(got.shape) == tuple(want.shape), (got.dtype, got.shape, want.shape)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    scale = want.abs().max().item()
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=tol, atol=tol * max(scale, 1.0))


def ref(op: str, *args, **attrs) -> torch.Tensor:
    return get(op).fn(*[a.double() if a is not None else None for a in args], **attrs)


def on(*ts):
    return [t.to(DEV) if t is not None else None for t in ts]


# activation, keys, values: every activation the templates fuse
ACTIVATIONS = [("", [], []), ("Relu", [], []), ("Gelu", [], []), ("Gelu", ["approximate"], ["tanh"]),
               ("Sigmoid", [], []), ("Tanh", [], []), ("LeakyRelu", ["alpha"], [0.1]), ("Swish", [], []),
               ("Swish", ["alpha"], [1.702]), ("HardSwish", [], []), ("HardSigmoid", ["alpha", "beta"], [0.3, 0.4]),
               ("Elu", ["alpha"], [0.7]), ("Clip", ["min", "max"], [-0.5, 1.5]), ("Clip", ["min"], [0.0]),
               ("Softplus", [], []), ("Mish", [], [])]


# -- GEMM --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act, keys, values", ACTIVATIONS, ids=lambda v: v if isinstance(v, str) else None)
def test_gemm_activations(act, keys, values):
    a, w, b = rand(2, 19, 37), rand(21, 37, seed=1), rand(21, seed=2)
    attrs = dict(trans_b=1, activation=act, act_keys=keys, act_values=values)
    got = tt.gemm(*on(a, w, b), config=SMALL, **attrs)
    close(got, ref("ember.Gemm", a, w, b, **attrs))


@pytest.mark.parametrize("after, bias, act", [(0, True, "Relu"), (1, True, "Relu"), (0, False, "Sigmoid"),
                                              (1, False, "Tanh"), (1, True, "")])
def test_gemm_residual_either_order(after, bias, act):
    a, w, r = rand(3, 5, 40), rand(40, 24, seed=1), rand(3, 5, 24, seed=3)
    b = rand(24, seed=2) if bias else None
    attrs = dict(alpha=0.5, activation=act, act_after_residual=after)
    got = tt.gemm(*on(a, w, b, r), config=SMALL, **attrs)
    close(got, ref("ember.Gemm", a, w, b, r, **attrs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, k, n", [(32, 32, 32), (21, 45, 19)])  # even tiles (no K/N masks) and ragged
def test_gemm_half_precision(dtype, m, k, n):
    a, w, b, r = rand(2, m, k, dtype=dtype), rand(k, n, seed=1, dtype=dtype), rand(n, seed=2, dtype=dtype), \
        rand(2, m, n, seed=3, dtype=dtype)
    attrs = dict(activation="Gelu", act_after_residual=0)
    got = tt.gemm(*on(a, w, b, r), config=SMALL, **attrs)
    close(got, ref("ember.Gemm", a, w, b, r, **attrs), dtype)


def test_gemm_strided_rows_and_broadcast_biases():
    big = rand(50, 64)
    a = big[:, 3:40]  # rows 64 apart, last dim contiguous
    w = rand(37, 18, seed=1)
    for bias in (rand(1, 18, seed=2), rand(1, seed=4)):
        got = tt.gemm(*on(a, w, bias), config=tt.TileConfig(32, 16, 16, 4, 2))
        close(got, ref("ember.Gemm", a, w, bias))


def test_gemm_batched_weights_fall_back_to_the_reference():
    a, w = rand(2, 5, 8), rand(2, 8, 6, seed=1)
    close(tt.gemm(*on(a, w), config=SMALL), ref("ember.Gemm", a, w))


def gemm_node(dtype=np.float16, act: str = "", trans_b: int = 1, keys=None, values=None):
    g = Graph()
    rng = np.random.default_rng(0)
    from ember.ir.dtypes import from_numpy

    x = g.add_input("x", from_numpy(np.dtype(dtype)), (2, "s", 40))
    w = g.add_const("w", rng.standard_normal((24, 40) if trans_b else (40, 24)).astype(dtype))
    b = g.add_const("b", rng.standard_normal(24).astype(dtype))
    attrs = {"trans_b": trans_b, "activation": act, "act_keys": keys or [], "act_values": values or []}
    node = g.add_node("ember.Gemm", [x, w, b], 1, attrs, name="gemm")
    g.outputs = [node.outputs[0]]
    infer_shapes(g)
    return g, node


def test_gemm_tactics_registered_and_conservative():
    node = gemm_node()[1]
    names = {t.name for t in candidates(node, CUDA)}
    assert {f"triton.gemm[{c}]" for c in tt.GEMM_CONFIGS} <= names
    assert "triton.gemm[128x256x64,w8,s3]" in TACTICS
    assert not any(n.startswith("triton.") for n in {t.name for t in candidates(node, torch.device("cpu"))})
    for bad in (gemm_node(np.float32)[1], gemm_node(act="Celu")[1],
                gemm_node(act="Gelu", keys=["approximate"], values=["erfc"])[1]):
        assert not any(t.name.startswith("triton.") for t in candidates(bad, CUDA))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_tactic_prepare_and_run(trans_b):
    g, node = gemm_node(trans_b=trans_b, act="Relu")
    t = get_tactic(f"triton.gemm[{tt.GEMM_CONFIGS[-1]}]")  # 64x64x64: one tile here
    consts = {v.name: torch.from_numpy(v.data) for v in g.initializers.values()}
    (pos, (key, w)), = t.prepare(node, consts).items()
    assert pos == 1 and key == ("w@tgemm_t" if trans_b else "w@tgemm") and w.shape == consts["w"].shape
    assert w.stride(0 if trans_b else 1) == 1  # K x N row-major memory either way
    x = rand(2, 7, 40, dtype=torch.float16)
    got = t.run(on(x, w, consts["b"]), dict(node.attrs), None)
    close(got, ref("ember.Gemm", x, consts["w"], consts["b"], **node.attrs), torch.float16)


# -- convolution -------------------------------------------------------------------------------------
# (batch, Cin, H, W, Cout, kernel, attrs): tap loop (Cin 12 ragged, 16/32 even), flat K (Cin 3)
CONVS = [(1, 3, 9, 11, 12, (3, 5), {"pads": [1, 2, 1, 2], "strides": [1, 2]}),
         (1, 16, 7, 9, 16, (1, 3), {"pads": [0, 1, 0, 1], "dilations": [1, 2], "strides": [2, 1]}),
         (2, 16, 7, 6, 20, 1, {}), (1, 12, 9, 9, 16, 1, {"strides": [2, 2]}),
         (2, 16, 6, 7, 16, 3, {"pads": [1, 1, 1, 1]}),
         (1, 32, 9, 8, 20, 3, {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
         (1, 12, 9, 9, 18, 3, {"pads": [2, 2, 2, 2], "dilations": [2, 2]}),
         (1, 3, 15, 13, 20, 7, {"pads": [3, 3, 3, 3], "strides": [2, 2]}),
         (1, 12, 8, 7, 16, 3, {"pads": [0, 1, 1, 0]}),
         (1, 3, 7, 9, 10, 3, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
         (1, 16, 6, 6, 17, 3, {"auto_pad": "VALID"})]


@pytest.mark.parametrize("nb, cin, h, w, cout, k, geo", CONVS, ids=lambda v: None)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_conv_geometries(nb, cin, h, w, cout, k, geo, layout):
    kh, kw = k if isinstance(k, tuple) else (k, k)
    x, wt, b = rand(nb, cin, h, w), rand(cout, cin, kh, kw, seed=1), rand(cout, seed=2)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    attrs = dict(geo, activation="Relu")
    got = tt.conv2d(*on(x, wt, b), config=SMALL, **attrs)
    assert got.is_contiguous(memory_format=torch.channels_last)
    close(got, ref("ember.Conv", x, wt, b, **attrs))


CONV_ACTS = [a for a in ACTIVATIONS if a[0] in ("Gelu", "HardSwish", "Clip", "Mish")]


@pytest.mark.parametrize("act, keys, values", CONV_ACTS, ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("after", [0, 1])
def test_conv_residual_and_activations(act, keys, values, after):
    x, wt, b = rand(2, 16, 6, 5), rand(20, 16, 3, 3, seed=1), rand(20, seed=2)
    r = rand(2, 20, 3, 3, seed=3)  # NCHW-contiguous residual, read through its strides
    if after:
        r = r.contiguous(memory_format=torch.channels_last)
    attrs = dict(pads=[1, 1, 1, 1], strides=[2, 2], activation=act, act_keys=keys, act_values=values,
                 act_after_residual=after)
    close(tt.conv2d(*on(x, wt, b, r), config=SMALL, **attrs), ref("ember.Conv", x, wt, b, r, **attrs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cin, k", [(3, 7), (32, 3)])
def test_conv_half_precision(dtype, cin, k):
    x, wt = rand(1, cin, 9, 9, dtype=dtype), rand(16, cin, k, k, seed=1, dtype=dtype)
    attrs = dict(pads=[k // 2] * 4, strides=[2, 2], activation="Swish")
    close(tt.conv2d(*on(x, wt), config=SMALL, **attrs), ref("ember.Conv", x, wt, **attrs), dtype)


def conv_node(dtype=np.float16, group: int = 1, op: str = "ember.Conv", rank: int = 4, **attrs):
    from ember.ir.dtypes import from_numpy

    g = Graph()
    rng = np.random.default_rng(0)
    x = g.add_input("x", from_numpy(np.dtype(dtype)), (1, 8, "h", 9)[:rank])
    w = g.add_const("w", rng.standard_normal((16, 8 // group, 3, 3)[:rank]).astype(dtype))
    b = g.add_const("b", rng.standard_normal(16).astype(dtype))
    node = g.add_node(op, [x, w, b], 1, {"pads": [1] * (2 * (rank - 2)), "group": group, **attrs}, name="conv")
    g.outputs = [node.outputs[0]]
    infer_shapes(g)
    return g, node


def test_conv_tactics_registered_and_conservative():
    names = {t.name for t in candidates(conv_node(op="Conv")[1], CUDA)}
    assert {f"triton.conv_nhwc[{c}]" for c in tt.CONV_CONFIGS} <= names
    for bad in (conv_node(group=2)[1], conv_node(rank=3)[1], conv_node(np.float32)[1],
                conv_node(activation="Selu")[1]):
        assert not any(t.name.startswith("triton.") for t in candidates(bad, CUDA))
    assert not tt.conv_applies(conv_node()[1], torch.device("cpu"))


def test_conv_tactic_prepare_and_run():
    g, node = conv_node(activation="Relu")
    t = get_tactic("triton.conv_nhwc[128x64x32,w4,s4]")
    consts = {v.name: torch.from_numpy(v.data) for v in g.initializers.values()}
    (pos, (key, w)), = t.prepare(node, consts).items()
    assert pos == 1 and key == "w@tconv" and w.stride(0) == 1 and tuple(w.shape) == (16, 8, 3, 3)
    x = rand(1, 8, 10, 9, dtype=torch.float16)
    got = t.run(on(x, w, consts["b"]), dict(node.attrs), None)
    close(got, ref("ember.Conv", x, consts["w"], consts["b"], **node.attrs), torch.float16)


# -- every registered configuration, on shapes that straddle its tiles --------------------------------
@pytest.mark.parametrize("cfg", tt.GEMM_CONFIGS, ids=str)
def test_every_gemm_config(cfg):
    a, w, b, r = rand(70, 150, dtype=torch.float16), rand(72, 150, seed=1, dtype=torch.float16), \
        rand(72, seed=2, dtype=torch.float16), rand(70, 72, seed=3, dtype=torch.float16)
    attrs = dict(trans_b=1, activation="Gelu", act_after_residual=1)
    close(tt.gemm(*on(a, w, b, r), config=cfg, **attrs), ref("ember.Gemm", a, w, b, r, **attrs), torch.float16)


@pytest.mark.parametrize("cfg", tt.CONV_CONFIGS, ids=str)
def test_every_conv_config(cfg):
    for cin, k, s in ((3, 7, 2), (72, 3, 1)):  # flat K (a stem) and the tap loop with a ragged channel chunk
        x, wt = rand(2, cin, 11, 10, dtype=torch.float16), rand(80, cin, k, k, seed=1, dtype=torch.float16) / k
        b = rand(80, seed=2, dtype=torch.float16)
        attrs = dict(strides=[s, s], pads=[k // 2] * 4, activation="Relu")
        close(tt.conv2d(*on(x, wt, b), config=cfg, **attrs), ref("ember.Conv", x, wt, b, **attrs), torch.float16)
