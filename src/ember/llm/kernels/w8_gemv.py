"""Decode-size weight-only GEMV: y = x W^T * scale (+ bias) for M <= 16 rows of x, W int8 or fp8 e4m3 [N, K]
(K-contiguous rows, as the engine stores them), one fp32 scale per output channel, x fp16/bf16/fp32.

At M of 1 to 16 the layer is a matrix-vector product and its time is the time to read W, so the kernel is
written for the memory system, not the math units:

- each program owns BLOCK_N whole rows of W and walks K; a thread loads 16 contiguous bytes of a row per
  load (a warp reads 512 contiguous bytes), nothing else comes from HBM (x and the scales are tiny and hit
  in L2). No dequantized copy of W exists anywhere: bytes are converted in registers;
- enough programs to fill every SM: BLOCK_N is narrow (1 to 16 rows at M = 1, since no tensor-core tile
  forces a minimum), so the 7B shapes (N = 4096 .. 22016) give 256 to 22016 programs without split-K;
- fp32 accumulation; the per-channel scale (and the bias) applied once per output, in the epilogue; one
  kernel per layer, no host synchronization, so it records into the decode CUDA graphs as it is;
- int8 -> float by the exponent trick (byte + 128 placed in the mantissa of 2^23, then one subtraction),
  exact, and cheaper than the I2F conversion instruction, whose throughput is of the order of the
  bandwidth the loads need;
- M = 1, 2, 4 (``dot=False``): CUDA-core FMAs on an elementwise fp32 accumulator [BLOCK_M, BLOCK_N,
  BLOCK_K] summed over K once, after the loop (no per-iteration cross-thread reduction). M = 3 .. 16
  (``dot=True``): 16-row tensor-core tiles (x rows past M clamp to row M - 1 and are not stored), so eight
  uses of each weight byte cost no more than one.

Configs: a few per M bucket (1, 2, 4, 8, 16: the decode graphs' buckets), picked by a tiny autotune the
first time a (bucket, N, K, dtypes) is seen on a GPU outside CUDA-graph capture: the decode graphs' eager
warm-up run before each capture is that first time, so it happens at engine load. Each candidate is timed
with CUDA events, the L2 cache flushed before every run (a decode step streams 6.5 GB of weights through a
50 MB L2, so a warm-L2 time would flatter small tiles). ``EMBER_LLM_W8_TUNE=0`` turns tuning off; then,
and under capture, in the interpreter, or on the CPU, the config comes from ``heuristic``. ``tuned()``
lists the choices made (the benchmark prints them).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

log = logging.getLogger("ember.llm")

MAX_M = 16
BUCKETS = (1, 2, 4, 8, 16)


@triton.jit
def _to_float(w, DTYPE: tl.constexpr, INT8: tl.constexpr):
    """Weights (int8 or fp8) to DTYPE, exactly. int8: q + 128 in the low mantissa bits of 2^23 (fp32) or of
    2^10 (fp16) is the float 2^23 + q + 128 (2^10 + q + 128), so one integer add and one float subtraction
    convert four bytes of a 32-bit load without the I2F unit."""
    if INT8:
        if DTYPE == tl.float16:
            f = (w.to(tl.int16) + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
        else:
            f = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            f = f.to(DTYPE)
    else:
        f = w.to(DTYPE)
    return f


@triton.jit
def _partial(wf, x_ptrs, kmask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K:
        x = tl.load(x_ptrs)
    else:
        x = tl.load(x_ptrs, mask=kmask, other=0.0)
    return tl.sum(tl.reshape(wf * x.to(tl.float32), [BLOCK_N, BLOCK_K // 16, 16]), axis=2)


@triton.jit
def _x_row(x_ptr, row, M, stride_xm, BLOCK_N: tl.constexpr):
    """[BLOCK_N, 1] pointers to x's row (rows past M read row M - 1, never stored)."""
    return x_ptr + tl.minimum(row, M - 1).to(tl.int64) * stride_xm + tl.zeros([BLOCK_N, 1], tl.int32)


