"""The LLM engine's Triton kernels against float64 references, on small shapes. Without a GPU they run in
Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are defined); a subprocess also compiles
each one for sm_90 with Triton's real compiler (what the interpreter does not check: types, layouts)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ember.llm.attention import StepInputs  # noqa: E402
from ember.llm.kernels import dispatch  # noqa: E402
from ember.llm.kernels.norm import fused_add_rms_norm  # noqa: E402
from ember.llm.kernels.paged_attention import paged_decode_attention, paged_prefill_attention  # noqa: E402
from ember.llm.kernels.rope import qkv_rope_cache  # noqa: E402
from ember.llm.kernels.swiglu import swiglu  # noqa: E402
from ember.llm.kernels.weight_only import Tiles, weight_only_matmul  # noqa: E402
from ember.llm.quant import quantize_fp8, quantize_int8  # noqa: E402
from tests.sm90 import assert_aot_main_compiles  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked lanes of the interpreter's numpy
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_with_residual(dtype, residual):
    x, r, w = _randn(5, 80, dtype=dtype), _randn(5, 80, dtype=dtype, seed=1), _randn(80, dtype=dtype, seed=2)
    out, res = fused_add_rms_norm(x, w, 1e-5, r if residual else None)
    s = (x.double() + r.double()) if residual else x.double()
    want = w.double() * s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert _rel(out, want) <= 2 * TOL[dtype]
    assert torch.equal(res, (x + r) if residual else x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype):
    x = _randn(7, 2 * 48, dtype=dtype, scale=2.0)
    g, u = x.double().chunk(2, dim=-1)
    assert _rel(swiglu(x), g * torch.sigmoid(g) * u) <= TOL[dtype]


def _rope_table(max_pos: int, half: int) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) * 2 / (2 * half)))
    f = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.stack((f.cos(), f.sin()), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_rope_writes_the_cache(dtype):
    H, KVH, D, T = 4, 2, 16, 6
    qkv = _randn(T, (H + 2 * KVH) * D, dtype=dtype)
    pos = torch.tensor([0, 3, 7, 8, 20, 31], device=DEV)
    slots = torch.tensor([5, 17, 2, 40, 63, 33], device=DEV)
    table = _rope_table(32, D // 2)
    kp = torch.zeros(4, 16, KVH, D, dtype=dtype, device=DEV)
    vp = torch.zeros_like(kp)
    q = qkv_rope_cache(qkv, pos, table.float().to(DEV), slots, kp, vp, H, KVH, D)
    x = qkv.double().cpu()
    c, s = table[pos.cpu(), 0], table[pos.cpu(), 1]

    def rot(t):  # [T, heads, D], rotate_half pairing
        a, b = t[..., : D // 2], t[..., D // 2:]
        return torch.cat((a * c[:, None] - b * s[:, None], b * c[:, None] + a * s[:, None]), dim=-1)

    want_q = rot(x[:, : H * D].reshape(T, H, D))
    want_k = rot(x[:, H * D:(H + KVH) * D].reshape(T, KVH, D))
    want_v = x[:, (H + KVH) * D:].reshape(T, KVH, D)
    assert _rel(q, want_q) <= TOL[dtype]
    flat_k, flat_v = kp.view(-1, KVH, D), vp.view(-1, KVH, D)
    assert _rel(flat_k[slots], want_k) <= TOL[dtype] and torch.equal(flat_v[slots].cpu().double(), want_v)
    others = torch.ones(64, dtype=torch.bool)
    others[slots.cpu()] = False
    assert not flat_k[others.to(DEV)].any()  # nothing else written


def _pools(num_blocks: int, KVH: int, D: int, dtype, seed: int = 0):
    return _randn(num_blocks, 16, KVH, D, dtype=dtype, seed=seed), _randn(num_blocks, 16, KVH, D, dtype=dtype,
                                                                           seed=seed + 1)


def _tables(lens: list[int], num_blocks: int, seed: int = 0) -> torch.Tensor:
    """Block tables drawing blocks in a scrambled order from one pool."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(math.ceil(n / 16) for n in lens)
    rows, at = [], 0
    for n in lens:
        k = math.ceil(n / 16)
        rows.append(order[at:at + k] + [0] * (width - k))
        at += k
    return torch.tensor(rows, dtype=torch.int32, device=DEV)


