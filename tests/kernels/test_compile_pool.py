"""Ahead-of-time Triton compiles in worker processes (kernels/compile_pool.py).

Workers compile for a GPU target without a GPU (Triton ships ptxas), so these tests compile real
sm_90 kernels on a CPU-only machine. What matters is that a launch in the builder's process then
finds the worker's kernel in Triton's cache instead of compiling it again: checked by launching
Triton's JIT on real tensors in another fresh process and watching the cache directory.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():  # as every kernel test module: set before any test imports triton kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from ember.kernels import compile_pool as cp  # noqa: E402
from ember.kernels import triton_templates as tt  # noqa: E402

SM90 = {"backend": "cuda", "arch": 90, "warp_size": 32}


def has_ptxas() -> bool:
    return os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def gemm_spec(m: int = 128, n: int = 256, k: int = 64, cfg=tt.GEMM_CONFIGS[-1], dtype=torch.float16):
    a, w = torch.empty(m, k, dtype=dtype, device="meta"), torch.empty(k, n, dtype=dtype, device="meta")
    return tt.gemm_launch(a, w, activation="Relu", config=cfg)[1].spec()


def test_specs_are_equal_where_triton_compiles_once():
    assert gemm_spec(m=128).key() == gemm_spec(m=256).key()  # both multiples of 16
    assert gemm_spec(m=128).key() != gemm_spec(m=120).key()  # Triton specializes on divisibility by 16
    assert gemm_spec(m=1).key() != gemm_spec(m=17).key()  # and on 1
    assert gemm_spec(cfg=tt.GEMM_CONFIGS[0]).key() != gemm_spec(cfg=tt.GEMM_CONFIGS[1]).key()
    spec = gemm_spec()
    assert spec.module == "ember.kernels.triton_templates" and spec.name == "_gemm_kernel"
    assert spec.args[0] == cp.TensorArg("float16", True)
    x = torch.zeros(33, dtype=torch.float16)
    assert cp.CompileSpec.of(tt._gemm_kernel, (x[1:],), {}).args[0] == cp.TensorArg("float16", False)


@pytest.mark.skipif(not has_ptxas(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_a_worker_compiles_for_sm90_and_the_jit_finds_it(tmp_path):
    cache = str(tmp_path / "triton")
    pool = cp.CompilePool(SM90, workers=1)
    try:
        spec = gemm_spec()
        fut = pool.submit(spec, cache)
        assert pool.submit(gemm_spec(m=512), cache) is fut  # the same kernel for Triton: one compile
        assert fut.result(timeout=300) > 0
        bad = pool.submit(cp.CompileSpec("ember.no_such_module", "k", (), ()), cache)
        with pytest.raises(RuntimeError, match="no_such_module"):
            bad.result(timeout=300)
        assert pool.submit(gemm_spec(cfg=tt.GEMM_CONFIGS[-2]), cache).result(timeout=300) > 0  # still serving
    finally:
        pool.close()
    before = {(p, f): os.path.getmtime(os.path.join(cache, p, f)) for p in os.listdir(cache)
              for f in os.listdir(os.path.join(cache, p))}
    assert len({p for p, _ in before}) == 2 and any(f.endswith(".cubin") for _, f in before)
    # a fresh process launches Triton's JIT (warmup) on real tensors, as the tuner does on the GPU
    script = textwrap.dedent(f"""
        import torch
        from ember.kernels import compile_pool as cp, triton_templates as tt
        cp.install_compile_only_driver({SM90!r})
        a, w = torch.randn(128, 64).half(), torch.randn(64, 256).half()
        c, launch = tt.gemm_launch(a, w, activation="Relu", config=tt.GEMM_CONFIGS[-1])
        launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300, capture_output=True)
    after = {(p, f): os.path.getmtime(os.path.join(cache, p, f)) for p in os.listdir(cache)
             for f in os.listdir(os.path.join(cache, p))}
    assert after == before  # nothing compiled, nothing rewritten: a cache hit


def test_no_workers_when_asked_for_none(monkeypatch):
    monkeypatch.setenv(cp.WORKERS_ENV, "0")
    assert cp.shared_pool(torch.device("cuda")) is None
    monkeypatch.setenv(cp.WORKERS_ENV, "3")
    assert cp.default_workers() == 3