@triton.jit
def _w8_gemv(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
             EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, INT8: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(DOT or BLOCK_M <= 4, "the FMA path keeps at most 4 rows of x")
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # rows of W past N read row N - 1 and are not stored: the weight loads need no mask along N
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * K  # [BN, 1]
    rk = tl.arange(0, BLOCK_K)
    if DOT:
        # rows of x past M are masked (zero-filled, no memory traffic), not clamped: at M = 1 a clamped
        # [16, BLOCK_K] tile would move 16 copies of x for one row of W's bytes
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
        mmask = (rm < M)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            if EVEN_K:
                w = tl.load(w_rows + kk[None, :])
                x = tl.load(x_rows + kk[None, :], mask=mmask, other=0.0)
            else:
                kmask = (kk < K)[None, :]
                w = tl.load(w_rows + kk[None, :], mask=kmask, other=0.0)
                x = tl.load(x_rows + kk[None, :], mask=mmask & kmask, other=0.0)
            acc += tl.dot(x, tl.trans(_to_float(w, x.dtype, INT8)), input_precision=PRECISION)
    else:
        # per row of x, partial sums [BLOCK_N, BLOCK_K // 16]: each thread adds its own 16 contiguous
        # products per iteration (no cross-thread traffic in the loop); one reduction after it
        acc0 = tl.zeros([BLOCK_N, BLOCK_K // 16], tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_K // 16], tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K // 16], tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_K // 16], tl.float32)
        # x read as [BLOCK_N, BLOCK_K] tiles of repeated rows: a load of W's shape gets W's layout (16
        # contiguous elements a thread), so x needs no layout conversion (a trip through shared memory and
        # a barrier) inside the loop; the repeats are the same addresses, loaded once
        x0 = _x_row(x_ptr, pid_m * BLOCK_M, M, stride_xm, BLOCK_N)
        x1 = _x_row(x_ptr, pid_m * BLOCK_M + 1, M, stride_xm, BLOCK_N)
        x2 = _x_row(x_ptr, pid_m * BLOCK_M + 2, M, stride_xm, BLOCK_N)
        x3 = _x_row(x_ptr, pid_m * BLOCK_M + 3, M, stride_xm, BLOCK_N)
        for k0 in range(0, K, BLOCK_K):
            kk = (k0 + rk)[None, :]
            kmask = kk < K
            if EVEN_K:
                wf = _to_float(tl.load(w_rows + kk), tl.float32, INT8)
            else:
                wf = _to_float(tl.load(w_rows + kk, mask=kmask, other=0.0), tl.float32, INT8)
            acc0 += _partial(wf, x0 + kk, kmask, BLOCK_N, BLOCK_K, EVEN_K)
            if BLOCK_M > 1:
                acc1 += _partial(wf, x1 + kk, kmask, BLOCK_N, BLOCK_K, EVEN_K)
            if BLOCK_M > 2:
                acc2 += _partial(wf, x2 + kk, kmask, BLOCK_N, BLOCK_K, EVEN_K)
                acc3 += _partial(wf, x3 + kk, kmask, BLOCK_N, BLOCK_K, EVEN_K)
        acc = tl.sum(acc0, axis=1)[None, :]
        if BLOCK_M > 1:
            pick = tl.arange(0, BLOCK_M)[:, None]
            acc = tl.where(pick == 0, acc, 0.0)
            acc = tl.where(pick == 1, tl.sum(acc1, axis=1)[None, :], acc)
            if BLOCK_M > 2:
                acc = tl.where(pick == 2, tl.sum(acc2, axis=1)[None, :], acc)
                acc = tl.where(pick == 3, tl.sum(acc3, axis=1)[None, :], acc)
    nmask = rn < N
    out = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & nmask[None, :])


@dataclass(frozen=True)
class GemvConfig:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    dot: bool

    def __str__(self) -> str:
        return (f"{'dot' if self.dot else 'fma'} m{self.block_m} n{self.block_n} k{self.block_k} "
                f"w{self.warps} s{self.stages}")


def bucket(M: int) -> int:
    return next(b for b in BUCKETS if b >= M)


def _fma(bm: int, bn: int, bk: int, warps: int, stages: int = 1) -> GemvConfig:
    return GemvConfig(bm, bn, bk, warps, stages, False)


def _dot(bn: int, bk: int, warps: int, stages: int) -> GemvConfig:
    return GemvConfig(16, bn, bk, warps, stages, True)


# the autotune's candidates per M bucket. FMA path: a row's bytes in flight per iteration are BLOCK_K, and
# the whole GPU holds N rows at once at most, so N = 4096 needs BLOCK_K >= 1024 to keep ~30 KB in flight
# per SM; per thread at most 64 weights an iteration. Dot path: cp.async stages of [16, BLOCK_K] x tiles
# and [BLOCK_N, BLOCK_K] weight tiles.
CANDIDATES: dict[int, tuple[GemvConfig, ...]] = {
    1: (_fma(1, 4, 1024, 4), _fma(1, 2, 2048, 4), _fma(1, 4, 2048, 4), _fma(1, 8, 1024, 4), _fma(1, 8, 1024, 8),
        _fma(1, 16, 1024, 8), _fma(1, 8, 512, 4), _fma(1, 2, 4096, 8)),
    2: (_fma(2, 4, 1024, 4), _fma(2, 2, 2048, 4), _fma(2, 8, 1024, 8), _fma(2, 8, 512, 4), _dot(16, 512, 4, 3)),
    4: (_fma(4, 4, 1024, 4), _fma(4, 2, 2048, 4), _fma(4, 8, 512, 4), _dot(16, 256, 4, 4), _dot(16, 512, 4, 3),
        _dot(32, 256, 4, 3)),
    8: (_dot(16, 256, 4, 4), _dot(16, 512, 4, 3), _dot(16, 512, 4, 4), _dot(32, 256, 4, 3), _dot(64, 128, 4, 4),
        _dot(32, 512, 8, 3)),
    16: (_dot(16, 256, 4, 4), _dot(16, 512, 4, 3), _dot(16, 512, 4, 4), _dot(32, 256, 4, 3), _dot(64, 128, 4, 4),
         _dot(32, 512, 8, 3)),
}


def heuristic(M: int, N: int, K: int, sms: int) -> GemvConfig:
    """The untuned choice. M <= 2: FMA tiles of BLOCK_K up to 1024 (bytes in flight per row) and the
    widest BLOCK_N (up to 8, as x is re-read per program) that still gives two programs per SM. Above:
    16-row tensor-core tiles of 16 to 64 columns narrowed the same way, BLOCK_K 512 (256 for K < 1024)."""
    if M <= 2:
        bk = max(16, min(1024, triton.next_power_of_2(K)))
        bn = 8 if M == 1 else 4
        while bn > 1 and triton.cdiv(N, bn) < 2 * sms:
            bn //= 2
        return _fma(M, bn, bk, 4)
    bn = 64
    while bn > 16 and triton.cdiv(N, bn) < 2 * sms:
        bn //= 2
    return _dot(bn, 512 if K >= 1024 else 256, 4, 3)


def launch(x2: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor,
           cfg: GemvConfig) -> None:
    M, K = x2.shape
    N = w.shape[0]
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m))
    prec = "ieee" if x2.dtype == torch.float32 else "tf32"
    _w8_gemv[grid](x2, w, scale, bias if bias is not None else scale, y, M, N, K, x2.stride(0), y.stride(0),
                   BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT=cfg.dot,
                   EVEN_K=K % cfg.block_k == 0, HAS_BIAS=bias is not None, INT8=w.dtype == torch.int8,
                   PRECISION=prec, num_warps=cfg.warps, num_stages=cfg.stages)