def _reference(q, kp, vp, table, lens, q_lens, scale, window):
    """float64: each sequence's queries (the last q_len positions of its context) over its context."""
    out = []
    at = 0
    kd, vd = kp.double().cpu(), vp.double().cpu()
    for i, (n, ql) in enumerate(zip(lens, q_lens)):
        blocks = table[i, : math.ceil(n / 16)].cpu().long()
        k = kd[blocks].reshape(-1, kd.shape[2], kd.shape[3])[:n]
        v = vd[blocks].reshape(-1, vd.shape[2], vd.shape[3])[:n]
        qi = q[at:at + ql].double().cpu()
        G = qi.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        s = torch.einsum("qhd,khd->hqk", qi, k) * scale
        qpos = torch.arange(n - ql, n)[:, None]
        kpos = torch.arange(n)[None, :]
        ok = kpos <= qpos
        if window:
            ok &= kpos > qpos - window
        s = s.masked_fill(~ok[None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
        at += ql
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 40])
def test_paged_decode_attention_with_splits(dtype, window, monkeypatch):
    from ember.llm.kernels import paged_attention as pa

    monkeypatch.setattr(pa, "PART", 64)  # small splits: several per context at test sizes
    H, KVH, D = 4, 2, 32
    lens = [1, 17, 130, 200]
    kp, vp = _pools(40, KVH, D, dtype)
    table = _tables(lens, 40)
    q = _randn(len(lens), H, D, dtype=dtype, seed=5)
    got = paged_decode_attention(q, kp, vp, table, torch.tensor(lens, dtype=torch.int32, device=DEV), D ** -0.5,
                                 window, max_seq_len=256)
    want = _reference(q, kp, vp, table, lens, [1] * len(lens), D ** -0.5, window)
    assert _rel(got, want) <= 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 24])
def test_paged_prefill_attention_varlen(dtype, window):
    H, KVH, D = 4, 1, 16
    # a fresh prompt, a chunk after a cached prefix, a decode token, a longer prompt (several query tiles)
    lens, q_lens = [21, 50, 33, 90], [21, 14, 1, 90]
    kp, vp = _pools(24, KVH, D, dtype)
    table = _tables(lens, 24)
    starts = [0]
    for ql in q_lens:
        starts.append(starts[-1] + ql)
    q = _randn(starts[-1], H, D, dtype=dtype, seed=7)
    step = StepInputs(tokens=torch.zeros(starts[-1], dtype=torch.long), positions=torch.zeros(0), slots=torch.zeros(0),
                      block_tables=table, seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEV),
                      query_starts=torch.tensor(starts, dtype=torch.int32, device=DEV), logit_rows=torch.zeros(0),
                      q_lens=q_lens, seq_lens_host=lens)
    got = paged_prefill_attention(q, kp, vp, step, D ** -0.5, window, block_m=32, block_n=32)
    want = _reference(q, kp, vp, table, lens, q_lens, D ** -0.5, window)
    assert _rel(got, want) <= 2 * TOL[dtype]


@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("split", [1, 3])
def test_weight_only_int8(M, split):
    N, K = 96, 200
    x = _randn(M, K, dtype=torch.float32, seed=3)
    q, s = quantize_int8(_randn(N, K, seed=4).cpu())
    q, s = q.to(DEV), s.to(DEV)
    y = weight_only_matmul(x, q, s, Tiles(16, 32, 32, split, 4, 1))
    want = x.double() @ (q.double() * s.double()[:, None]).T
    assert y.dtype == x.dtype and _rel(y, want) <= 1e-5
    assert _rel(weight_only_matmul(x, q, s), want) <= 1e-5  # the rule's own tiles


def test_weight_only_fp8_and_fp16_activations():
    N, K = 64, 128
    x = _randn(3, K, dtype=torch.float16, seed=8)
    f8, s = quantize_fp8(_randn(N, K, seed=9).cpu())
    y = weight_only_matmul(x, f8.to(DEV), s.to(DEV), Tiles(16, 32, 64, 2, 4, 1))
    want = x.double() @ (f8.double() * s.double()[:, None]).to(DEV).T
    assert y.dtype == torch.float16 and _rel(y, want) <= 2e-3


