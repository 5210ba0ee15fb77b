"""The decode GEMV of int8/fp8 weight-only layers (ember.llm.kernels.w8_gemv) against a float64 reference of
x @ (W * scale).T, on small shapes whose K and N are not multiples of any block. Without a GPU the kernel runs
in Triton's interpreter (TRITON_INTERPRET=1, set before the kernel is defined); a subprocess compiles every
autotune candidate for sm_90 with Triton's real compiler (layouts and types, which the interpreter does not
check).

Tolerances (relative L2 against float64): fp32 activations 1e-5 (fp32 accumulation over K <= 200); fp16
outputs 1e-3 and bf16 8e-3 (one rounding of each output: 2^-11 and 2^-8 relative at most, the reference
taking the same rounded x)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ember.llm.kernels import w8_gemv as g  # noqa: E402
from ember.llm.kernels import weight_only  # noqa: E402
from ember.llm.kernels.w8_gemv import CANDIDATES, GemvConfig, bucket, heuristic, w8_gemv  # noqa: E402
from ember.llm.quant import quantize_fp8, quantize_int8  # noqa: E402
from tests.sm90 import assert_aot_main_compiles  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked lanes of the interpreter's numpy


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _randn(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEV)


def _reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias=None) -> torch.Tensor:
    y = x.double() @ (q.double() * s.double()[:, None]).T
    return y if bias is None else y + bias.double()


def _weights(N: int, K: int, scheme: str = "int8", seed: int = 1):
    q, s = (quantize_int8 if scheme == "int8" else quantize_fp8)(_randn(N, K, seed=seed).cpu())
    return q.to(DEV), s.to(DEV)


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("K, N", [(72, 40), (200, 96)])
def test_every_candidate_of_the_bucket_matches_float64(M, K, N):
    """Each config the autotune may pick for M's bucket (FMA and tensor-core paths), and the untuned rule."""
    x = _randn(M, K, seed=M)
    q, s = _weights(N, K)
    want = _reference(x, q, s)
    for cfg in (*CANDIDATES[bucket(M)], heuristic(M, N, K, sms=4)):
        y = w8_gemv(x, q, s, cfg=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float32
        assert _rel(y, want) <= TOL[torch.float32], cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_half_activations(dtype, M):
    K, N = 72, 40
    x = _randn(M, K, seed=10 + M, dtype=dtype)
    q, s = _weights(N, K, seed=2)
    cfgs = [heuristic(M, N, K, sms=4), GemvConfig(16, 16, 32, 4, 2, True),
            GemvConfig(bucket(min(M, 4)), 4, 64, 4, 1, False)]
    if dtype == torch.bfloat16 and DEV == "cpu":  # the interpreter's tl.dot reads bf16 bits as integers
        cfgs = [c for c in cfgs if not c.dot]
    for cfg in cfgs:
        y = w8_gemv(x, q, s, cfg=cfg)
        assert y.dtype == dtype and _rel(y, _reference(x, q, s)) <= TOL[dtype], cfg


@pytest.mark.parametrize("M", [1, 3, 8])
def test_fp8_weights(M):
    K, N = 72, 40
    x = _randn(M, K, seed=20 + M, dtype=torch.float16)
    f8, s = _weights(N, K, "fp8", seed=3)
    for cfg in (heuristic(M, N, K, sms=4), GemvConfig(16, 16, 32, 4, 2, True), GemvConfig(1, 8, 128, 4, 1, False)):
        assert _rel(w8_gemv(x, f8, s, cfg=cfg), _reference(x, f8, s)) <= TOL[torch.float16], cfg


def test_int8_conversion_is_exact_for_every_byte():
    """One-hot rows of x pick single columns of W: with scale 1 the outputs are the bytes themselves, all
    256 of them, exactly (the exponent trick of the FMA path in fp32, of the tensor-core path in fp16)."""
    K, N = 256, 48
    q = (torch.arange(N * K) % 256 - 128).to(torch.int8).reshape(N, K).to(DEV)
    s = torch.ones(N, device=DEV)
    cols = torch.tensor([0, 1, 127, 128, 129, 200, 254, 255])
    for dtype, cfg in ((torch.float32, GemvConfig(1, 4, 128, 4, 1, False)),
                       (torch.float32, GemvConfig(4, 2, 256, 4, 1, False)),
                       (torch.float16, GemvConfig(16, 16, 64, 4, 2, True)),
                       (torch.float16, GemvConfig(2, 4, 64, 4, 1, False))):
        m = cfg.block_m if not cfg.dot else len(cols)
        x = torch.zeros(m, K, dtype=dtype, device=DEV)
        x[torch.arange(m), cols[:m].to(DEV)] = 1
        y = w8_gemv(x, q, s, cfg=cfg)
        assert torch.equal(y.double().cpu(), q.double().cpu()[:, cols[:m]].T), cfg


def test_bias_strided_rows_and_leading_dims():
    """The bias is added in the epilogue; x may be a view with a row stride; [..., K] keeps its leading dims."""
    K, N = 72, 40
    big = _randn(3, 100, seed=30)
    x = big[:, :K]  # row stride 100
    q, s = _weights(N, K, seed=4)
    b = _randn(N, seed=31)
    want = _reference(x, q, s, b)
    for cfg in (GemvConfig(4, 4, 32, 4, 1, False), GemvConfig(16, 16, 64, 4, 2, True)):
        assert _rel(w8_gemv(x, q, s, b, cfg=cfg), want) <= TOL[torch.float32], cfg
    y = w8_gemv(x.reshape(1, 3, K), q, s, b)
    assert y.shape == (1, 3, N) and _rel(y.reshape(3, N), want) <= TOL[torch.float32]


def test_refuses_more_rows_and_transposed_weights():
    q, s = _weights(40, 72)
    with pytest.raises(ValueError, match="at most 16 rows"):
        w8_gemv(_randn(17, 72), q, s)
    with pytest.raises(ValueError, match="K-contiguous"):
        w8_gemv(_randn(1, 40), q.T, s[:72] if len(s) >= 72 else torch.ones(72, device=DEV))


def test_decode_rows_take_the_gemv_and_prefill_the_tiled_kernel(monkeypatch):
    """weight_only_matmul: up to 16 rows (no tiles asked for) through w8_gemv with the bias fused, more rows
    through the tiled GEMM plus the bias; both match float64."""
    K, N = 72, 40
    q, s = _weights(N, K, seed=5)
    b = _randn(N, seed=6)
    used = []
    real_gemv, real_tiled = weight_only.w8_gemv, weight_only._tiled
    monkeypatch.setattr(weight_only, "w8_gemv", lambda *a, **k: (used.append("gemv"), real_gemv(*a, **k))[1])
    monkeypatch.setattr(weight_only, "_tiled", lambda *a, **k: (used.append("tiled"), real_tiled(*a, **k))[1])
    for M in (1, 16, 17):
        x = _randn(M, K, seed=40 + M)
        assert _rel(weight_only.weight_only_matmul(x, q, s, bias=b), _reference(x, q, s, b)) <= TOL[torch.float32]
    assert used == ["gemv", "gemv", "tiled"]


def test_heuristic_fills_an_h200_at_the_7b_shapes():
    """Untuned configs for Llama-2-7B's layers (wqkv, wo, w13 fused gate/up, w2) on 132 SMs: a program per
    SM at least, two unless the tile is at its narrowest, FMA tiles for M <= 2 (at most 64 weights a thread)
    and 16-row tensor-core tiles above."""
    for N, K in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)):
        for M in (1, 2, 4, 8, 16):
            cfg = heuristic(M, N, K, sms=132)
            assert cfg.dot == (M > 2) and (cfg.dot or cfg.block_m == M)
            programs = -(-N // cfg.block_n)
            assert programs >= 132 and (programs >= 2 * 132 or cfg.block_n == (16 if cfg.dot else 1))
            assert cfg.dot or cfg.block_n * cfg.block_k // (32 * cfg.warps) <= 64
    assert [bucket(m) for m in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]


def test_no_tuning_off_the_gpu():
    """On the CPU (or in the interpreter) the config is the rule's, and nothing is recorded as tuned."""
    x = _randn(3, 72)
    q, s = _weights(40, 72)
    if DEV == "cpu":
        assert g.choose(x, q, s, None) == heuristic(3, 40, 72, 4)
        assert g.tuned() == {}


@pytest.mark.cuda
def test_autotune_on_the_gpu_picks_a_candidate_and_stays_correct():
    K, N = 4096, 4096
    q, s = _weights(N, K, seed=7)
    for M in (1, 8):
        x = _randn(M, K, seed=50 + M, dtype=torch.float16)
        y = w8_gemv(x, q, s)
        key = (torch.cuda.current_device(), bucket(M), N, K, torch.int8, torch.float16, False)
        assert g.tuned()[key] in CANDIDATES[bucket(M)]
        assert _rel(y, _reference(x, q, s)) <= TOL[torch.float16]


# -- compiled for sm_90 (no GPU needed) -----------------------------------------------------------------------
def _aot_main() -> None:
    """In a process with TRITON_INTERPRET=0: compile each candidate for sm_90, and the variants (dtypes, fp8,
    ragged K, bias) on one FMA and one tensor-core config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = g._w8_gemv

    def compile_one(cfg: GemvConfig, xdt: str, wdt: str, even_k: bool, bias: bool) -> None:
        consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT=cfg.dot, EVEN_K=even_k,
                      HAS_BIAS=bias, INT8=wdt == "i8", PRECISION="ieee" if xdt == "fp32" else "tf32")
        types = {"x_ptr": f"*{xdt}", "w_ptr": f"*{wdt}", "s_ptr": "*fp32", "b_ptr": f"*{xdt}", "y_ptr": f"*{xdt}"}
        sig = {p: ("constexpr" if p in consts else types.get(p, "i32")) for p in fn.arg_names}
        triton.compile(ASTSource(fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.warps, "num_stages": cfg.stages})

    cases = {(c, "fp16", "i8", True, False) for cands in CANDIDATES.values() for c in cands}
    for cfg in (CANDIDATES[1][0], CANDIDATES[4][0], CANDIDATES[8][0]):
        for xdt in ("fp16", "bf16", "fp32"):
            for wdt in ("i8", "fp8e4nv"):
                cases.add((cfg, xdt, wdt, xdt != "fp32", xdt == "bf16"))
    failed = []
    for case in sorted(cases, key=str):
        try:
            compile_one(*case)
        except Exception as e:  # report all of them
            failed.append(f"{case}: {type(e).__name__}: {str(e)[-600:]}")
    print("AOT-FAILED" if failed else "AOT-OK", len(cases))
    print("\n".join(failed))


@pytest.mark.slow
def test_candidates_compile_for_sm90():
    assert_aot_main_compiles("tests.kernels.test_weight_only_gemv")