@lru_cache(maxsize=None)
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_TUNED: dict[tuple, GemvConfig] = {}
_TUNE = os.environ.get("EMBER_LLM_W8_TUNE", "1") != "0"


def tuned() -> dict[tuple, GemvConfig]:
    """(device, M bucket, N, K, weight dtype, x dtype, bias) -> the config the autotune chose."""
    return dict(_TUNED)


def _can_tune(x: torch.Tensor) -> bool:
    return (_TUNE and x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and not torch.cuda.is_current_stream_capturing())


def time_config(x2: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                cfg: GemvConfig, reps: int = 10, flush: Optional[torch.Tensor] = None) -> float:
    """Median seconds of one launch, L2 flushed before each (``flush``: a buffer larger than L2, or None)."""
    y = torch.empty(x2.shape[0], w.shape[0], dtype=x2.dtype, device=x2.device)
    launch(x2, w, scale, bias, y, cfg)  # compile, warm up
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        launch(x2, w, scale, bias, y, cfg)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return sorted(times)[len(times) // 2]


def _flush_buffer(device: torch.device) -> Optional[torch.Tensor]:
    """Twice the L2 cache, zeroed before each timed launch; None (a warm-L2 timing) if memory is short."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    try:
        return torch.empty(2 * l2, dtype=torch.int8, device=device)
    except torch.OutOfMemoryError:
        return None


def _tune(key: tuple, x2: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
          bias: Optional[torch.Tensor]) -> GemvConfig:
    b, N, K = key[1], w.shape[0], w.shape[1]
    xb = torch.randn(b, K, device=x2.device).to(x2.dtype)  # the bucket's row count, as the graph runs it
    t0 = time.perf_counter()
    flush = _flush_buffer(x2.device)
    results = []
    for cfg in CANDIDATES[b]:
        try:
            results.append((time_config(xb, w, scale, bias, cfg, flush=flush), cfg))
        except Exception as e:  # a config the compiler or the GPU refuses (resources) is skipped
            log.debug("w8 gemv config %s failed for M=%d N=%d K=%d: %s", cfg, b, N, K, e)
    if not results:
        return heuristic(b, N, K, _sms(x2.device.index or 0))
    best_t, best = min(results, key=lambda r: r[0])
    log.info("w8 gemv M=%d N=%d K=%d %s: %s, %.1f us (%.0f GB/s); tuned in %.1f s", b, N, K, w.dtype, best,
             best_t * 1e6, w.numel() * w.element_size() / best_t / 1e9, time.perf_counter() - t0)
    return best


def choose(x2: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> GemvConfig:
    M, K = x2.shape
    N = w.shape[0]
    b = bucket(M)
    dev = (x2.device.index or 0) if x2.is_cuda else -1
    key = (dev, b, N, K, w.dtype, x2.dtype, bias is not None)
    cfg = _TUNED.get(key)
    if cfg is None:
        if _can_tune(x2):
            cfg = _TUNED[key] = _tune(key, x2, w, scale, bias)
        else:
            cfg = heuristic(b, N, K, _sms(dev) if x2.is_cuda else 4)
    return cfg


def w8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
            cfg: Optional[GemvConfig] = None) -> torch.Tensor:
    """x [..., K] (at most 16 rows) @ (w [N, K] * scale[N, None])^T (+ bias) -> [..., N] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    N = w.shape[0]
    if M > MAX_M:
        raise ValueError(f"w8_gemv takes at most {MAX_M} rows, not {M}")
    if w.stride() != (K, 1):
        raise ValueError(f"w8_gemv needs K-contiguous weight rows [N, K]; got strides {w.stride()}")
    if cfg is None:
        cfg = choose(x2, w, scale, bias)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        launch(x2, w, scale, bias, y, cfg)
    return y.reshape(*shape[:-1], N)
