"""Weight-only int8 (and fp8) decode GEMV against fp16 cuBLAS and the old int8 path, at Llama-2-7B's layer
shapes (issue 12: int8 decode b1 was 0.96x fp16, bound 2x).

For M = 1 and 8 rows of x (fp16) and each layer shape N x K of ember's fused 7B layers (wqkv 12288 x 4096,
wo 4096 x 4096, w13 = gate/up fused 22016 x 4096, w2 4096 x 11008), times with CUDA events, median of 50
launches after warm-up, the L2 cache flushed before each launch (a decode step streams 6.5 GB of weights
through a 50 MB L2; --no-flush times a warm L2):

  new      ember.llm.kernels.w8_gemv (autotuned at first use, as the engine does; the config is printed)
  fp16     torch.nn.functional.linear on fp16 weights (cuBLAS)
  old      the tiled int8 kernel decode used before (weight_only._tiled with its rule's tiles)
  fp8      the new kernel on fp8 e4m3 weights (sm_89+)

and prints achieved GB/s (weight bytes + x + y over the time), each path's ratio to fp16, and the sum over
a 32-layer step (what the linear layers of one decode token cost). --candidates also prints every autotune
candidate's time per shape (what the heuristic should pick if tuning is switched off).

    PYTHONPATH=src python benchmarks/w8_gemv.py
    PYTHONPATH=src python benchmarks/w8_gemv.py --m 1,2,4,8,16 --candidates --json $OUT/w8_gemv.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}
LAYERS = 32


def bench(fn: Callable[[], object], reps: int, flush: Optional[torch.Tensor]) -> float:
    """Median seconds of one call: CUDA events around each call, L2 flushed before it."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,8", help="rows of x (comma-separated, each <= 16)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between launches")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--candidates", action="store_true", help="time every autotune candidate too")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1

    from ember.llm.kernels import w8_gemv as g
    from ember.llm.kernels import weight_only as wo
    from ember.llm.quant import quantize_fp8, quantize_int8

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    fp8 = not args.no_fp8 and torch.cuda.get_device_capability(dev) >= (8, 9)
    flush = None if args.no_flush else torch.empty(256 << 20, dtype=torch.int8, device=dev)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"L2 {'flushed' if flush is not None else 'warm'}, median of {args.reps}")
    results: list[dict] = []
    totals: dict[int, dict[str, float]] = {}
    for name, (N, K) in SHAPES.items():
        torch.manual_seed(0)
        w16 = (torch.randn(N, K, device=dev) * 0.02).to(torch.float16)
        q, s = quantize_int8(w16)
        f8, s8 = quantize_fp8(w16) if fp8 else (None, None)
        for M in [int(m) for m in args.m.split(",")]:
            x = torch.randn(M, K, device=dev).to(torch.float16)
            io = (M * K + M * N) * 2
            row = {"layer": name, "N": N, "K": K, "M": M}
            old_tiles = wo.choose_tiles(M, N, K, props.multi_processor_count)
            paths = {"fp16": (lambda: F.linear(x, w16), N * K * 2),
                     "new": (lambda: g.w8_gemv(x, q, s), N * K),
                     "old": (lambda: wo._tiled(x, q, s, old_tiles), N * K)}
            if fp8:
                paths["fp8"] = (lambda: g.w8_gemv(x, f8, s8), N * K)
            g.w8_gemv(x, q, s)  # autotunes this (bucket, N, K) now, as the engine's warm-up does
            if fp8:
                g.w8_gemv(x, f8, s8)
            key = (dev.index or 0, g.bucket(M), N, K, torch.int8, torch.float16, False)
            row["config"] = str(g.tuned().get(key) or g.heuristic(M, N, K, props.multi_processor_count))
            ref = F.linear(x.float(), q.float() * s[:, None])
            row["new_rel_err"] = float((g.w8_gemv(x, q, s).float() - ref).norm() / ref.norm())
            for path, (fn, wbytes) in paths.items():
                t = bench(fn, args.reps, flush)
                row[f"{path}_us"] = t * 1e6
                row[f"{path}_GBps"] = (wbytes + io) / t / 1e9
                totals.setdefault(M, {}).setdefault(path, 0.0)
                totals[M][path] += t * LAYERS
            for path in paths:
                if path != "fp16":
                    row[f"{path}_speedup"] = row["fp16_us"] / row[f"{path}_us"]
            print(f"{name:5s} N={N:5d} K={K:5d} M={M:2d} | fp16 {row['fp16_us']:7.1f} us {row['fp16_GBps']:6.0f} GB/s"
                  f" | new {row['new_us']:7.1f} us {row['new_GBps']:6.0f} GB/s x{row['new_speedup']:.2f}"
                  f" | old {row['old_us']:7.1f} us {row['old_GBps']:6.0f} GB/s x{row['old_speedup']:.2f}"
                  + (f" | fp8 {row['fp8_us']:7.1f} us x{row['fp8_speedup']:.2f}" if fp8 else "")
                  + f" | {row['config']} (rel err {row['new_rel_err']:.1e})", flush=True)
            if args.candidates:
                row["candidates"] = {}
                for cfg in g.CANDIDATES[g.bucket(M)]:
                    try:
                        t = bench(lambda: g.w8_gemv(x, q, s, cfg=cfg), args.reps, flush)
                    except Exception as e:  # resources
                        print(f"    {cfg}: failed ({type(e).__name__})")
                        continue
                    row["candidates"][str(cfg)] = t * 1e6
                    print(f"    {str(cfg):28s} {t * 1e6:7.1f} us {(N * K + io) / t / 1e9:6.0f} GB/s")
            results.append(row)
    print(f"\nlinear layers of one decode step ({LAYERS} layers x {', '.join(SHAPES)}), summed medians:")
    for M, tot in totals.items():
        print(f"  M={M:2d}: " + ", ".join(f"{p} {t * 1e3:.2f} ms (x{tot['fp16'] / t:.2f})" for p, t in tot.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": props.name, "rows": results,
                                               "step_ms": {str(m): {p: t * 1e3 for p, t in tot.items()}
                                                           for m, tot in totals.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
