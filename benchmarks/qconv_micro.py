"""INT8/FP8 conv and GEMM kernels one layer at a time (issue 13): ember's templates against cuDNN fp16 and
cuBLASLt's int8/fp8 GEMMs, at ResNet-50 b256 and BERT-base b64 layer shapes, with the weight stored
N-contiguous (as the fp16 templates take it) or K-contiguous (what Hopper's 8-bit wgmma reads without a
transpose). Medians of CUDA-event timings; the table is printed last.

    PYTHONPATH=src python benchmarks/qconv_micro.py [--reps 50] [--out qconv_micro.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, Callable

import torch

from ember.kernels import quantized_templates as qt

CONVS = [  # (name, batch, cin, h, w, cout, k, stride)
    ("1x1 64->256 56", 256, 64, 56, 56, 256, 1, 1),
    ("1x1 256->64 56", 256, 256, 56, 56, 64, 1, 1),
    ("3x3 64->64 56", 256, 64, 56, 56, 64, 3, 1),
    ("3x3 128->128 28", 256, 128, 28, 28, 128, 3, 1),
    ("1x1 1024->256 14", 256, 1024, 14, 14, 256, 1, 1),
    ("3x3 512->512 7", 256, 512, 7, 7, 512, 3, 1),
]
GEMMS = [("bert qkv 8192x768x2304", 8192, 768, 2304), ("bert ffn1 8192x768x3072", 8192, 768, 3072),
         ("bert ffn2 8192x3072x768", 8192, 3072, 768)]


def timed(fn: Callable[[], Any], reps: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def conv_rows(reps: int) -> list[dict[str, Any]]:
    dev = "cuda"
    rows = []
    for name, nb, cin, h, w, cout, k, s in CONVS:
        pad = k // 2
        x16 = torch.randn(nb, cin, h, w, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        w16 = torch.randn(cout, cin, k, k, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        oh = (h + 2 * pad - k) // s + 1
        flops = 2 * nb * oh * oh * cout * cin * k * k
        row: dict[str, Any] = {"layer": name, "gflop": flops / 1e9}
        row["cudnn_fp16"] = timed(lambda: torch.nn.functional.conv2d(x16, w16, None, s, pad), reps)
        attrs = dict(strides=[s, s], pads=[pad] * 4, dilations=[1, 1], kernel_shape=[k, k])
        for qname, qdtype in (("int8", torch.int8), ("fp8", qt.FP8)):
            if qdtype == torch.int8:
                xq = torch.randint(-100, 100, x16.shape, device=dev, dtype=torch.int8).contiguous(
                    memory_format=torch.channels_last)
                wq = torch.randint(-100, 100, w16.shape, device=dev, dtype=torch.int8)
            else:
                xq = x16.to(qdtype).contiguous(memory_format=torch.channels_last)
                wq = w16.to(qdtype)
            layouts = {"n": wq.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1),  # [KH][KW][Cin][Cout]
                       "k": wq.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)}  # [Cout][KH][KW][Cin]
            xs = torch.tensor(0.05, device=dev)
            ws = torch.rand(cout, device=dev) * 0.01 + 0.001
            ys = torch.tensor(0.1, device=dev)
            bias = torch.randn(cout, device=dev)
            for lay, wl in layouts.items():
                best = (float("inf"), "")
                for cfg in (qt.QCONV_CONFIGS if (lay, qname) == ("k", "int8") else qt.QCONV_CONFIGS[:3]):
                    try:
                        out, launch = qt.qconv_launch(xq, wl, xs, ws, bias, None, None, ys, None, config=cfg, **attrs)
                        ms = timed(launch, reps)
                    except Exception as e:  # a config that does not compile here is skipped, and said
                        print(f"  {name} {qname} {lay} {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                        continue
                    best = min(best, (ms, str(cfg)))
                row[f"{qname}_{lay}"] = best[0]
                row[f"{qname}_{lay}_cfg"] = best[1]
                # a float activation quantized in the kernel's prologue (a block's first conv)
            if k == 1 and s == 1:
                m = nb * h * w
                a2 = xq.permute(0, 2, 3, 1).reshape(m, cin)
                bkn = wq.reshape(cout, cin).t()  # [K, N] column-major
                if qdtype == torch.int8:
                    row["int_mm"] = timed(lambda: torch._int_mm(a2, bkn), reps)
                else:
                    one = torch.tensor(1.0, device=dev)
                    row["scaled_mm"] = timed(lambda: torch._scaled_mm(a2, bkn, one, one, out_dtype=torch.float16),
                                             reps)
        wl = torch.randint(-100, 100, w16.shape, device=dev, dtype=torch.int8).permute(0, 2, 3, 1).contiguous(
        ).permute(0, 3, 1, 2)
        best = float("inf")
        for cfg in qt.QCONV_CONFIGS[:3]:
            try:
                _, launch = qt.qconv_launch(x16, wl, torch.tensor(0.05, device=dev), torch.rand(cout, device=dev),
                                            None, None, None, torch.tensor(0.1, device=dev), None, config=cfg, **attrs)
                best = min(best, timed(launch, reps))
            except Exception:
                continue
        row["int8_k_from_fp16"] = best
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def gemm_rows(reps: int) -> list[dict[str, Any]]:
    dev = "cuda"
    rows = []
    for name, m, k, n in GEMMS:
        a16 = torch.randn(m, k, device=dev, dtype=torch.float16)
        b16 = torch.randn(k, n, device=dev, dtype=torch.float16)
        row: dict[str, Any] = {"layer": name, "gflop": 2 * m * k * n / 1e9}
        row["cublas_fp16"] = timed(lambda: a16 @ b16, reps)
        aq = torch.randint(-100, 100, (m, k), device=dev, dtype=torch.int8)
        bq = torch.randint(-100, 100, (k, n), device=dev, dtype=torch.int8)
        xs = torch.tensor(0.05, device=dev)
        ws = torch.rand(n, device=dev) * 0.01
        for lay, bl in (("n", bq.contiguous()), ("k", bq.t().contiguous().t())):
            best = (float("inf"), "")
            for cfg in (qt.QGEMM_CONFIGS if lay == "k" else qt.QGEMM_CONFIGS[:3]):
                try:
                    _, launch = qt.qgemm_launch(aq, bl, xs, ws, None, None, None, torch.tensor(0.1, device=dev), None,
                                                config=cfg)
                    best = min(best, (timed(launch, reps), str(cfg)))
                except Exception as e:
                    print(f"  {name} {lay} {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
            row[f"int8_{lay}"], row[f"int8_{lay}_cfg"] = best
        row["int_mm"] = timed(lambda: torch._int_mm(aq, bq.t().contiguous().t()), reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="qconv_micro.json")
    args = ap.parse_args()
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "convs": conv_rows(args.reps), "gemms": gemm_rows(args.reps)}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    keys = ["cudnn_fp16", "int8_n", "int8_k", "int8_k_from_fp16", "int_mm", "fp8_n", "fp8_k", "scaled_mm"]
    print(f"{'layer':24s}" + "".join(f"{k:>17s}" for k in keys) + "   (ms)")
    for r in doc["convs"]:
        print(f"{r['layer']:24s}" + "".join(f"{r.get(k, float('nan')):17.3f}" for k in keys))
    gk = ["cublas_fp16", "int8_n", "int8_k", "int_mm"]
    print(f"{'gemm':24s}" + "".join(f"{k:>17s}" for k in gk))
    for r in doc["gemms"]:
        print(f"{r['layer']:24s}" + "".join(f"{r.get(k, float('nan')):17.3f}" for k in gk))


if __name__ == "__main__":
    main()