def test_whole_model_through_the_kernels_matches_the_torch_path(tmp_path: Path, monkeypatch):
    """The tiny Llama 3 (GQA, RoPE scaling) greedy through every Triton kernel (interpreted on CPU), with
    chunked prefill and batched decode, gives the torch path's tokens."""
    from ember.llm.engine import EngineOptions, LLMEngine
    from ember.llm.loader import load_model
    from ember.llm.sampling import SamplingParams

    from .helpers import save_hf_checkpoint, tiny_hf_model

    model = load_model(save_hf_checkpoint(tiny_hf_model("llama3", num_hidden_layers=1), tmp_path / "m"))
    prompts = [[256, 5, 9, 80, 3, 3, 200, 17, 4, 60, 61, 62, 63, 1, 2, 77, 90, 91, 92, 93], [256, 7, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in LLMEngine(model, "cpu").generate(prompts, params)]
    monkeypatch.setattr(dispatch, "_FORCE", "interpret" if DEV == "cpu" else "")
    calls: list[str] = []
    for name in ("fused_add_rms_norm", "qkv_rope_cache", "swiglu", "paged_attention"):
        mod = {"fused_add_rms_norm": "norm", "qkv_rope_cache": "rope", "swiglu": "swiglu",
               "paged_attention": "paged_attention"}[name]
        module = __import__(f"ember.llm.kernels.{mod}", fromlist=[name])
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    eng = LLMEngine(model, DEV, EngineOptions(max_num_batched_tokens=12, cuda_graphs=False))
    assert [o.token_ids for o in eng.generate(prompts, params)] == want
    assert set(calls) == {"fused_add_rms_norm", "qkv_rope_cache", "swiglu", "paged_attention"}
    # and the decode steps as (emulated) graphs: the kernels read the lengths from the device buffers, with
    # as many context splits as max_model_len needs
    from ember.llm.graphs import DecodeGraphs

    monkeypatch.setattr(DecodeGraphs, "emulate", True)
    graphed = LLMEngine(model, DEV, EngineOptions(max_num_batched_tokens=12, max_num_seqs=4))
    assert [o.token_ids for o in graphed.generate(prompts, params)] == want
    assert graphed.runner.graphs.replays >= 5


# -- compiled for the GPU (no GPU needed) ----------------------------------------------------------------------
def _aot_main() -> None:
    """In a process with TRITON_INTERPRET=0: compile every kernel for sm_90 in its real configurations."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ember.llm.kernels import norm, paged_attention, rope, swiglu as sw, weight_only

    def sig(fn, types: dict[str, str], consts: dict) -> dict[str, str]:
        return {p: ("constexpr" if p in consts else types.get(p, "i32")) for p in fn.arg_names}

    cases = []
    for dt in ("fp16", "bf16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        p = f"*{dt}"
        cases += [
            (norm._add_rms_norm, {"x_ptr": p, "res_ptr": p, "w_ptr": p, "out_ptr": p, "res_out_ptr": p, "eps": "fp32"},
             dict(HAS_RES=True, BLOCK=4096)),
            (sw._swiglu, {"x_ptr": p, "out_ptr": p}, dict(BLOCK=1024)),
            (rope._qkv_rope_cache, {"qkv_ptr": p, "pos_ptr": "*i64", "rope_ptr": "*fp32", "slot_ptr": "*i64",
                                    "q_ptr": p, "k_ptr": p, "v_ptr": p}, dict(HALF=64, BLOCK=64)),
            (paged_attention._decode_split, {"q_ptr": p, "k_ptr": p, "v_ptr": p, "bt_ptr": "*i32", "lens_ptr": "*i32",
                                             "o_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "scale": "fp32"},
             dict(G=4, BLOCK_G=16, D=128, BLOCK_D=128, BLOCK_N=64, PART_TOKENS=512, PRECISION=prec)),
            (paged_attention._decode_merge, {"o_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": p},
             dict(D=128, BLOCK_S=8, BLOCK_D=128)),
            (paged_attention._prefill, {"q_ptr": p, "k_ptr": p, "v_ptr": p, "o_ptr": p, "bt_ptr": "*i32",
                                        "qstart_ptr": "*i32", "lens_ptr": "*i32", "tile_seq_ptr": "*i32",
                                        "tile_row_ptr": "*i32", "scale": "fp32"},
             dict(G=1, D=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=64, PRECISION=prec)),
        ]
        for w in ("*i8", "*fp8e4nv"):
            for bm, bn, bk, split in ((16, 16, 256, 1), (16, 64, 256, 1), (16, 32, 256, 4), (128, 128, 64, 2)):
                cases.append((weight_only._w8_matmul, {"x_ptr": p, "w_ptr": w, "s_ptr": "*fp32",
                                                       "y_ptr": p if split == 1 else "*fp32"},
                              dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, PRECISION=prec)))
    failed = []
    for fn, types, consts in cases:
        try:
            triton.compile(ASTSource(fn, signature=sig(fn, types, consts), constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except Exception as e:  # report all of them
            failed.append(f"{fn.fn.__name__} {types.get('q_ptr', types.get('x_ptr'))}: {type(e).__name__}: "
                          f"{str(e)[-800:]}")
    print("AOT-FAILED" if failed else "AOT-OK", len(cases))
    print("\n".join(failed))


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    assert_aot_main_compiles("tests.llm.test_kernels")


def test_decode_graphs_per_bucket_give_the_eager_tokens(tmp_path: Path, monkeypatch):
    """Decode steps through DecodeGraphs (emulated on the CPU: replays recompute into the same buffers) at
    batch sizes 3, 5, 2 and 1 use buckets 4, 8, 2 and 1, pad onto the scratch block, and give the tokens of
    the eager path; a bucket captured once serves later steps."""
    from ember.llm.engine import EngineOptions, LLMEngine
    from ember.llm.graphs import DecodeGraphs
    from ember.llm.loader import load_model
    from ember.llm.sampling import SamplingParams

    from .helpers import save_hf_checkpoint, tiny_hf_model

    model = load_model(save_hf_checkpoint(tiny_hf_model("mistral"), tmp_path / "m"))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 30, 4, 17, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    eager = LLMEngine(model, "cpu", EngineOptions(cuda_graphs=False))
    assert eager.runner.graphs is None
    monkeypatch.setattr(DecodeGraphs, "emulate", True)
    graphed = LLMEngine(model, "cpu", EngineOptions(max_num_seqs=8))
    graphs = graphed.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8]
    for batch in (prompts[:3], prompts, prompts[3:], prompts[:1]):
        assert [o.token_ids for o in graphed.generate(batch, params)] == \
            [o.token_ids for o in eager.generate(batch, params)]
    assert set(graphs.graphs) == {1, 2, 4, 8} and graphs.replays > 40
    assert graphed.kv.k.shape[1] == graphed.blocks.num_blocks + 1  # the scratch block is never handed out


def test_int8_model_through_the_weight_only_kernel(tmp_path: Path, monkeypatch):
    from ember.llm.engine import EngineOptions, LLMEngine
    from ember.llm.loader import load_model
    from ember.llm.sampling import SamplingParams
    from ember.llm.kernels import weight_only

    from .helpers import save_hf_checkpoint, tiny_hf_model

    model = load_model(save_hf_checkpoint(tiny_hf_model("qwen2", num_hidden_layers=1), tmp_path / "m"), weights="int8")
    prompts = [[256, 5, 9, 80, 3, 3, 200, 17], [256, 7, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = [o.token_ids for o in LLMEngine(model, "cpu").generate(prompts, params)]
    monkeypatch.setattr(dispatch, "_FORCE", "interpret" if DEV == "cpu" else "")
    used = []
    real = weight_only.weight_only_matmul
    monkeypatch.setattr(weight_only, "weight_only_matmul", lambda *a, **k: (used.append(a[0].shape), real(*a, **k))[1])
    got = LLMEngine(model, DEV, EngineOptions(cuda_graphs=False)).generate(prompts, params)
    assert [o.token_ids for o in got] == want and len(used) >= 4 * 6
