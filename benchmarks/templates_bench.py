"""Triton GEMM / conv templates against the vendor tactics (cuDNN, cuBLASLt), per layer shape, fp16.

    PYTHONPATH=src python benchmarks/templates_bench.py [--cases conv1,bert_ffn1] [--reps 25] [--out t.json]

Cases: ResNet-50 b256 convolutions and BERT-base b64 s128 GEMMs (M = 8192), each with its model's
epilogue. Every tactic runs the way the builder runs it: ``bind_tactic`` (weights prepared once),
then the bound run function. Each Triton tile configuration is first checked against the vendor
result (relative L2 <= 1e-2; a config that is off shows as WRONG and is not timed), then timed as a
CUDA graph of ``--inner`` calls (how the runtime replays an engine, without Python launch overhead):
median of ``--reps`` replays after warm-up, in ms per call. ``triton/vendor`` < 1: the template wins.
Cold Triton cache: ~1 s of compilation per config and shape; the whole run takes 1-3 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ember.ir.dtypes import DType
from ember.ir.graph import Graph, Node
from ember.builder.tuner import _time
from ember.kernels import bind_tactic, candidates
from ember.ops.infer import infer_shapes


@dataclass
class Case:
    name: str
    desc: str
    op: str  # ember.Conv | ember.Gemm
    x_shape: tuple
    w_shape: tuple
    attrs: dict
    residual: bool = False
    nchw_input: bool = False  # a graph input arrives NCHW-contiguous; later layers are channels_last
    vendor: str = ""


def conv(name, n, cin, hw, cout, k, s, act="Relu", residual=False, after=0, nchw=False) -> Case:
    p = k // 2
    attrs = {"strides": [s, s], "pads": [p] * 4, "kernel_shape": [k, k], "activation": act,
             "act_keys": [], "act_values": [], "act_after_residual": after}
    return Case(name, f"conv {k}x{k}/s{s} {cin}->{cout} @{hw} b{n} {act}{' +res' if residual else ''}",
                "ember.Conv", (n, cin, hw, hw), (cout, cin, k, k), attrs, residual, nchw, "cudnn.conv_nhwc")


def gemm(name, m, k, n, act="", residual=False) -> Case:
    attrs = {"trans_b": 1, "activation": act, "act_keys": [], "act_values": []}
    return Case(name, f"gemm M{m} {k}->{n} +bias{' ' + act if act else ''}{' +res' if residual else ''}",
                "ember.Gemm", (m, k), (n, k), attrs, residual, False, "cublaslt.linear")


CASES = [
    conv("conv1", 256, 3, 224, 64, 7, 2, nchw=True),
    conv("r50_1x1_expand", 256, 64, 56, 256, 1, 1, residual=True, after=1),
    conv("r50_3x3_56", 256, 64, 56, 64, 3, 1),
    conv("r50_3x3_s2", 256, 128, 56, 128, 3, 2),
    conv("r50_1x1_reduce14", 256, 1024, 14, 256, 1, 1),
    conv("r50_3x3_7", 256, 512, 7, 512, 3, 1),
    gemm("bert_qkv", 8192, 768, 2304),
    gemm("bert_attn_out", 8192, 768, 768),
    gemm("bert_ffn1", 8192, 768, 3072, act="Gelu"),
    gemm("bert_ffn2", 8192, 3072, 768, residual=True),
]


def build_node(case: Case, device: torch.device) -> tuple[Node, dict[str, torch.Tensor], list[torch.Tensor]]:
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_input("x", DType.FLOAT16, case.x_shape)
    fan_in = int(np.prod(case.w_shape[1:]))
    w = g.add_const("w", (rng.standard_normal(case.w_shape) / np.sqrt(fan_in)).astype(np.float16))
    b = g.add_const("b", (0.1 * rng.standard_normal(case.w_shape[0])).astype(np.float16))
    ins = [x, w, b]
    if case.residual:
        out_shape = _out_shape(case)
        ins.append(g.add_input("r", DType.FLOAT16, out_shape))
    node = g.add_node(case.op, ins, 1, dict(case.attrs), name=case.name)
    g.outputs = [node.outputs[0]]
    infer_shapes(g)
    consts = {v.name: torch.from_numpy(v.data).to(device) for v in g.initializers.values()}
    gen = torch.Generator(device=device).manual_seed(0)
    xt = torch.randn(case.x_shape, generator=gen, device=device, dtype=torch.float16)
    if case.op == "ember.Conv" and not case.nchw_input:
        xt = xt.contiguous(memory_format=torch.channels_last)
    args = [xt, consts["w"], consts["b"]]
    if case.residual:
        r = torch.randn(_out_shape(case), generator=gen, device=device, dtype=torch.float16)
        args.append(r.contiguous(memory_format=torch.channels_last) if r.dim() == 4 else r)
    return node, consts, args


def _out_shape(case: Case) -> tuple:
    if case.op == "ember.Gemm":
        return (case.x_shape[0], case.w_shape[0])
    n, _, h, w = case.x_shape
    k, s = case.w_shape[2], case.attrs["strides"][0]
    p = case.attrs["pads"][0]
    return (n, case.w_shape[0], (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)


def bound_call(node: Node, name: str, consts: dict, args: list, device: torch.device) -> Optional[Callable[[], Any]]:
    node.meta["tactic"] = name
    cs = dict(consts)
    bound = bind_tactic(node, device, cs)
    if bound is None:
        return None
    bargs = [cs[bound.remap[j]] if j in bound.remap else a for j, a in enumerate(args)]
    return lambda: bound.run(bargs, bound.attrs, None)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def time_ms(fn: Callable[[], Any], reps: int, inner: int) -> float:
    """Median ms per call, timed the way the builder's tuner times tactics (CUDA-graph replays of
    ``inner`` calls; eager if capture fails)."""
    return _time(fn, reps, torch.device("cuda"), inner)


def bench_case(case: Case, device: torch.device, reps: int, inner: int, verbose: bool) -> dict:
    node, consts, args = build_node(case, device)
    names = [t.name for t in candidates(node, device)]
    if case.vendor not in names:
        raise RuntimeError(f"{case.name}: vendor tactic {case.vendor} does not apply")
    triton_names = [n for n in names if n.startswith("triton.")]
    with torch.inference_mode():
        vendor_fn = bound_call(node, case.vendor, consts, args, device)
        want = vendor_fn().clone()
        vendor_ms = time_ms(vendor_fn, reps, inner)
        results: dict[str, Any] = {}
        for name in triton_names:
            fn = bound_call(node, name, consts, args, device)
            try:
                got = fn()
                err = rel_l2(got, want)
                if err > 1e-2 or tuple(got.shape) != tuple(want.shape):
                    results[name] = f"WRONG({err:.2e})"
                    continue
                results[name] = time_ms(fn, reps, inner)
            except Exception as e:  # a config that does not compile here is reported, not fatal
                results[name] = f"FAILED({type(e).__name__}: {str(e)[:120]})"
            if verbose:
                print(f"    {name}: {results[name]}", file=sys.stderr)
            torch.cuda.empty_cache()
    timed = {k: v for k, v in results.items() if isinstance(v, float)}
    best = min(timed, key=timed.get) if timed else None
    return {"case": case.name, "desc": case.desc, "vendor": case.vendor, "vendor_ms": vendor_ms,
            "best": best, "triton_ms": timed.get(best) if best else None, "all": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--inner", type=int, default=10, help="calls per timed CUDA-graph replay")
    ap.add_argument("--out", default="", help="write all results as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every config's time")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("templates_bench.py needs a CUDA GPU")
    device = torch.device("cuda")
    want = set(a.cases.split(",")) if a.cases else None
    cases = [c for c in CASES if want is None or c.name in want]
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | fp16 | median of {a.reps} "
          f"CUDA-graph replays x {a.inner} calls", flush=True)
    rows = []
    t0 = time.time()
    for c in cases:
        t = time.time()
        r = bench_case(c, device, a.reps, a.inner, a.verbose)
        rows.append(r)
        print(f"  {c.name}: {time.time() - t:.1f}s", file=sys.stderr, flush=True)
    hdr = (f"{'case':<18} {'shape':<44} {'best triton config':<34} {'triton ms':>9} {'vendor ms':>9} "
           f"{'triton/vendor':>13}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        tms = f"{r['triton_ms']:.4f}" if r["triton_ms"] is not None else "-"
        ratio = f"{r['triton_ms'] / r['vendor_ms']:.3f}" if r["triton_ms"] is not None else "-"
        best = r["best"] or "none correct"
        print(f"{r['case']:<18} {r['desc']:<44} {best:<34} {tms:>9} {r['vendor_ms']:>9.4f} {ratio:>13}")
    bad = [(r["case"], k, v) for r in rows for k, v in r["all"].items() if isinstance(v, str)]
    for case, k, v in bad:
        print(f"  ! {case} {k}: {v}")
    print(f"# total {time.time() - t0:.0f}s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
